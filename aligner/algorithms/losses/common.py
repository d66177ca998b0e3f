"""Shared checks, masked reductions, whitening and group reductions of every loss family.

Shape notation: ``b`` sequences (or pairs), ``s`` sequence positions, ``N`` head outputs.
Masks are 1 (or True) where a position counts; float masks act as weights. A ``group``
is either an int k (rows come in consecutive blocks of k samples of one prompt) or [b]
explicit group ids.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch

Stats = Dict[str, torch.Tensor]
LossAndStats = Tuple[torch.Tensor, Stats]
Group = Union[int, torch.Tensor]


def _as_mask(mask: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    if mask.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}; expected {tuple(like.shape)} (same as the values)")
    return mask.to(like.dtype)


def _check_same_shape(name_ref: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, t in others.items():
        if t is not None and tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(ref.shape)} like {name_ref}")


def _check_pairs(**tensors: Optional[torch.Tensor]) -> torch.Tensor:
    """All given tensors 1-D [b] with the same b > 0; returns the first."""
    first_name, first = next((k, v) for k, v in tensors.items() if v is not None)
    if first.dim() != 1:
        raise ValueError(f"{first_name} must be 1-D [b] (one value per sequence or pair), got shape {tuple(first.shape)}")
    if first.numel() == 0:
        raise ValueError(f"{first_name} is empty: a loss needs at least one pair")
    _check_same_shape(first_name, first, **tensors)
    return first


def _strength(strength: Optional[torch.Tensor], like: torch.Tensor, kind: str) -> torch.Tensor:
    if strength is None:
        raise ValueError(f"kind {kind!r} needs `strength` (HelpSteer2-Preference |preference_strength| per pair)")
    strength = torch.as_tensor(strength, dtype=like.dtype, device=like.device)
    if strength.shape != like.shape:
        raise ValueError(f"strength has shape {tuple(strength.shape)}; expected {tuple(like.shape)}")
    return strength.abs()  # the sign only says which response was better; chosen/rejected already encode it


def _safe_count(count: torch.Tensor) -> torch.Tensor:
    """A divisor that is 1 where the count is 0 (the masked total is then 0 too)."""
    return torch.where(count != 0, count, torch.ones_like(count))


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().mean()


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """``Σ mask · values`` over ``dim`` (all positions when None). Masked-out entries may
    hold anything, NaN included: they are selected away, not multiplied."""
    m = _as_mask(mask, values, "mask")
    picked = torch.where(m != 0, values, torch.zeros_like(values)) * m
    return picked.sum() if dim is None else picked.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """``Σ mask · values / Σ mask`` over ``dim`` (all positions when None).

    An all-masked reduction is 0 (not NaN), and its gradient is 0.
    """
    # the toolkit's one masked mean; aligner.models pulls megatron-core, so it is imported on
    # first use (the loss registries are imported by config checks, which stay fast)
    from aligner.models.logprobs import masked_mean as _masked_mean

    return _masked_mean(values, _as_mask(mask, values, "mask"), dim)


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Per-sequence log-prob of the response: ``Σ_t mask·logp`` (or the per-token mean).

    token_logps, mask: [b, s] (mask 1 on response tokens). Returns [b]. Used for the DPO
    family's ``ρ`` (docs/dpo.md): either the sum or, with ``average``, the mean
    over the response's tokens.
    """
    if token_logps.dim() != 2:
        raise ValueError(f"token_logps must be [b, s], got shape {tuple(token_logps.shape)}")
    return masked_mean(token_logps, mask, dim=-1) if average else masked_sum(token_logps, mask, dim=-1)


def masked_moments(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summable moments ``[Σ mask, Σ mask·x, Σ mask·x²]`` (float64, detached).

    Sum them over micro-batches and data-parallel ranks (``all_reduce``), then pass the
    total to :func:`masked_whiten` to whiten with statistics of the whole batch.
    """
    x = values.detach().double()
    m = _as_mask(mask, values, "mask").detach().double()
    return torch.stack([m.sum(), masked_sum(x, m), masked_sum(x * x, m)])


def moments_mean_var(moments: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and population variance (ddof 0) from ``[n, Σx, Σx²]``."""
    n, s, ss = moments[0], moments[1], moments[2]
    if float(n) <= 0:
        raise ValueError("moments over zero values: nothing to take a mean or variance of")
    mean = s / n
    return mean, (ss / n - mean * mean).clamp(min=0.0)


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    moments: Optional[torch.Tensor] = None,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``(x − mean) / sqrt(var + eps)`` on masked positions, 0 elsewhere.

    values, mask: [b, s]. ``moments`` (from :func:`masked_moments`, summed across the
    data-parallel batch) gives the statistics; when None they come from this tensor alone.
    Variance is the population variance (ddof 0). ``shift_mean=False`` keeps the mean
    (scales only). docs/ppo.md: advantages are whitened across the whole batch.
    """
    m = _as_mask(mask, values, "mask")
    mean, var = moments_mean_var(masked_moments(values, m) if moments is None else moments)
    mean, var = mean.to(values.dtype), var.to(values.dtype)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m != 0, out, torch.zeros_like(out))


# ------------------------------------------------------------------------------ groups
def group_ids(group: Group, n: int, device=None) -> Tuple[torch.Tensor, int]:
    """``(ids [n], number of groups)``: consecutive blocks of ``group`` rows, or explicit
    ids [n] renumbered 0..g-1 in sorted order."""
    if isinstance(group, int):
        if group < 1 or n % group:
            raise ValueError(f"{n} rows do not split into groups of {group} consecutive rows")
        return torch.arange(n, device=device) // group, n // group
    ids = torch.as_tensor(group, device=device).long()
    if ids.shape != (n,):
        raise ValueError(f"group ids must be [{n}], got shape {tuple(ids.shape)}")
    uniq, ids = torch.unique(ids, return_inverse=True)
    return ids, uniq.numel()


def group_sum(x: torch.Tensor, ids: torch.Tensor, g: int) -> torch.Tensor:
    """Per-group sums of the [b] values ``x``: [g]."""
    return torch.zeros(g, dtype=x.dtype, device=x.device).index_add(0, ids, x)


def group_softmax(logits: torch.Tensor, group: Group) -> torch.Tensor:
    """Softmax of [b] logits within each group (max-shifted): [b]."""
    ids, g = group_ids(group, logits.shape[0], logits.device)
    peak = torch.full((g,), -math.inf, dtype=logits.dtype, device=logits.device).scatter_reduce(
        0, ids, logits, reduce="amax")
    e = (logits - peak[ids]).exp()
    return e / group_sum(e, ids, g)[ids]
