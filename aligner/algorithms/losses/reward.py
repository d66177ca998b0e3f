"""Reward-model losses: masked MSE regression, Bradley-Terry (regular / margin / scaled),
running reward moments and ExPO (docs/reward_models.md). How attribute outputs combine into
one reward is the rewards layer's (:mod:`aligner.rewards.weights`).
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional

import torch
import torch.nn.functional as F

from aligner.algorithms.losses.common import (
    LossAndStats,
    _as_mask,
    _check_pairs,
    _check_same_shape,
    _mean,
    _safe_count,
    _strength,
    masked_moments,
    moments_mean_var,
)


def masked_mse_loss(pred: torch.Tensor, labels: torch.Tensor, label_mask: torch.Tensor) -> LossAndStats:
    """Multi-attribute regression loss (docs/reward_models.md): ``Σ mask·(ŷ − y)² / Σ mask``.

    pred, labels, label_mask: [b, N]. Unlabelled attributes (mask 0) are excluded, their
    label values ignored (NaN or -1 placeholders are fine). The mean is over present
    labels of the whole tensor, not per attribute. When no label is present the loss is
    0 with zero gradient (``stats["num_labels"]`` says 0).

    Stats: ``loss``, ``num_labels``.
    """
    if pred.shape != labels.shape:
        raise ValueError(f"labels has shape {tuple(labels.shape)}; expected {tuple(pred.shape)} like the predictions")
    m = _as_mask(label_mask, pred, "label_mask")
    safe_labels = torch.where(m != 0, labels.to(pred.dtype), pred.detach())  # NaN placeholders never reach the graph
    sq = (pred - safe_labels) ** 2
    count = m.sum()
    loss = (sq * m).sum() / _safe_count(count)
    return loss, {"loss": loss.detach(), "num_labels": count.detach()}


def bt_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs with ``r_chosen > r_rejected`` (a tie counts as wrong, as in
    RewardBench). [b], [b] -> scalar float (detached)."""
    _check_pairs(r_chosen=r_chosen, r_rejected=r_rejected)
    return (r_chosen.detach() > r_rejected.detach()).float().mean()


BT_KINDS = ("regular", "margin", "scaled")


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    kind: str = "regular",
    strength: Optional[torch.Tensor] = None,
    margin: Optional[torch.Tensor] = None,
) -> LossAndStats:
    """Bradley-Terry reward-model loss (docs/reward_models.md, HelpSteer2-Preference).

    With ``Δ = r_c − r_r`` and ``m = |preference_strength|``, per pair:

    - ``regular``: ``−logσ(Δ)``
    - ``margin``:  ``−logσ(Δ − m)``; ``m`` is ``margin`` when given, else ``|strength|``
    - ``scaled``:  ``−m · logσ(Δ)`` with ``m = |strength|``

    averaged over the pairs. r_chosen, r_rejected, strength, margin: [b].

    Stats: ``loss``, ``accuracy`` (Δ > 0), ``reward_chosen``, ``reward_rejected``,
    ``margin`` (mean Δ).
    """
    _check_pairs(r_chosen=r_chosen, r_rejected=r_rejected)
    delta = r_chosen - r_rejected
    if kind == "regular":
        per_pair = -F.logsigmoid(delta)
    elif kind == "margin":
        if margin is not None:
            m = torch.as_tensor(margin, dtype=delta.dtype, device=delta.device)
            _check_same_shape("r_chosen", r_chosen, margin=m)
        else:
            m = _strength(strength, delta, kind)
        per_pair = -F.logsigmoid(delta - m)
    elif kind == "scaled":
        per_pair = -_strength(strength, delta, kind) * F.logsigmoid(delta)
    else:
        raise ValueError(f"Bradley-Terry kind must be one of {BT_KINDS}, got {kind!r}")
    loss = per_pair.mean()
    stats = {
        "loss": loss.detach(),
        "accuracy": bt_accuracy(r_chosen, r_rejected),
        "reward_chosen": _mean(r_chosen),
        "reward_rejected": _mean(r_rejected),
        "margin": _mean(delta),
    }
    return loss, stats


class RunningMoments:
    """Mean and standard deviation of rewards over many batches and ranks
    (docs/reward_models.md: the "goodness" reward is standardised by its mean and std over the
    training responses).

    The state is ``[n, Σx, Σx²]`` in float64, so states of several ranks (or shards)
    combine by summation: ``dist.all_reduce(moments.state)`` or :meth:`merge`. The std is
    the population std (ddof 0).
    """

    def __init__(self, state: Optional[torch.Tensor] = None):
        self.state = torch.zeros(3, dtype=torch.float64) if state is None else state.detach().double().clone()
        if self.state.shape != (3,):
            raise ValueError(f"RunningMoments state must be [3] (n, Σx, Σx²), got shape {tuple(self.state.shape)}")

    def update(self, values: torch.Tensor, mask: Optional[torch.Tensor] = None) -> "RunningMoments":
        values = values.detach()
        if mask is None:
            mask = torch.ones_like(values)
        if not torch.isfinite(torch.where(mask != 0, values, torch.zeros_like(values))).all():
            raise ValueError("RunningMoments.update: non-finite reward among the counted values")
        self.state += masked_moments(values, mask).to(self.state.device)
        return self

    def merge(self, other: "RunningMoments") -> "RunningMoments":
        self.state += other.state.to(self.state.device)
        return self

    @property
    def count(self) -> float:
        return float(self.state[0])

    @property
    def mean(self) -> float:
        return float(moments_mean_var(self.state)[0])

    @property
    def std(self) -> float:
        return math.sqrt(float(moments_mean_var(self.state)[1]))

    def normalize(self, values: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """``(x − mean) / (std + eps)``."""
        mean, var = moments_mean_var(self.state)
        return (values - float(mean)) / (math.sqrt(float(var)) + eps)


def expo_extrapolate(
    sd_weak: Mapping[str, torch.Tensor], sd_strong: Mapping[str, torch.Tensor], alpha: float
) -> Dict[str, torch.Tensor]:
    """ExPO model extrapolation (docs/reward_models.md): ``θ = θ_w + α·(θ_s − θ_w)``.

    ``θ_w`` is the weak model (HelpSteer2-Preference: the helpfulness regression model),
    ``θ_s`` the strong one (the Scaled-BT model trained from it). ``α = 1`` returns the
    strong model, ``α > 1`` extrapolates beyond it. Convention: the ExPO paper writes
    ``θ_s + a·(θ_s − θ_w)``, i.e. ``a = α − 1``; give ``alpha`` in this module's
    convention (there is deliberately no default).

    Floating tensors are combined in float32 (float64 if either input is) and returned in
    the strong model's dtype; other tensors (integer buffers) must be equal and are
    copied. Keys and shapes must match exactly; mismatches raise with their names.
    """
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"ExPO alpha must be finite, got {alpha}")
    weak_keys, strong_keys = set(sd_weak), set(sd_strong)
    if weak_keys != strong_keys:
        only_w, only_s = sorted(weak_keys - strong_keys), sorted(strong_keys - weak_keys)
        raise KeyError(
            f"ExPO: state dicts differ in keys: {len(only_w)} only in the weak model {only_w[:5]}, "
            f"{len(only_s)} only in the strong model {only_s[:5]}"
        )
    out: Dict[str, torch.Tensor] = {}
    for key in sd_strong:
        w, s = sd_weak[key], sd_strong[key]
        if not (torch.is_tensor(w) and torch.is_tensor(s)):
            raise TypeError(f"ExPO: {key!r} is not a tensor in both state dicts ({type(w).__name__}, {type(s).__name__})")
        if w.shape != s.shape:
            raise ValueError(f"ExPO: {key!r} has shape {tuple(w.shape)} in the weak model, {tuple(s.shape)} in the strong")
        if torch.is_floating_point(w) and torch.is_floating_point(s):
            work = torch.float64 if torch.float64 in (w.dtype, s.dtype) else torch.float32
            wf, sf = w.detach().to(dtype=work), s.detach().to(device=w.device, dtype=work)
            out[key] = (wf + alpha * (sf - wf)).to(s.dtype)
        else:
            if w.dtype != s.dtype or not torch.equal(w.cpu(), s.cpu()):
                raise ValueError(f"ExPO: non-floating tensor {key!r} ({s.dtype}) differs between the two models")
            out[key] = s.detach().clone()
    return out
