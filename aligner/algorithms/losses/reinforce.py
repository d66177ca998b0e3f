"""The REINFORCE family: group advantage estimators, token-level policy losses, KL terms,
loss aggregation and the DAPO options (docs/reinforce.md).

Estimators are registered by name (:data:`ADVANTAGE_ESTIMATORS`, :func:`advantages`), so a
new one is one decorated function and one config value. Every estimator takes sequence
rewards ``[b]``, the group id of each row and a ``valid`` flag, and returns per-token
advantages ``[b, s]`` (detached) broadcast explicitly over the response tokens of each
row, whatever the micro-batch size.

Conventions pinned here (peers differ; see docs/reinforce.md):

- ``valid``: rows that count. A row marked invalid (e.g. a response that hit the length
  limit without EOS, with ``exclude_truncated``) gets advantage 0 and is left out of its
  group's baseline and statistics.
- ``rloo``: ``A_i = r'_i − mean_{j≠i, valid} r'_j`` with ``r'_i = r_i − β·mean_t KL_t``;
  a row whose group has no other valid row gets 0 (there is no baseline to compare with).
- ``grpo``: ``A_i = (r_i − mean_G r) / (std_G r + ε)``, std Bessel-corrected (ddof 1),
  ε = 1e-6. A group with one valid row gets 0; a group whose rewards are all equal gets 0
  (the numerator is 0), so it adds no gradient.
- ``dr_grpo``: ``A_i = r_i − mean_G r`` (no std); pair it with ``seq_sum_constant``.
- ``reinforce_pp``: token rewards ``r_t = 1[t = last] r − β·KL_t``, returns
  ``G_t = Σ_{s≥t} γ^{s−t} r_s``; whitened over all valid tokens of the GLOBAL batch by the
  caller (:func:`aligner.algorithms.losses.common.masked_whiten` with summed moments).
  ``reinforce_pp_baseline`` first subtracts the group mean of the sequence rewards.

Shapes: ``b`` rows (responses), ``s`` positions; ``mask`` [b, s] is 1 on response tokens.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from aligner.algorithms.losses.common import LossAndStats, _as_mask, _check_same_shape, masked_mean, masked_sum
from aligner.algorithms.losses.policy_gradient import _group_ids, _group_sum, clipped_surrogate  # noqa: F401

GRPO_EPS = 1e-6

AdvantageFn = Callable[..., torch.Tensor]
ADVANTAGE_ESTIMATORS: Dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Register an advantage estimator under ``name`` (the ``pg.advantage`` config value)."""

    def wrap(fn: AdvantageFn) -> AdvantageFn:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is registered twice")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return wrap


def _prepare(rewards: torch.Tensor, group, valid: Optional[torch.Tensor]):
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [b], got shape {tuple(rewards.shape)}")
    if not bool(torch.isfinite(rewards).all()):
        bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
        raise ValueError(f"rewards of rows {bad} are not finite")
    r = rewards.detach().double()
    v = torch.ones_like(r, dtype=torch.bool) if valid is None else valid.detach().to(torch.bool).reshape(-1)
    if v.shape != r.shape:
        raise ValueError(f"valid must be [b] = [{r.shape[0]}], got shape {tuple(v.shape)}")
    ids, g = _group_ids(group, r.shape[0], r.device)
    return r, v, ids, g


def _broadcast(seq_adv: torch.Tensor, mask: torch.Tensor, like_dtype) -> torch.Tensor:
    m = _as_mask(mask, mask.float(), "mask")
    if m.shape[0] != seq_adv.shape[0]:
        raise ValueError(f"mask has {m.shape[0]} rows, the rewards {seq_adv.shape[0]}")
    return (seq_adv.unsqueeze(-1) * (m != 0)).to(like_dtype)


def group_stats(rewards: torch.Tensor, group, valid: Optional[torch.Tensor] = None):
    """Per-row group size, mean and Bessel std over the valid rows of each group. [b] each."""
    r, v, ids, g = _prepare(rewards, group, valid)
    w = v.double()
    n = _group_sum(w, ids, g)
    mean = _group_sum(r * w, ids, g) / n.clamp(min=1)
    sq = _group_sum(((r - mean[ids]) ** 2) * w, ids, g)
    std = (sq / (n - 1).clamp(min=1)).sqrt()
    return n[ids], mean[ids], std[ids]


@register_advantage("rloo")
def rloo_token_advantages(rewards, mask, group, valid=None, seq_kl=None, kl_coef: float = 0.0, **_) -> torch.Tensor:
    """RLOO: ``r'_i = r_i − β·mean_t KL_t``, ``A_i = r'_i − mean_{j≠i} r'_j`` over the valid
    rows of the group (docs/reinforce.md; HelpSteer2-Preference, arXiv 2410.01257). Equals
    ``G/(G−1)·(r'_i − mean_G r')`` for a group of G valid rows. [b] -> [b, s]."""
    r, v, ids, g = _prepare(rewards, group, valid)
    if kl_coef:
        if seq_kl is None:
            raise ValueError("rloo with kl_coef > 0 needs seq_kl (the per-sequence mean KL)")
        r = r - kl_coef * seq_kl.detach().double().reshape(-1)
    w = v.double()
    n = _group_sum(w, ids, g)[ids]
    total = _group_sum(r * w, ids, g)[ids]
    others = n - 1
    adv = torch.where((others > 0) & v, r - (total - r) / others.clamp(min=1), torch.zeros_like(r))
    return _broadcast(adv, mask, rewards.dtype)


@register_advantage("grpo")
def grpo_token_advantages(rewards, mask, group, valid=None, eps: float = GRPO_EPS, **_) -> torch.Tensor:
    """GRPO: ``A_i = (r_i − mean_G r) / (std_G r + ε)``, Bessel std, ε = 1e-6 (DeepSeekMath,
    arXiv 2402.03300). A lone valid row or an all-equal group gets 0. [b] -> [b, s]."""
    r, v, ids, g = _prepare(rewards, group, valid)
    n, mean, std = group_stats(rewards, group, valid)
    adv = torch.where((n > 1) & v, (r - mean) / (std + eps), torch.zeros_like(r))
    return _broadcast(adv, mask, rewards.dtype)


@register_advantage("dr_grpo")
def dr_grpo_token_advantages(rewards, mask, group, valid=None, **_) -> torch.Tensor:
    """Dr. GRPO: ``A_i = r_i − mean_G r`` without the std division (arXiv 2503.20783).
    [b] -> [b, s]."""
    r, v, ids, g = _prepare(rewards, group, valid)
    n, mean, _std = group_stats(rewards, group, valid)
    adv = torch.where(v, r - mean, torch.zeros_like(r))
    return _broadcast(adv, mask, rewards.dtype)


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """``G_t = Σ_{s≥t, masked} γ^{(s−t)} r_s`` along each row's masked positions (the next
    masked position is the next step); 0 outside the mask. [b, s] -> [b, s], detached."""
    _check_same_shape("token_rewards", token_rewards, mask=mask.to(token_rewards.dtype))
    m = _as_mask(mask, token_rewards, "mask") != 0
    r = token_rewards.detach()
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        here = m[:, t]
        value = r[:, t] + gamma * running
        out[:, t] = torch.where(here, value, torch.zeros_like(value))
        running = torch.where(here, value, running)
    return out


def _last_positions(mask: torch.Tensor) -> torch.Tensor:
    m = mask != 0
    if not bool(m.any(-1).all()):
        rows = (~m.any(-1)).nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} have no response token in the mask")
    return m.shape[-1] - 1 - m.flip(-1).float().argmax(-1)


def _reinforce_pp(rewards, mask, group, valid, token_kl, kl_coef, gamma, baseline: bool):
    r, v, ids, g = _prepare(rewards, group, valid)
    if baseline:
        _n, mean, _std = group_stats(rewards, group, valid)
        r = r - mean
    m = _as_mask(mask, mask.float(), "mask")
    token_rewards = torch.zeros(m.shape, dtype=torch.float64, device=m.device)
    if kl_coef:
        if token_kl is None:
            raise ValueError("reinforce_pp with kl_coef > 0 needs token_kl [b, s]")
        token_rewards = token_rewards - kl_coef * token_kl.detach().double() * (m != 0)
    last = _last_positions(m)
    token_rewards[torch.arange(m.shape[0], device=m.device), last] += r
    returns = discounted_returns(token_rewards, m, gamma)
    return (returns * v.unsqueeze(-1)).to(rewards.dtype)


@register_advantage("reinforce_pp")
def reinforce_pp_token_advantages(rewards, mask, group=1, valid=None, token_kl=None, kl_coef: float = 0.0,
                                  gamma: float = 1.0, **_) -> torch.Tensor:
    """REINFORCE++ (arXiv 2501.03262): returns of ``r_t = 1[t = last]·r − β·KL_t``. NOT yet
    whitened: the caller whitens over all valid tokens of the global batch. [b] -> [b, s]."""
    return _reinforce_pp(rewards, mask, group, valid, token_kl, kl_coef, gamma, baseline=False)


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline_token_advantages(rewards, mask, group, valid=None, token_kl=None, kl_coef: float = 0.0,
                                           gamma: float = 1.0, **_) -> torch.Tensor:
    """REINFORCE++ with a group baseline: ``r − mean_G r`` first, then as ``reinforce_pp``
    (global whitening by the caller). [b] -> [b, s]."""
    return _reinforce_pp(rewards, mask, group, valid, token_kl, kl_coef, gamma, baseline=True)


# estimators whose output the caller whitens over the global batch's valid tokens
NEEDS_GLOBAL_WHITENING = frozenset({"reinforce_pp", "reinforce_pp_baseline"})


def advantages(name: str, rewards: torch.Tensor, mask: torch.Tensor, group, **options) -> torch.Tensor:
    """Dispatch to the estimator registered as ``name``."""
    try:
        fn = ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"advantage estimator must be one of {sorted(ADVANTAGE_ESTIMATORS)}, got {name!r}") from None
    return fn(rewards, mask, group, **options)


# ---------------------------------------------------------------------- KL terms

KL_ESTIMATORS = ("k1", "abs", "k2", "k3", "k3+")
KL_DELTA_CLAMP = 20.0
KL_VALUE_CLAMP = 10.0


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from samples of π_θ, with
    ``δ = log π_ref − log π_θ`` clamped to ±20 and the estimate to ±10 (docs/reinforce.md):

    - ``k1``: ``−δ``; ``abs``: ``|δ|``; ``k2``: ``δ²/2``; ``k3``: ``exp(δ) − 1 − δ``;
    - ``k3+``: the value of k3 with the gradient of k2 (an unbiased value, a low-variance
      gradient).

    logps (may carry the graph), ref_logps: [b, s] -> [b, s].
    """
    _check_same_shape("logps", logps, ref_logps=ref_logps)
    delta = (ref_logps.detach() - logps).clamp(-KL_DELTA_CLAMP, KL_DELTA_CLAMP)
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


# ---------------------------------------------------------------------- policy losses


def reinforce_token_loss(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain on-policy REINFORCE: ``l_t = −A_t·log π_θ(y_t)`` on masked tokens, 0 elsewhere.
    [b, s] -> [b, s]."""
    _check_same_shape("logps", logps, advantages=advantages)
    m = _as_mask(mask, logps, "mask")
    return torch.where(m != 0, -advantages.detach() * logps, torch.zeros_like(logps))


# ---------------------------------------------------------------------- aggregation

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_sum_constant")


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean",
              constant: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """This micro-batch's share of a GLOBAL-batch loss, as ``(numerator, denominator)``.

    The training loop sums both over every micro-batch and data-parallel rank and divides
    (megatron-core's per-token loss normalisation), so the objective is a global-batch
    quantity whatever the micro-batch size, accumulation or layout (docs/reinforce.md):

    - ``token_mean``: ``Σ_{i,t} l / Σ_i |o_i|``
    - ``seq_mean_token_mean``: ``(1/N) Σ_i (1/|o_i|) Σ_t l``
    - ``seq_mean_token_sum``: ``(1/N) Σ_{i,t} l``
    - ``seq_sum_constant``: ``(1/N) Σ_{i,t} l / C`` (Dr. GRPO; C e.g. the max response length)

    token_loss, mask: [b, s]. Rows with an all-zero mask count as no sequence.
    """
    m = _as_mask(mask, token_loss, "mask")
    lengths = (m != 0).sum(-1)
    rows = (lengths > 0).to(token_loss.dtype)
    if mode == "token_mean":
        return masked_sum(token_loss, m), (m != 0).sum().to(token_loss.dtype)
    if mode == "seq_mean_token_mean":
        per_seq = masked_sum(token_loss, m, dim=-1) / lengths.clamp(min=1).to(token_loss.dtype)
        return (per_seq * rows).sum(), rows.sum()
    if mode == "seq_mean_token_sum":
        return masked_sum(token_loss, m), rows.sum()
    if mode == "seq_sum_constant":
        if constant is None or constant <= 0:
            raise ValueError("seq_sum_constant needs a positive constant (e.g. the max response length)")
        return masked_sum(token_loss, m) / constant, rows.sum()
    raise ValueError(f"loss aggregation must be one of {AGGREGATIONS}, got {mode!r}")


# ---------------------------------------------------------------------- DAPO options


def overlong_penalty(lengths: torch.Tensor, max_length: int, cache: int) -> torch.Tensor:
    """DAPO's soft overlong penalty (arXiv 2503.14476): 0 for ``|y| ≤ L_max − L_cache``,
    ``((L_max − L_cache) − |y|) / L_cache`` inside the buffer, −1 beyond ``L_max``.
    lengths: [b] response lengths -> [b] penalties (added to the reward)."""
    if cache <= 0 or cache > max_length:
        raise ValueError(f"overlong cache must be in 1..{max_length} (the max length), got {cache}")
    y = lengths.double()
    start = max_length - cache
    inside = (start - y) / cache
    out = torch.where(y <= start, torch.zeros_like(y), inside)
    return torch.where(y > max_length, torch.full_like(y, -1.0), out)


def groups_with_signal(rewards: torch.Tensor, group, valid: Optional[torch.Tensor] = None,
                       tol: float = 0.0) -> torch.Tensor:
    """DAPO dynamic sampling: True for rows whose group's valid rewards are not all equal
    (within ``tol``); groups without signal give no gradient to GRPO-style estimators.
    [b] -> [b] bool."""
    r, v, ids, g = _prepare(rewards, group, valid)
    big = torch.finfo(torch.float64).max
    hi = torch.full((g,), -big, dtype=r.dtype).scatter_reduce(0, ids, torch.where(v, r, torch.full_like(r, -big)), "amax")
    lo = torch.full((g,), big, dtype=r.dtype).scatter_reduce(0, ids, torch.where(v, r, torch.full_like(r, big)), "amin")
    spread = (hi - lo)[ids]
    return spread > tol


def sequence_mean_kl(token_kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean_t KL_t`` over each row's response tokens: [b, s] -> [b]."""
    return masked_mean(token_kl, mask, dim=-1)


def policy_gradient_loss(token_loss: torch.Tensor, mask: torch.Tensor, mode: str, constant: Optional[float] = None,
                         kl: Optional[torch.Tensor] = None, kl_coef: float = 0.0) -> LossAndStats:
    """Convenience for one micro-batch that is the whole batch: ``aggregate`` of the policy
    term plus ``kl_coef ·`` the aggregated KL term, divided out. Returns ``(loss, stats)``."""
    num, den = aggregate(token_loss, mask, mode, constant)
    loss = num / den.clamp(min=1)
    stats = {"loss/policy": loss.detach()}
    if kl is not None and kl_coef:
        knum, kden = aggregate(kl, mask, mode, constant)
        kl_term = knum / kden.clamp(min=1)
        loss = loss + kl_coef * kl_term
        stats["kl"] = kl_term.detach()
    stats["loss"] = loss.detach()
    return loss, stats
