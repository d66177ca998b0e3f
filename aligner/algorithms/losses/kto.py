"""KTO, Kahneman-Tversky optimisation (Ethayarajh et al. 2024, arXiv 2402.01306): a loss on
unpaired responses, each labelled desirable or undesirable (docs/kto.md).

Per response ``y`` of prompt ``x``, ``ρ = log π(y|x) − log π_ref(y|x)`` (summed over the
response tokens) and the reference point ``z_ref`` estimates ``KL(π ‖ π_ref)`` from
*mismatched* pairs of the batch: the completion of row ``i − 1`` after the prompt of row
``i`` (rows rotated by one, as TRL's ``KTOTrainer`` builds them), ``z_ref =
max(0, mean_i (log π(y_{i−1}|x_i) − log π_ref(y_{i−1}|x_i)))``, detached (eq. 8 and
section 4.1). The value of a response (eq. 7):

- desirable: ``λ_D · (1 − σ(β(ρ − z_ref)))``
- undesirable: ``λ_U · (1 − σ(β(z_ref − ρ)))``

and the loss is the mean over the responses of the batch. An optional SFT term (``kto.sft_weight``,
as DPO's ``dpo.sft_weight``) adds ``w_sft`` times the mean, over the desirable responses, of
each one's NLL averaged over its tokens. Shapes: ``b`` responses.
"""
from __future__ import annotations

from typing import Hashable, Optional, Sequence, Tuple

import torch

from aligner.algorithms.losses.common import LossAndStats, _check_pairs


def mismatched_rows(n: int, prompts: Optional[Sequence[Hashable]] = None) -> torch.Tensor:
    """For ``n`` rows, the row whose completion row ``i`` pairs with its own prompt for the
    KL estimate: ``[n − 1, 0, 1, ..., n − 2]`` (a rotation by one, TRL's construction).

    ``prompts`` (a key per row, e.g. its prompt tokens as a tuple): a row whose rotated
    partner has the same prompt (the two halves of a split pair side by side) takes the
    nearest row before that, cyclically, whose prompt differs, so that every pair is
    mismatched; rows of one prompt only keep the rotation. [n] long."""
    if n < 2:
        raise ValueError(f"KTO's KL estimate needs >= 2 rows to mismatch, got {n}")
    partner = torch.roll(torch.arange(n), 1)
    if prompts is None:
        return partner
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompt keys for {n} rows")
    for i in range(n):
        for back in range(1, n):
            j = (i - back) % n
            if prompts[j] != prompts[i]:
                partner[i] = j
                break
    return partner


def kto_reference_point(kl_logps: torch.Tensor, kl_ref_logps: torch.Tensor) -> torch.Tensor:
    """``z_ref = max(0, mean(kl_logps − kl_ref_logps))``, detached: the policy's and the
    reference's summed log-probs of the mismatched completions [b] -> scalar."""
    _check_pairs(kl_logps=kl_logps, kl_ref_logps=kl_ref_logps)
    return (kl_logps - kl_ref_logps).detach().mean().clamp(min=0)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, z_ref: torch.Tensor,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0, *,
             desirable_nll: Optional[torch.Tensor] = None, sft_weight: float = 0.0,
             totals: Optional[Tuple[float, float]] = None) -> LossAndStats:
    """Mean KTO value over the responses (module docstring), plus the SFT term, and statistics:

    ``loss = Σ_i v_i / n + sft_weight · Σ_{i desirable} nll_i / n_D``

    policy_logps, ref_logps: [b] summed response log-probs; desirable: [b] bool (the
    row's ``label``); z_ref: the reference point (:func:`kto_reference_point`, a scalar,
    over the global batch in a multi-process run). ``desirable_nll`` [b]: each response's
    NLL averaged over its tokens, ``−mean_t log π(y_t)`` (read on the desirable rows only;
    required when ``sft_weight > 0``). ``totals``: ``(n, n_D)``, the responses and the
    desirable responses the two means divide by; default this batch's own (``b`` and its
    desirable count). A share of a larger batch (a micro-batch) passes the whole batch's
    counts, so that the shares' losses add up to the batch's.

    Stats: ``loss``, ``loss/kto`` (mean value over this batch), ``loss/sft`` (mean NLL of
    this batch's desirable responses, when ``desirable_nll`` is given; 0 when there are
    none), ``kl`` (z_ref), ``rewards/chosen`` / ``rewards/rejected`` (mean ``βρ`` of the
    desirable / undesirable responses; 0 when there are none), ``count/desirable``.
    """
    _check_pairs(policy_logps=policy_logps, ref_logps=ref_logps)
    if desirable.shape != policy_logps.shape:
        raise ValueError(f"desirable has shape {tuple(desirable.shape)}; expected {tuple(policy_logps.shape)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    d = desirable.to(torch.bool)
    rho = policy_logps - ref_logps
    z = torch.as_tensor(z_ref, dtype=rho.dtype, device=rho.device).detach()
    value = torch.where(d, desirable_weight * (1 - torch.sigmoid(beta * (rho - z))),
                        undesirable_weight * (1 - torch.sigmoid(beta * (z - rho))))
    if sft_weight < 0:
        raise ValueError(f"sft_weight must be >= 0, got {sft_weight}")
    if sft_weight and desirable_nll is None:
        raise ValueError("sft_weight > 0 needs desirable_nll (−mean log π of each response)")
    n_d, n_u = d.sum(), (~d).sum()
    n_all, n_des = (d.numel(), n_d.clamp(min=1)) if totals is None else (totals[0], max(totals[1], 1))
    loss = value.sum() / n_all
    stats = {}
    if desirable_nll is not None:
        _check_pairs(policy_logps=policy_logps, desirable_nll=desirable_nll)
        sft_sum = torch.where(d, desirable_nll, 0).sum()
        if sft_weight:
            loss = loss + sft_weight * sft_sum / n_des
        stats["loss/sft"] = sft_sum.detach() / n_d.clamp(min=1)
    with torch.no_grad():
        reward = beta * rho.detach().float()
        stats.update({
            "loss": loss.detach(),
            "loss/kto": value.detach().mean(),
            "kl": z.float(),
            "rewards/chosen": torch.where(d, reward, 0).sum() / n_d.clamp(min=1),
            "rewards/rejected": torch.where(~d, reward, 0).sum() / n_u.clamp(min=1),
            "count/desirable": n_d.float(),
        })
    return loss, stats
