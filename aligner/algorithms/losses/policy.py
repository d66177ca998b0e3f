"""Policy-gradient losses: the KL estimators, the clipped surrogate, the REINFORCE token
loss, GSPO's sequence-level clipped ratio, CISPO's clipped importance weights, their
aggregation over the global batch and :func:`policy_objective`, the policy loss the online
algorithms train with (docs/ppo.md, docs/reinforce.md).

Every policy loss is registered by name in :data:`POLICY_LOSSES`
(:func:`register_policy_loss`, ``pg.loss``) with its default clip range, used where
the config leaves ``clip_eps_low`` / ``clip_eps_high`` unset.

The objective is returned as this micro-batch's share ``(numerator, denominator)``: the
training loop sums both over micro-batches and data-parallel ranks before dividing
(megatron-core's per-token loss normalisation), so it is a global-batch quantity whatever
the micro-batch size, accumulation or layout. Shapes: ``b`` rows, ``s`` positions.

The KL estimators (:func:`kl_estimate`; docs/reinforce.md, "KL estimators"; docs/ppo.md,
"KL penalty"), with ``d = log π(y_t) − log π_ref(y_t)`` on tokens sampled from π, clamped
to ±20:

- ``k1``: ``d`` (unbiased, signed; PPO's and REINFORCE++'s reward term)
- ``abs``: ``|d|`` (the default of the tool that came before, in PPO's reward)
- ``k2``: ``d²/2``
- ``k3``: ``exp(−d) − 1 + d`` (non-negative, unbiased; GRPO's loss term)
- ``k3+``: k3's value with k2's gradient (an unbiased value, a low-variance gradient)

and the estimate clamped to ±10, so one wild token cannot dominate a sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from aligner.algorithms.losses.common import _as_mask, _check_same_shape, masked_mean, masked_sum

# ------------------------------------------------------------------------------ KL estimators
KL_ESTIMATORS = ("k1", "abs", "k2", "k3", "k3+")
KL_LOG_RATIO_CLAMP = 20.0  # |d| beyond this is a broken token, not information
KL_VALUE_CLAMP = 10.0


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """The ``kind`` estimate of KL(π ‖ π_ref) per token (module docstring, "KL estimators").

    logps (may carry the graph), ref_logps (detached here): [b, s] -> [b, s].
    """
    _check_same_shape("logps", logps, ref_logps=ref_logps)
    delta = (ref_logps.detach() - logps).clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)  # −d
    if kind == "k1":
        out = -delta
    elif kind == "abs":
        out = delta.abs()
    elif kind == "k2":
        out = 0.5 * delta * delta
    elif kind in ("k3", "k3+"):
        out = torch.expm1(delta) - delta
        if kind == "k3+":
            k2 = 0.5 * delta * delta
            out = out.detach() + (k2 - k2.detach())
    else:
        raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {kind!r}")
    return out.clamp(-KL_VALUE_CLAMP, KL_VALUE_CLAMP)


def sequence_mean_kl(token_kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean_t KL_t`` over each row's response tokens: [b, s] -> [b]."""
    return masked_mean(token_kl, mask, dim=-1)


# ------------------------------------------------------------------------------ policy losses
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_sum_constant")


def clipped_surrogate(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: Optional[float] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Token-level clipped surrogate (PPO, Schulman et al. 2017 eq. 7) with separate low /
    high clips (DAPO arXiv 2503.14476) and optional dual-clip (arXiv 1912.09729):

    ``ρ_t = exp(log π − log π_old)``, ``l_t = max(−A·ρ_t, −A·clip(ρ_t, 1 − ε_low, 1 + ε_high))``,
    and for ``A < 0`` ``l_t = min(l_t, −c·A)`` with ``c = dual_clip`` (> 1).

    logps (with grad), old_logps, advantages, mask: [b, s]. Returns the per-token loss
    [b, s] (0 outside the mask; reduce with :func:`aggregate`) and detached statistics
    over the masked tokens: ``clipfrac`` (clipped term larger), ``dual_clipfrac``,
    ``ratio``, ``approx_kl`` (``(ρ − 1) − log ρ``).
    """
    _check_same_shape("logps", logps, old_logps=old_logps, advantages=advantages)
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    m = _as_mask(mask, logps, "mask")
    adv = advantages.detach()
    log_ratio = logps - old_logps.detach()
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    dual = torch.zeros_like(loss, dtype=torch.bool)
    if dual_clip is not None:
        cap = -dual_clip * adv
        dual = (adv < 0) & (loss > cap)
        loss = torch.where(dual, cap, loss)
    loss = torch.where(m != 0, loss, torch.zeros_like(loss))
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(logps.dtype), m),
            "dual_clipfrac": masked_mean(dual.to(logps.dtype), m),
            "ratio": masked_mean(ratio.detach(), m),
            "approx_kl": masked_mean((ratio - 1.0 - log_ratio).detach(), m),
        }
    return loss, stats


def reinforce_token_loss(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain on-policy REINFORCE: ``l_t = −A_t·log π_θ(y_t)`` on masked tokens, 0 elsewhere.
    [b, s] -> [b, s]."""
    _check_same_shape("logps", logps, advantages=advantages)
    m = _as_mask(mask, logps, "mask")
    return torch.where(m != 0, -advantages.detach() * logps, torch.zeros_like(logps))


def _denominator(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """:func:`aggregate`'s denominator, from the mask alone: the masked tokens
    (``token_mean``) or the rows with any (the other modes)."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"loss aggregation must be one of {AGGREGATIONS}, got {mode!r}")
    m = mask != 0
    return m.sum() if mode == "token_mean" else m.any(dim=-1).sum()


def aggregate_count(mask: torch.Tensor, mode: str = "token_mean") -> int:
    """The denominator :func:`aggregate` returns for ``mask`` [b, s], as an int (a loss's
    count before the loss exists)."""
    return int(_denominator(mask, mode))


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean",
              constant: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """This micro-batch's share of a global-batch loss, ``(numerator, denominator)``:

    - ``token_mean``: ``Σ_{i,t} l / Σ_i |o_i|``
    - ``seq_mean_token_mean``: ``(1/N) Σ_i (1/|o_i|) Σ_t l``
    - ``seq_mean_token_sum``: ``(1/N) Σ_{i,t} l``
    - ``seq_sum_constant``: ``(1/N) Σ_{i,t} l / C`` (Dr. GRPO; C e.g. the max response length)

    token_loss, mask: [b, s]. Rows with an all-zero mask count as no sequence.
    """
    m = _as_mask(mask, token_loss, "mask")
    den = _denominator(m, mode).to(token_loss.dtype)
    if mode in ("token_mean", "seq_mean_token_sum"):
        return masked_sum(token_loss, m), den
    if mode == "seq_mean_token_mean":
        lengths = (m != 0).sum(-1)
        per_seq = masked_sum(token_loss, m, dim=-1) / lengths.clamp(min=1).to(token_loss.dtype)
        return (per_seq * (lengths > 0).to(token_loss.dtype)).sum(), den
    if constant is None or constant <= 0:  # seq_sum_constant
        raise ValueError("seq_sum_constant needs a positive constant (e.g. the max response length)")
    return masked_sum(token_loss, m) / constant, den


def _ratio_stats(logps, old_logps, mask, clipped: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Detached per-token ``ratio``, ``approx_kl`` and the share of ``clipped`` tokens."""
    m = _as_mask(mask, logps, "mask")
    with torch.no_grad():
        log_ratio = logps.detach() - old_logps.detach()
        ratio = log_ratio.exp()
        return {"clipfrac": masked_mean(clipped.to(logps.dtype), m), "dual_clipfrac": torch.zeros((), dtype=logps.dtype),
                "ratio": masked_mean(ratio, m), "approx_kl": masked_mean(ratio - 1.0 - log_ratio, m)}


def gspo_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_low: float = 3e-4, clip_high: float = 4e-4) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """GSPO (Zheng et al. 2025, arXiv 2507.18071, eqs. 5-7): the sequence-level ratio
    ``s_i = exp((1/|o_i|) Σ_t (log π(y_t) − log π_old(y_t)))`` (the geometric mean of the
    token ratios) clipped per sequence,
    ``l_i = max(−A_i·s_i, −A_i·clip(s_i, 1 − ε_low, 1 + ε_high))`` with ``A_i`` the
    sequence's advantage (its tokens' mean advantage).

    logps (with grad), old_logps, advantages, mask: [b, s]. Returns ``l_i`` on every
    masked token of row ``i`` [b, s] (aggregated with ``seq_mean_token_mean`` it is the
    paper's ``(1/G) Σ_i l_i``) and detached statistics; ``clipfrac`` counts tokens of
    clipped sequences.
    """
    _check_same_shape("logps", logps, old_logps=old_logps, advantages=advantages)
    m = _as_mask(mask, logps, "mask")
    lengths = (m != 0).sum(-1).clamp(min=1).to(logps.dtype)
    seq_log_ratio = masked_sum(logps - old_logps.detach(), m, dim=-1) / lengths  # [b]
    adv = masked_sum(advantages.detach(), m, dim=-1) / lengths
    ratio = seq_log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_seq = torch.maximum(unclipped, clipped)
    loss = torch.where(m != 0, per_seq[:, None].expand_as(logps), torch.zeros_like(logps))
    stats = _ratio_stats(logps, old_logps, m, (clipped > unclipped)[:, None].expand_as(logps))
    with torch.no_grad():
        stats["ratio"] = masked_mean(ratio.detach()[:, None].expand_as(logps), m)  # the sequence ratio s_i per token
    return loss, stats


def cispo_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                     clip_low: float = 1.0, clip_high: float = 4.0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """CISPO (MiniMax-M1, arXiv 2506.13585, eqs. 4-5): the REINFORCE token loss weighted
    by the clipped, stop-gradient importance weight,
    ``l_t = −sg(clip(ρ_t, 1 − ε_low, 1 + ε_high))·A_t·log π(y_t)``, ``ρ_t = π(y_t) / π_old(y_t)``:
    every token keeps a gradient (none is dropped by the clip, unlike PPO's). The defaults
    put no lower bound (``ε_low = 1``: ρ > 0 anyway, as the paper does) and cap the
    weight at 5 (``ε_high = 4``; ScaleRL, arXiv 2510.13786, and TRL use ε_max = 5).

    [b, s] -> the per-token loss [b, s] and detached statistics (``clipfrac``: weights clipped).
    """
    _check_same_shape("logps", logps, old_logps=old_logps, advantages=advantages)
    m = _as_mask(mask, logps, "mask")
    ratio = (logps.detach() - old_logps.detach()).exp()
    weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.where(m != 0, -weight * advantages.detach() * logps, torch.zeros_like(logps))
    return loss, _ratio_stats(logps, old_logps, m, weight != ratio)


PolicyLossFn = Callable[..., Tuple[torch.Tensor, Dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class PolicyLoss:
    """A registered ``fn(logps, old_logps, advantages, mask, options) -> (loss [b, s], stats)``
    and its default clip range (None: the config's ``clip_eps``)."""

    fn: PolicyLossFn
    clip_low: Optional[float] = None
    clip_high: Optional[float] = None


POLICY_LOSSES: Dict[str, PolicyLoss] = {}


def register_policy_loss(name: str, *, clip_low: Optional[float] = None,
                         clip_high: Optional[float] = None) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Register ``fn(logps, old_logps, advantages, mask, options)`` as ``pg.loss = name``,
    with its default clip range."""

    def add(fn: PolicyLossFn) -> PolicyLossFn:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered")
        POLICY_LOSSES[name] = PolicyLoss(fn, clip_low, clip_high)
        return fn

    return add


@register_policy_loss("clipped")
def _clipped(logps, old_logps, adv, mask, o):
    return clipped_surrogate(logps, old_logps, adv, mask, o.clip_low, o.clip_high, o.dual_clip)


@register_policy_loss("reinforce")
def _reinforce(logps, old_logps, adv, mask, o):
    # the ratio to the rollout policy is still worth watching (1 on the first update)
    _, stats = clipped_surrogate(logps.detach(), old_logps, adv, mask, o.clip_low, o.clip_high)
    stats["clipfrac"] = torch.zeros_like(stats["clipfrac"])
    return reinforce_token_loss(logps, adv, mask), stats


@register_policy_loss("gspo", clip_low=3e-4, clip_high=4e-4)  # the paper's ranges (section 5.1)
def _gspo(logps, old_logps, adv, mask, o):
    return gspo_token_loss(logps, old_logps, adv, mask, o.clip_low, o.clip_high)


@register_policy_loss("cispo", clip_low=1.0, clip_high=4.0)
def _cispo(logps, old_logps, adv, mask, o):
    return cispo_token_loss(logps, old_logps, adv, mask, o.clip_low, o.clip_high)


@dataclass
class PolicyLossOptions:
    """How :func:`policy_objective` turns per-token log-probs into the objective:

    kind: a key of :data:`POLICY_LOSSES`: ``clipped`` (:func:`clipped_surrogate`),
    ``reinforce`` (``−A·log π``, on-policy, no ratio), ``gspo`` (:func:`gspo_token_loss`),
    ``cispo`` (:func:`cispo_token_loss`). aggregation / constant: :func:`aggregate`'s mode. kl_coef /
    kl_estimator: a KL term ``kl_coef · aggregate(KL_t)`` in the loss (0: none).
    entropy_coef: minus the aggregated entropy.
    """

    kind: str = "clipped"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: Optional[float] = None
    aggregation: str = "token_mean"
    constant: Optional[float] = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0


def policy_objective(options: PolicyLossOptions, logps: torch.Tensor, entropy: torch.Tensor, batch: dict):
    """One micro-batch's policy loss: ``(numerator, denominator, sums)``.

    logps (with grad), entropy: [b, s] per token of ``batch["tokens"]``; batch:
    ``old_logps``, ``advantages``, ``loss_mask`` [b, s] (and ``ref_logps`` with a KL term).
    ``sums``: name -> ``(sum, count)`` of the quantities worth logging, per token:
    ``loss/policy``, ``loss/kl`` (with a KL term), ``policy/entropy``, ``policy/ratio``,
    ``policy/clipfrac``, ``policy/approx_kl``, ``policy/dual_clipfrac`` (with dual clip).
    """
    o = options
    mask = batch["loss_mask"]
    adv = batch["advantages"]
    if o.kind not in POLICY_LOSSES:
        raise ValueError(f"policy loss must be one of {sorted(POLICY_LOSSES)}, got {o.kind!r}")
    token_loss, stats = POLICY_LOSSES[o.kind].fn(logps, batch["old_logps"], adv, mask, o)
    num, den = aggregate(token_loss, mask, o.aggregation, o.constant)
    tokens = mask.sum()
    sums = {"loss/policy": (num.detach(), den)}
    total = num
    if o.kl_coef:
        kl = kl_estimate(logps, batch["ref_logps"], o.kl_estimator)
        kl_num, _ = aggregate(kl, mask, o.aggregation, o.constant)
        total = total + o.kl_coef * kl_num
        sums["loss/kl"] = (kl_num.detach(), den)
    if o.entropy_coef:
        ent_num, _ = aggregate(entropy, mask, o.aggregation, o.constant)
        total = total - o.entropy_coef * ent_num
    with torch.no_grad():
        ent = (entropy.detach() * mask).sum()
    sums["policy/entropy"] = (ent, tokens)
    for k in ("ratio", "clipfrac", "approx_kl"):
        sums[f"policy/{k}"] = (stats[k] * tokens, tokens)
    if o.dual_clip is not None and o.kind == "clipped":
        sums["policy/dual_clipfrac"] = (stats["dual_clipfrac"] * tokens, tokens)
    return total, den, sums
