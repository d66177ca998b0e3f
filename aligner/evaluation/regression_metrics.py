"""Per-attribute MSE and Pearson correlation of a regression reward model.

Predictions ``ŷ`` and labels ``y`` are [n, N] (N attributes) with a label mask [n, N]
(1 where the label exists; missing labels are excluded, whatever value they hold).
For attribute j over its present labels:

- ``mse/j``     = ``Σ (ŷ − y)² / n_j``
- ``pearson/j`` = ``cov(ŷ, y) / (std(ŷ) · std(y))``, NaN when n_j < 2 or either side is
  constant (reported as NaN, not left out)
- ``count/j``   = ``n_j``

plus ``mse`` over all present labels (the masked MSE training loss of
docs/reward_models.md).

:class:`RegressionAccumulator` streams this over batches: its state is, per attribute,
the sums ``[n, Σŷ, Σy, Σŷ², Σy², Σŷy]`` in float64 (shifted by a fixed centre for
precision), so accumulators of several batches or data-parallel ranks combine by
summation (``dist.all_reduce(acc.state)`` or :meth:`RegressionAccumulator.merge`).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch

_FIELDS = ("n", "x", "y", "xx", "yy", "xy")


class RegressionAccumulator:
    """Streaming per-attribute MSE / Pearson (see the module docstring).

    attributes: the N attribute names. centre: a constant subtracted from predictions
    and labels before summing (any value works; near the data's mean keeps the sums
    well conditioned — the default 2.0 is the middle of the 0..4 HelpSteer2 scale).
    All ranks must use the same centre for their states to be summable.
    """

    def __init__(self, attributes: Sequence[str], centre: float = 2.0, state: Optional[torch.Tensor] = None):
        self.attributes = list(attributes)
        if len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"attribute names repeat: {self.attributes}")
        self.centre = float(centre)
        shape = (len(self.attributes), len(_FIELDS))
        self.state = torch.zeros(shape, dtype=torch.float64) if state is None else state.detach().double().clone()
        if tuple(self.state.shape) != shape:
            raise ValueError(f"state must have shape {shape}, got {tuple(self.state.shape)}")

    def update(self, pred: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> "RegressionAccumulator":
        """Add a batch: pred, labels, mask [n, N]."""
        n_attr = len(self.attributes)
        for name, t in (("pred", pred), ("labels", labels), ("mask", mask)):
            if t.dim() != 2 or t.shape[1] != n_attr:
                raise ValueError(f"{name} must be [n, {n_attr}] (attributes {self.attributes}), got {tuple(t.shape)}")
        if labels.shape != pred.shape or mask.shape != pred.shape:
            raise ValueError(f"pred {tuple(pred.shape)}, labels {tuple(labels.shape)} and mask {tuple(mask.shape)} differ")
        m = mask.detach().double().cpu()
        if bool(((m != 0) & (m != 1)).any()):
            raise ValueError("mask must hold only 0 and 1")
        present = m != 0
        x = torch.where(present, pred.detach().double().cpu() - self.centre, torch.zeros_like(m))
        y = torch.where(present, labels.detach().double().cpu() - self.centre, torch.zeros_like(m))
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise ValueError("non-finite prediction or label among the present labels")
        sums = torch.stack([m, x, y, x * x, y * y, x * y], dim=-1).sum(0)  # [N, 6]
        self.state += sums.to(self.state.device)
        return self

    def merge(self, other: "RegressionAccumulator") -> "RegressionAccumulator":
        if other.attributes != self.attributes or other.centre != self.centre:
            raise ValueError("accumulators with different attributes or centres cannot be merged")
        self.state += other.state.to(self.state.device)
        return self

    def compute(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        total_n = total_sq = 0.0
        for j, name in enumerate(self.attributes):
            n, sx, sy, sxx, syy, sxy = (float(v) for v in self.state[j])
            out[f"count/{name}"] = n
            sq = sxx - 2 * sxy + syy  # Σ (x − y)²; the centre cancels
            total_n += n
            total_sq += sq
            out[f"mse/{name}"] = sq / n if n > 0 else float("nan")
            out[f"pearson/{name}"] = pearson_from_sums(n, sx, sy, sxx, syy, sxy)
        out["mse"] = total_sq / total_n if total_n > 0 else float("nan")
        return out


def pearson_from_sums(n: float, sx: float, sy: float, sxx: float, syy: float, sxy: float) -> float:
    """Pearson correlation from the summable moments ``n, Σx, Σy, Σx², Σy², Σxy`` (which add
    up over micro-batches and ranks); NaN when n < 2 or either side is constant. The one
    Pearson of the toolkit (training validation and ``aligner eval regression``)."""
    if n < 2:
        return float("nan")
    vx, vy = sxx - sx * sx / n, syy - sy * sy / n
    if not (vx > 0 and vy > 0):
        return float("nan")
    return max(-1.0, min(1.0, (sxy - sx * sy / n) / math.sqrt(vx * vy)))


def regression_metrics(
    pred: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, attributes: Sequence[str]
) -> Dict[str, float]:
    """Per-attribute MSE and Pearson (plus counts and the overall MSE) of one set of
    predictions: pred, labels, mask [n, N], attributes the N names."""
    return RegressionAccumulator(attributes).update(pred, labels, mask).compute()
