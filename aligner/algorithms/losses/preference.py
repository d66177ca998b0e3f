"""The DPO family: DPO, IPO, RPO (sq / fwd KL / bwd KL), margin and scaled DPO, the
reference-free ORPO and SimPO, and the entry point :func:`preference_loss` with the
optional SFT term (docs/dpo.md).

Every per-pair loss is registered by name with :func:`register_preference_loss`, which
declares the pair fields it reads beyond the four log-probs and β (``strength``,
``margin``, ``reward_gap``, ``eta``, ``gamma``): :func:`preference_loss` passes exactly
those, and the DPO trainer checks the data and the config against them (``dpo.eta`` and
``dpo.gamma`` only for losses that read them; every pair carries ``reward_gap`` for those
that read that). A loss registered with ``reference=False`` reads no reference log-probs
(the trainer runs no reference pass and keeps no reference weights for it); one
registered with ``length_normalised=True`` is defined on per-token mean log-probs, which
the trainer then gives it whatever ``dpo.average_log_probs`` says.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from aligner.algorithms.losses.common import LossAndStats, Stats, _check_pairs, _check_same_shape, _mean, _strength

PreferenceLossFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class PreferenceLoss:
    """A registered per-pair loss ``fn(pc, pr, rc, rr, beta, **inputs) -> [b]`` and the
    pair fields it reads (``inputs``)."""

    fn: PreferenceLossFn
    inputs: Tuple[str, ...] = ()
    reference: bool = True  # reads the reference log-probs (False: rc, rr are zeros)
    length_normalised: bool = False  # defined on per-token mean log-probs


PREFERENCE_LOSSES: Dict[str, PreferenceLoss] = {}
PAIR_INPUTS = ("strength", "margin", "reward_gap", "eta", "gamma")  # what a loss may declare


def register_preference_loss(name: str, *, inputs: Tuple[str, ...] = (), reference: bool = True,
                             length_normalised: bool = False) -> Callable[[PreferenceLossFn], PreferenceLossFn]:
    """Register a per-pair loss ``fn(pc, pr, rc, rr, beta, **inputs) -> [b]`` as
    ``dpo.loss_type = name``; ``inputs``: the pair fields of :data:`PAIR_INPUTS` it reads;
    ``reference=False``: it needs no reference model; ``length_normalised=True``: its
    log-probs are per-token means."""
    unknown = sorted(set(inputs) - set(PAIR_INPUTS))
    if unknown:
        raise ValueError(f"preference loss {name!r}: inputs {unknown} are not among {list(PAIR_INPUTS)}")

    def add(fn: PreferenceLossFn) -> PreferenceLossFn:
        if name in PREFERENCE_LOSSES:
            raise ValueError(f"preference loss {name!r} is already registered")
        PREFERENCE_LOSSES[name] = PreferenceLoss(fn, tuple(inputs), reference, length_normalised)
        return fn

    return add


def _implicit_reward_stats(beta: float, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                           ref_rejected_logps) -> Stats:
    rc = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rr = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return {
        "rewards/chosen": rc.float().mean(),
        "rewards/rejected": rr.float().mean(),
        "rewards/margins": (rc - rr).float().mean(),
        "rewards/accuracy": (rc > rr).float().mean(),
        "logps/chosen": _mean(policy_chosen_logps),
        "logps/rejected": _mean(policy_rejected_logps),
    }


def _delta(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps) -> torch.Tensor:
    """``Δ = ρ_c − ρ_r`` with ``ρ = logπ − logπ_ref`` per sequence (summed or averaged by the caller)."""
    _check_pairs(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def _reward_gap(reward_gap, like: torch.Tensor, kind: str) -> torch.Tensor:
    if reward_gap is None:
        raise ValueError(f"kind {kind!r} needs `reward_gap` = r*_chosen − r*_rejected per pair")
    gap = torch.as_tensor(reward_gap, dtype=like.dtype, device=like.device)
    if gap.shape != like.shape:
        raise ValueError(f"reward_gap has shape {tuple(gap.shape)}; expected {tuple(like.shape)}")
    return gap


@register_preference_loss("dpo")
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta) -> torch.Tensor:
    """DPO (docs/dpo.md): ``−logσ(βΔ)`` per pair, [b] -> [b].

    Identical chosen and rejected (Δ = 0) give ``ln 2 = 0.693147``.
    """
    delta = _delta(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -F.logsigmoid(beta * delta)


@register_preference_loss("ipo")
def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta) -> torch.Tensor:
    """IPO (docs/dpo.md): ``(Δ − 1/(2β))²`` per pair, [b] -> [b]."""
    delta = _delta(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (delta - 1.0 / (2.0 * beta)) ** 2


@register_preference_loss("rpo_sq", inputs=("reward_gap", "eta"))
def rpo_sq_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                reward_gap=None, eta=1.0) -> torch.Tensor:
    """Reward-aware PO, squared (docs/dpo.md): ``(βΔ − η(r*_c − r*_r))²`` per pair.

    reward_gap: [b] ground-truth ``r*_c − r*_r``; eta: its scale ``η``.
    """
    delta = _delta(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    gap = _reward_gap(reward_gap, delta, "rpo_sq")
    return (beta * delta - eta * gap) ** 2


def _bernoulli_kl(logit_p: torch.Tensor, logit_q: torch.Tensor) -> torch.Tensor:
    """``KL(Bern(σ(logit_p)) ‖ Bern(σ(logit_q)))``, computed from log-sigmoids (stable)."""
    log_p, log_1mp = F.logsigmoid(logit_p), F.logsigmoid(-logit_p)
    log_q, log_1mq = F.logsigmoid(logit_q), F.logsigmoid(-logit_q)
    return log_p.exp() * (log_p - log_q) + log_1mp.exp() * (log_1mp - log_1mq)


@register_preference_loss("rpo_fwd_kl", inputs=("reward_gap", "eta"))
def rpo_fwd_kl_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                    reward_gap=None, eta=1.0) -> torch.Tensor:
    """Reward-aware PO, forward KL (docs/dpo.md): the reverse direction of
    :func:`rpo_bwd_kl_loss`, ``KL(Bern(σ(βΔ)) ‖ Bern(σ(η(r*_c − r*_r))))`` per pair."""
    delta = _delta(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    gap = _reward_gap(reward_gap, delta, "rpo_fwd_kl")
    return _bernoulli_kl(beta * delta, eta * gap)


@register_preference_loss("rpo_bwd_kl", inputs=("reward_gap", "eta"))
def rpo_bwd_kl_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                    reward_gap=None, eta=1.0) -> torch.Tensor:
    """Reward-aware PO, backward KL (docs/dpo.md):
    ``KL(Bern(σ(η(r*_c − r*_r))) ‖ Bern(σ(βΔ)))`` per pair — the target distribution first."""
    delta = _delta(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    gap = _reward_gap(reward_gap, delta, "rpo_bwd_kl")
    return _bernoulli_kl(eta * gap, beta * delta)


@register_preference_loss("margin_dpo", inputs=("strength", "margin"))
def margin_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                    strength=None, margin=None) -> torch.Tensor:
    """Margin DPO from preference strength (docs/dpo.md, HelpSteer2-Preference):
    the margin Bradley-Terry loss on the implicit reward difference, ``−logσ(βΔ − m)``
    per pair, ``m`` = ``margin`` when given, else ``|strength|``."""
    delta = _delta(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if margin is not None:
        m = torch.as_tensor(margin, dtype=delta.dtype, device=delta.device)
        _check_same_shape("policy_chosen_logps", delta, margin=m)
    else:
        m = _strength(strength, delta, "margin_dpo")
    return -F.logsigmoid(beta * delta - m)


@register_preference_loss("scaled_dpo", inputs=("strength",))
def scaled_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                    strength=None) -> torch.Tensor:
    """Scaled DPO from preference strength (docs/dpo.md, HelpSteer2-Preference):
    the scaled Bradley-Terry loss on the implicit reward difference, ``−m·logσ(βΔ)`` per
    pair with ``m = |strength|``."""
    delta = _delta(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -_strength(strength, delta, "scaled_dpo") * F.logsigmoid(beta * delta)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − eˣ)`` for ``x < 0``, accurate at both ends (Mächler 2012: log(−expm1 x)
    near 0, log1p(−eˣ) below −ln 2)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@register_preference_loss("orpo", reference=False, length_normalised=True)
def orpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta) -> torch.Tensor:
    """ORPO's odds-ratio term (Hong et al. 2024, arXiv 2403.07691, eqs. 4-7), [b] -> [b]:
    ``−β·logσ(log(odds(y_c) / odds(y_r)))`` with ``odds(y) = P(y) / (1 − P(y))`` and
    ``log P(y) = (1/|y|) Σ_t log π(y_t)`` (per-token mean), so
    ``log odds ratio = (ℓ_c − ℓ_r) − (log(1 − e^ℓ_c) − log(1 − e^ℓ_r))``.

    β is the paper's λ; the paper's full objective adds the chosen response's NLL
    (``dpo.sft_weight = 1``). No reference: ``ref_*`` are ignored.
    """
    _check_pairs(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    log_odds = (policy_chosen_logps - policy_rejected_logps) - (
        _log1mexp(policy_chosen_logps) - _log1mexp(policy_rejected_logps))
    return -beta * F.logsigmoid(log_odds)


@register_preference_loss("simpo", inputs=("gamma",), reference=False, length_normalised=True)
def simpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
               gamma=0.5) -> torch.Tensor:
    """SimPO (Meng et al. 2024, arXiv 2405.14734, eq. 6), [b] -> [b]:
    ``−logσ(β·ℓ_c − β·ℓ_r − γ)`` with ``ℓ = (1/|y|) Σ_t log π(y_t)`` the per-token mean
    (the length-normalised reward is ``β·ℓ``) and ``γ`` the target reward margin
    (``dpo.gamma``). No reference: ``ref_*`` are ignored.
    """
    _check_pairs(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    return -F.logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps) - gamma)


def preference_loss(
    kind: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    *,
    strength: Optional[torch.Tensor] = None,
    margin: Optional[torch.Tensor] = None,
    reward_gap: Optional[torch.Tensor] = None,
    eta: float = 1.0,
    gamma: float = 0.5,
    chosen_nll: Optional[torch.Tensor] = None,
    sft_weight: float = 0.0,
    preference_weight: float = 1.0,
) -> LossAndStats:
    """The DPO family's entry point (docs/dpo.md).

    ``total = preference_weight · mean_pairs(L_kind) + sft_weight · mean_pairs(chosen_nll)``

    Inputs are per-sequence quantities [b]: policy and reference log-probs of the chosen
    and rejected responses, each summed over response tokens or averaged per token (see
    :func:`sequence_logps`; both of a pair must use the same reduction). ``kind`` is a key
    of :data:`PREFERENCE_LOSSES`: ``dpo``, ``ipo``, ``rpo_sq``, ``rpo_fwd_kl``,
    ``rpo_bwd_kl``, ``margin_dpo``, ``scaled_dpo``, ``orpo``, ``simpo``, or one registered
    later. Kind-specific inputs: ``strength`` (|preference_strength|, margin/scaled),
    ``margin`` (margin_dpo, instead of strength), ``reward_gap`` and ``eta`` (RPO),
    ``gamma`` (SimPO); the loss receives those it declared, so a trainer may always pass
    its batch's fields. For the reference-free kinds the caller passes zeros as ``ref_*``
    (the implicit rewards are then ``β·logπ``).

    ``chosen_nll`` [b]: the SFT term's per-sequence NLL of the chosen response,
    ``−mean_t log π(y_t)``; required when ``sft_weight > 0``.

    Stats: ``loss``, ``loss/preference``, ``loss/sft`` (when chosen_nll is given),
    ``rewards/chosen`` = mean βρ_c, ``rewards/rejected`` = mean βρ_r, ``rewards/margins``
    = mean βΔ, ``rewards/accuracy`` = fraction βρ_c > βρ_r, ``logps/chosen``,
    ``logps/rejected``.
    """
    if kind not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss {kind!r}; one of {sorted(PREFERENCE_LOSSES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    entry = PREFERENCE_LOSSES[kind]
    given = {"strength": strength, "margin": margin, "reward_gap": reward_gap, "eta": eta, "gamma": gamma}
    per_pair = entry.fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                        **{k: given[k] for k in entry.inputs})
    pref = per_pair.mean()
    total = preference_weight * pref
    stats: Stats = {"loss/preference": pref.detach()}
    if sft_weight and chosen_nll is None:
        raise ValueError("sft_weight > 0 needs chosen_nll (−mean log π of each chosen response)")
    if chosen_nll is not None:
        _check_pairs(policy_chosen_logps=policy_chosen_logps, chosen_nll=chosen_nll)
        sft = chosen_nll.mean()
        stats["loss/sft"] = sft.detach()
        if sft_weight:
            total = total + sft_weight * sft
    stats["loss"] = total.detach()
    stats.update(_implicit_reward_stats(beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                        ref_rejected_logps))
    return total, stats
