"""Advantage estimators, registered by name (docs/reinforce.md, docs/ppo.md), and DAPO's
reward shaping and group filter.

An estimator is one function registered with :func:`register_advantage`, which declares
what it needs beyond the sequence rewards: ``inputs`` (e.g. ``token_kl``, ``values``,
``gamma``), whether its output is whitened over the global batch by the caller
(``whiten``) and whether it compares the samples of a prompt's group (``needs_group``:
G >= 2). Every estimator takes ``(rewards [b], mask [b, s], group, valid=None, **inputs)``
and returns per-token advantages [b, s], detached, 0 outside the mask, broadcast over the
response tokens explicitly whatever the micro-batch size. :func:`compute_advantages`
dispatches and, for an estimator that takes no ``token_kl``, puts the KL into the
sequence reward, ``r'_i = r_i − β·mean_t KL_t``.

Conventions pinned here (peers differ; docs/reinforce.md):

- ``valid``: rows that count. An invalid row (e.g. a response without EOS under
  ``truncated: mask``) gets advantage 0 and is left out of its group's statistics.
- ``rloo``: ``A_i = r_i − mean_{j≠i, valid} r_j``; 0 for a row with no other valid row.
- ``grpo``: ``A_i = (r_i − mean_G r) / (std_G r + ε)``, Bessel std, ε = 1e-6; 0 for a lone
  valid row or an all-equal group.
- ``dr_grpo``: ``A_i = r_i − mean_G r`` (no std); pair it with ``seq_sum_constant``.
- ``reinforce_pp``: returns ``G_t = Σ_{s≥t} γ^{s−t} r_s`` of ``r_t = 1[t = last]·r − β·KL_t``,
  whitened over the global batch (``reinforce_pp_baseline``: ``r − mean_G r`` first).
- ``gae``: PPO's token rewards ``r_t = −β·KL_t`` plus the score on the last token, then
  ``δ_t = r_t + γV_{t+1} − V_t``, ``A_t = δ_t + γλA_{t+1}``; whitened over the global batch.

Shapes: ``b`` rows (responses), ``s`` positions; ``mask`` [b, s] is 1 on response tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from aligner.algorithms.losses.common import _as_mask, _check_same_shape, group_ids, group_sum
from aligner.algorithms.losses.policy import sequence_mean_kl

GRPO_EPS = 1e-6

AdvantageFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class AdvantageEstimator:
    """A registered estimator: its function and what it declares (module docstring)."""

    fn: AdvantageFn
    inputs: Tuple[str, ...] = ()
    whiten: bool = False
    needs_group: bool = False


ADVANTAGE_ESTIMATORS: Dict[str, AdvantageEstimator] = {}


def register_advantage(name: str, *, inputs: Tuple[str, ...] = (), whiten: bool = False,
                       needs_group: bool = False) -> Callable[[AdvantageFn], AdvantageFn]:
    """Register ``fn(rewards, mask, group, valid=None, **inputs) -> [b, s]`` as estimator
    ``name`` (a ``pg.advantage`` value; the config is checked against this registry)."""

    def add(fn: AdvantageFn) -> AdvantageFn:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is registered twice")
        ADVANTAGE_ESTIMATORS[name] = AdvantageEstimator(fn, tuple(inputs), whiten, needs_group)
        return fn

    return add


def estimator(name: str) -> AdvantageEstimator:
    try:
        return ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"advantage estimator must be one of {sorted(ADVANTAGE_ESTIMATORS)}, got {name!r}") from None


def compute_advantages(name: str, rewards: torch.Tensor, mask: torch.Tensor, group, *,
                       valid: Optional[torch.Tensor] = None, token_kl: Optional[torch.Tensor] = None,
                       kl_coef: float = 0.0, **inputs) -> torch.Tensor:
    """Advantages of estimator ``name`` (module docstring). rewards [b]; mask, token_kl [b, s].

    ``inputs`` offers what the caller has (``values``, ``gamma``, ``lam``, ...); the
    estimator receives those it declared, and a declared one missing is an error."""
    entry = estimator(name)
    if "token_kl" in entry.inputs:
        inputs.update(token_kl=token_kl, kl_coef=kl_coef)
    elif token_kl is not None and kl_coef:
        rewards = rewards - kl_coef * sequence_mean_kl(token_kl, mask)
    missing = [k for k in entry.inputs if k not in inputs]
    if missing:
        raise ValueError(f"advantage estimator {name!r} needs {missing}")
    return entry.fn(rewards, mask, group, valid=valid, **{k: inputs[k] for k in entry.inputs})


# ------------------------------------------------------------------------------ group estimators
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
    ids, g = group_ids(group, r.shape[0], r.device)
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
    n = group_sum(w, ids, g)
    mean = group_sum(r * w, ids, g) / n.clamp(min=1)
    sq = group_sum(((r - mean[ids]) ** 2) * w, ids, g)
    std = (sq / (n - 1).clamp(min=1)).sqrt()
    return n[ids], mean[ids], std[ids]


@register_advantage("rloo", needs_group=True)
def rloo_advantages(rewards, mask, group, valid=None) -> torch.Tensor:
    """RLOO: ``A_i = r_i − mean_{j≠i} r_j`` over the valid rows of the group
    (HelpSteer2-Preference, arXiv 2410.01257); equals ``G/(G−1)·(r_i − mean_G r)``."""
    r, v, ids, g = _prepare(rewards, group, valid)
    w = v.double()
    n = group_sum(w, ids, g)[ids]
    total = group_sum(r * w, ids, g)[ids]
    others = n - 1
    adv = torch.where((others > 0) & v, r - (total - r) / others.clamp(min=1), torch.zeros_like(r))
    return _broadcast(adv, mask, rewards.dtype)


@register_advantage("grpo", needs_group=True)
def grpo_advantages(rewards, mask, group, valid=None) -> torch.Tensor:
    """GRPO: ``A_i = (r_i − mean_G r) / (std_G r + ε)`` (DeepSeekMath, arXiv 2402.03300)."""
    r, v, ids, g = _prepare(rewards, group, valid)
    n, mean, std = group_stats(rewards, group, valid)
    adv = torch.where((n > 1) & v, (r - mean) / (std + GRPO_EPS), torch.zeros_like(r))
    return _broadcast(adv, mask, rewards.dtype)


@register_advantage("dr_grpo", needs_group=True)
def dr_grpo_advantages(rewards, mask, group, valid=None) -> torch.Tensor:
    """Dr. GRPO: ``A_i = r_i − mean_G r`` without the std division (arXiv 2503.20783)."""
    r, v, ids, g = _prepare(rewards, group, valid)
    _n, mean, _std = group_stats(rewards, group, valid)
    adv = torch.where(v, r - mean, torch.zeros_like(r))
    return _broadcast(adv, mask, rewards.dtype)


# ------------------------------------------------------------------------------ token-level estimators
def _last_positions(mask: torch.Tensor) -> torch.Tensor:
    """Each row's last masked position [b]; an error naming the rows without one."""
    m = mask != 0
    if not bool(m.any(-1).all()):
        rows = (~m.any(-1)).nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} have no response token in the mask")
    return m.shape[-1] - 1 - m.flip(-1).float().argmax(-1)


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


@register_advantage("reinforce_pp", inputs=("token_kl", "kl_coef", "gamma"), whiten=True)
def reinforce_pp_advantages(rewards, mask, group, valid=None, *, token_kl=None, kl_coef: float = 0.0,
                            gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ (arXiv 2501.03262): returns of ``r_t = 1[t = last]·r − β·KL_t``, NOT yet
    whitened (the caller whitens over all valid tokens of the global batch)."""
    return _reinforce_pp(rewards, mask, group, valid, token_kl, kl_coef, gamma, baseline=False)


@register_advantage("reinforce_pp_baseline", inputs=("token_kl", "kl_coef", "gamma"), whiten=True,
                    needs_group=True)
def reinforce_pp_baseline_advantages(rewards, mask, group, valid=None, *, token_kl=None, kl_coef: float = 0.0,
                                     gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ with a group baseline: ``r − mean_G r`` first, then as ``reinforce_pp``."""
    return _reinforce_pp(rewards, mask, group, valid, token_kl, kl_coef, gamma, baseline=True)


def ppo_token_rewards(scores: torch.Tensor, token_kl: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float) -> torch.Tensor:
    """PPO's token rewards (docs/ppo.md): ``r_t = −kl_coef · KL_t`` on response tokens, plus
    the sequence's score on its last response token; 0 outside the mask.
    scores [b]; token_kl, mask [b, s] -> [b, s]."""
    if scores.dim() != 1 or scores.shape[0] != token_kl.shape[0]:
        raise ValueError(f"scores must be [b] = [{token_kl.shape[0]}], got shape {tuple(scores.shape)}")
    m = _as_mask(mask, token_kl, "mask").detach()
    kl = token_kl.detach()
    rewards = torch.where(m != 0, -kl_coef * kl, torch.zeros_like(kl))
    last = _last_positions(m)
    rewards = rewards.clone()
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards


def gae_returns(advantages: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The critic's targets ``R_t = A_t + V_t`` on masked positions, 0 elsewhere. [b, s]."""
    m = _as_mask(mask, advantages, "mask").detach() != 0
    return torch.where(m, advantages + values, torch.zeros_like(advantages))


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                   lam: float = 0.95) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over token rewards (docs/ppo.md):
    ``δ_t = r_t + γ·V_{t+1} − V_t``, ``A_t = δ_t + γλ·A_{t+1}``, over the masked positions of
    each row ("t+1" is the next masked position; past the last one V = A = 0). rewards,
    values, mask: [b, s]. Returns ``(advantages, returns)`` [b, s], detached, 0 outside."""
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
    return adv, gae_returns(adv, values, mask)


@register_advantage("gae", inputs=("token_kl", "kl_coef", "values", "gamma", "lam"), whiten=True)
def gae_token_advantages(rewards, mask, group, valid=None, *, token_kl, kl_coef: float, values, gamma: float,
                         lam: float) -> torch.Tensor:
    """PPO's advantages: :func:`ppo_token_rewards` of the sequence scores, then
    :func:`gae_advantages` against the critic's ``values`` [b, s] (module docstring)."""
    token_rewards = ppo_token_rewards(rewards, token_kl, mask, kl_coef)
    return gae_advantages(token_rewards, values, mask, gamma, lam)[0]


# ------------------------------------------------------------------------------ DAPO
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
    (within ``tol``); groups without signal give no gradient to group estimators.
    [b] -> [b] bool."""
    r, v, ids, g = _prepare(rewards, group, valid)
    big = torch.finfo(torch.float64).max
    hi = torch.full((g,), -big, dtype=r.dtype).scatter_reduce(0, ids, torch.where(v, r, torch.full_like(r, -big)), "amax")
    lo = torch.full((g,), big, dtype=r.dtype).scatter_reduce(0, ids, torch.where(v, r, torch.full_like(r, big)), "amin")
    spread = (hi - lo)[ids]
    return spread > tol
