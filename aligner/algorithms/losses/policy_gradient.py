"""Policy-gradient losses and advantage estimators: KL penalties, PPO token rewards, GAE,
clipped surrogate (with clip-higher and dual-clip) and value losses, RLOO and REINFORCE
(docs/ppo.md, docs/reinforce.md).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from aligner.algorithms.losses.common import Group, LossAndStats, Stats, _as_mask, _check_same_shape, _mean, masked_mean


KL_KINDS = ("abs", "k1", "k3")


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, kind: str = "abs",
               clamp_log_ratio: float = 20.0, clamp_estimate: float = 10.0) -> torch.Tensor:
    """Per-token KL estimate between the sampling policy and the initial one
    (docs/ppo.md, "KL penalty"): with ``d = log π_old(y_t) − log π_init(y_t)`` clamped to
    ``±clamp_log_ratio``,

    - ``abs``: ``|d|`` (the default of the tool that came before)
    - ``k1``:  ``d``
    - ``k3``:  ``exp(−d) − 1 + d`` (non-negative, unbiased for KL(π_old ‖ π_init))

    and the estimate clamped to ``±clamp_estimate`` (one wild token cannot dominate a
    sequence's reward). logps, ref_logps: [b, s] -> [b, s].
    """
    _check_same_shape("logps", logps, ref_logps=ref_logps)
    d = (logps - ref_logps).clamp(-clamp_log_ratio, clamp_log_ratio)
    if kind == "abs":
        est = d.abs()
    elif kind == "k1":
        est = d
    elif kind == "k3":
        est = torch.expm1(-d) + d
    else:
        raise ValueError(f"KL estimator must be one of {KL_KINDS}, got {kind!r}")
    return est.clamp(-clamp_estimate, clamp_estimate)


def _last_index(mask: torch.Tensor) -> torch.Tensor:
    s = mask.shape[-1]
    has = (mask != 0).any(-1)
    if not bool(has.all()):
        raise ValueError(f"rows {has.logical_not().nonzero().flatten().tolist()} have no response token in the mask")
    return s - 1 - (mask != 0).flip(-1).float().argmax(-1)


def ppo_token_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    init_logps: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_kind: str = "abs",
) -> LossAndStats:
    """Per-token rewards for PPO (docs/ppo.md).

    ``r_t = −kl_coef · KL_t`` on every response token, plus the reward model's score on
    the last response token; 0 outside the mask. scores: [b]; logps (of the sampling
    policy π_old), init_logps (π_init), mask: [b, s]. Returns ``(rewards [b, s], stats)``;
    stats: ``kl`` (mean per-token KL over response tokens), ``score``.
    """
    if scores.dim() != 1 or scores.shape[0] != logps.shape[0]:
        raise ValueError(f"scores must be [b] = [{logps.shape[0]}], got shape {tuple(scores.shape)}")
    m = _as_mask(mask, logps, "mask").detach()
    kl = kl_penalty(logps.detach(), init_logps.detach(), kl_kind)
    rewards = torch.where(m != 0, -kl_coef * kl, torch.zeros_like(kl))
    last = _last_index(m)
    rewards = rewards.clone()
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards, {"kl": masked_mean(kl.detach(), m), "score": _mean(scores)}


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (docs/ppo.md).

    ``δ_t = r_t + γ·V_{t+1} − V_t``, ``A_t = δ_t + γλ·A_{t+1}``, ``R_t = A_t + V_t``,
    over the masked (response) positions of each row: "t+1" is the next masked position,
    and past the last one ``V = A = 0`` (the episode ends). Positions outside the mask get
    0. rewards, values, mask: [b, s]. Returns ``(advantages, returns)`` [b, s], detached.
    Whitening across the data-parallel batch is separate: :func:`masked_whiten`.
    """
    _check_same_shape("rewards", rewards, values=values)
    m = _as_mask(mask, rewards, "mask").detach() != 0
    rewards, values = rewards.detach(), values.detach()
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a_t = delta + gamma * lam * next_adv
        here = m[:, t]
        adv[:, t] = torch.where(here, a_t, torch.zeros_like(a_t))
        next_value = torch.where(here, values[:, t], next_value)
        next_adv = torch.where(here, a_t, next_adv)
    returns = torch.where(m, adv + values, torch.zeros_like(adv))
    return adv, returns


def clipped_surrogate(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: Optional[float] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Token-level clipped surrogate with separate low / high clips and optional dual-clip
    (DAPO arXiv 2503.14476; dual-clip arXiv 1912.09729):

    ``l_t = max(−A·ρ_t, −A·clip(ρ_t, 1 − ε_low, 1 + ε_high))``, and for ``A < 0``
    ``l_t = min(l_t, −c·A)`` with ``c = dual_clip`` (> 1).

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


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    entropy: Optional[torch.Tensor] = None,
    entropy_coef: float = 0.0,
    clip_eps_low: Optional[float] = None,
    clip_eps_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
) -> LossAndStats:
    """PPO clipped policy loss (Schulman et al. 2017, eq. 7; docs/ppo.md).

    ``ratio = exp(log π − log π_old)``;
    ``l_t = max(−A·ratio, −A·clip(ratio, 1−ε_low, 1+ε_high))`` (ε_low = ε_high = ``clip_eps``
    unless given: "clip-higher" uses a larger ε_high); with ``dual_clip = c`` (> 1) tokens
    with A < 0 take ``min(l_t, −c·A)`` (Ye et al. 2020), bounding the loss of a very large
    ratio. ``L = masked_mean(l_t) − c_H · masked_mean(entropy)``, the mean over all response
    tokens of the batch. logps (with grad), old_logps, advantages, mask, entropy: [b, s].
    Sanity value: ratios 0.5/1.0/1.5, advantages 1/−1/2, ε 0.2 -> −0.6333.

    Stats: ``loss``, ``loss/policy``, ``clipfrac`` (share of tokens where the clipped term
    is the larger), ``ratio`` (mean), ``approx_kl`` (mean ``(ratio−1) − log ratio``),
    ``dual_clipfrac`` (with dual_clip), ``entropy`` (when given).
    """
    _check_same_shape("logps", logps, old_logps=old_logps, advantages=advantages, entropy=entropy)
    m = _as_mask(mask, logps, "mask")
    low = clip_eps if clip_eps_low is None else clip_eps_low
    high = clip_eps if clip_eps_high is None else clip_eps_high
    per_token, token_stats = clipped_surrogate(logps, old_logps, advantages, m, low, high, dual_clip)
    policy = masked_mean(per_token, m)
    loss = policy
    stats: Stats = {"loss/policy": policy.detach(), "clipfrac": token_stats["clipfrac"],
                    "ratio": token_stats["ratio"], "approx_kl": token_stats["approx_kl"]}
    if dual_clip is not None:
        stats["dual_clipfrac"] = token_stats["dual_clipfrac"]
    if entropy_coef and entropy is None:
        raise ValueError("entropy_coef > 0 needs the per-token entropy [b, s]")
    if entropy is not None:
        ent = masked_mean(entropy, m)
        stats["entropy"] = ent.detach()
        if entropy_coef:
            loss = loss - entropy_coef * ent
    stats["loss"] = loss.detach()
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> LossAndStats:
    """PPO clipped value loss (docs/ppo.md).

    ``V_c = V_old + clip(V − V_old, −c, c)``; ``L = 0.5 · masked_mean(max((V_c − R)², (V − R)²))``.
    values (with grad), old_values, returns, mask: [b, s].
    Stats: ``loss``, ``clipfrac`` (share of tokens where the clipped error is the larger),
    ``values`` (mean), ``returns`` (mean).
    """
    _check_same_shape("values", values, old_values=old_values, returns=returns)
    m = _as_mask(mask, values, "mask")
    old, ret = old_values.detach(), returns.detach()
    v_clipped = old + (values - old).clamp(-clip, clip)
    err_clipped, err = (v_clipped - ret) ** 2, (values - ret) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err_clipped, err), m)
    stats = {
        "loss": loss.detach(),
        "clipfrac": masked_mean((err_clipped > err).to(values.dtype), m).detach(),
        "values": masked_mean(values.detach(), m),
        "returns": masked_mean(ret, m),
    }
    return loss, stats


def _group_ids(group: Group, n: int, device) -> Tuple[torch.Tensor, int]:
    """Group id per row: consecutive blocks of ``group`` rows, or explicit ids [n]."""
    if isinstance(group, int):
        if group < 1 or n % group:
            raise ValueError(f"{n} rows do not split into groups of {group} consecutive rows")
        return torch.arange(n, device=device) // group, n // group
    ids = torch.as_tensor(group, device=device).long()
    if ids.shape != (n,):
        raise ValueError(f"group ids must be [{n}], got shape {tuple(ids.shape)}")
    uniq, ids = torch.unique(ids, return_inverse=True)
    return ids, uniq.numel()


def _group_sum(x: torch.Tensor, ids: torch.Tensor, g: int) -> torch.Tensor:
    return torch.zeros(g, dtype=x.dtype, device=x.device).index_add(0, ids, x)


def group_softmax(logits: torch.Tensor, group: Group) -> torch.Tensor:
    """Softmax of [b] logits within each group (see :func:`rloo_advantages` for ``group``)."""
    ids, g = _group_ids(group, logits.shape[0], logits.device)
    peak = torch.full((g,), -math.inf, dtype=logits.dtype, device=logits.device).scatter_reduce(
        0, ids, logits, reduce="amax")
    e = (logits - peak[ids]).exp()
    return e / _group_sum(e, ids, g)[ids]


def rloo_advantages(
    rewards: torch.Tensor,
    group: Group,
    seq_kl: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (docs/ppo.md).

    ``r'_i = r_i − β·mean_t KL_t`` and ``A_i = r'_i − mean_{j≠i} r'_j`` within the prompt's
    group of k samples. rewards, seq_kl (per-sequence mean KL over response tokens, e.g.
    ``masked_mean(kl_penalty(...), mask, dim=-1)``): [b]. ``group``: k (rows come in
    consecutive blocks of k samples of one prompt) or [b] group ids. Every group needs
    at least 2 samples. Returns [b], detached.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [b], got shape {tuple(rewards.shape)}")
    r = rewards.detach()
    if kl_coef and seq_kl is None:
        raise ValueError("kl_coef > 0 needs seq_kl (per-sequence mean KL)")
    if seq_kl is not None:
        _check_same_shape("rewards", rewards, seq_kl=seq_kl)
        r = r - kl_coef * seq_kl.detach().to(r.dtype)
    ids, g = _group_ids(group, r.shape[0], r.device)
    sizes = _group_sum(torch.ones_like(r), ids, g)
    if bool((sizes < 2).any()):
        raise ValueError("RLOO needs at least 2 samples per prompt; a group has fewer")
    total = _group_sum(r, ids, g)[ids]
    baseline = (total - r) / (sizes[ids] - 1)
    return r - baseline


def reinforce_loss(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> LossAndStats:
    """REINFORCE / RLOO policy loss (docs/ppo.md):
    ``L = masked_mean(−log π(y_t) · A)`` over all response tokens of the batch.

    logps (with grad), mask: [b, s]; advantages: [b] per sequence (broadcast over the
    token axis explicitly, whatever the micro-batch size) or [b, s] per token.
    Stats: ``loss``, ``advantages`` (mean per sequence).
    """
    if advantages.dim() == 1:
        if advantages.shape[0] != logps.shape[0]:
            raise ValueError(f"advantages [b] has b={advantages.shape[0]}; logps has b={logps.shape[0]}")
        adv = advantages.detach().unsqueeze(-1).expand_as(logps)
    else:
        _check_same_shape("logps", logps, advantages=advantages)
        adv = advantages.detach()
    m = _as_mask(mask, logps, "mask")
    loss = masked_mean(-logps * adv.to(logps.dtype), m)
    return loss, {"loss": loss.detach(), "advantages": _mean(advantages)}
