"""Reward over-optimisation: functional forms, fits, KL estimate, ensembles, best-of-n.

Gao, Schulman and Hilton, *Scaling Laws for Reward Model Overoptimization* (2022,
arXiv:2210.10760) measure the gold reward R of a policy, relative to the initial policy,
against the distance ``d = sqrt(KL(π || π_init))``:

- best-of-n:  ``R_bon(d) = d (α − β d)``,       peak at ``d* = α / (2β)``
- RL:         ``R_rl(d)  = d (α − β log d)``,   peak at ``d* = exp(α/β − 1)``

with ``KL_bon = log n − (n − 1)/n`` for best-of-n (an upper bound on the true KL).
Both forms are linear in (α, β), so the fits here are ordinary least squares. Ensembles
of reward models (Coste et al., *Reward Model Ensembles Help Mitigate Overoptimization*,
2023, arXiv:2310.02743): ``mean``, worst case ``min``, uncertainty-weighted
``mean − λ·var``. docs/monitor.md has the whole picture.

Notation: m points, K ensemble members, n responses, P prompts, N samples per prompt.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from aligner.evaluation.regression_metrics import pearson_from_sums

FORMS = ("rl", "bon")


def gold_rl(d, alpha: float, beta: float):
    """Gao et al. (2022) RL form: ``R(d) = d (α − β log d)`` (0 at d = 0). d: [m] tensor or float."""
    d = torch.as_tensor(d, dtype=torch.float64)
    return d * (alpha - beta * torch.log(torch.clamp(d, min=1e-300)))


def gold_bon(d, alpha: float, beta: float):
    """Gao et al. (2022) best-of-n form: ``R(d) = d (α − β d)``. d: [m] tensor or float."""
    d = torch.as_tensor(d, dtype=torch.float64)
    return d * (alpha - beta * d)


@dataclass
class Fit:
    """A least-squares fit of one form: α, β, the residual RMS, the number of points and the
    peak ``d*`` with ``R(d*)`` (None when β <= 0: no peak, gold still rising; or when the
    formula's d* would be <= 0: a curve that falls from d = 0, where d = sqrt(KL) >= 0
    has no peak)."""

    form: str
    alpha: float
    beta: float
    rmse: float
    points: int
    d_peak: Optional[float]
    gold_peak: Optional[float]

    def predict(self, d):
        return (gold_rl if self.form == "rl" else gold_bon)(d, self.alpha, self.beta)

    def to_dict(self) -> Dict[str, Optional[float]]:
        return {"form": self.form, "alpha": self.alpha, "beta": self.beta, "rmse": self.rmse, "points": self.points,
                "d_peak": self.d_peak, "gold_peak": self.gold_peak}


def fit_form(d: Sequence[float], gold: Sequence[float], form: str) -> Optional[Fit]:
    """Least-squares (α, β) of ``form`` (``"rl"`` or ``"bon"``) to points ``(d_i, R_i)``.

    d: [m] distances sqrt(KL) (>= 0); gold: [m] gold reward relative to the initial policy
    (R = gold − gold at d = 0). Both forms are linear in (α, β):
    ``R = α·d − β·d log d`` (RL) and ``R = α·d − β·d²`` (best-of-n), so this solves the
    2-column least-squares problem on the points with d > 0 (d = 0 carries no information:
    both forms are 0 there). Returns None with fewer than 2 such points or a singular
    design. The peak follows Gao et al. (2022): RL ``d* = exp(α/β − 1)``, best-of-n
    ``d* = α / (2β)``, for β > 0 and d* > 0.
    """
    if form not in FORMS:
        raise ValueError(f"form {form!r}: expected one of {FORMS}")
    x = torch.as_tensor(list(d), dtype=torch.float64)
    y = torch.as_tensor(list(gold), dtype=torch.float64)
    if x.shape != y.shape:
        raise ValueError(f"d has {x.numel()} points, gold {y.numel()}")
    keep = x > 0
    x, y = x[keep], y[keep]
    if x.numel() < 2:
        return None
    second = -x * torch.log(x) if form == "rl" else -x * x
    design = torch.stack([x, second], dim=1)
    if torch.linalg.matrix_rank(design) < 2:
        return None
    coef = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
    alpha, beta = float(coef[0]), float(coef[1])
    rmse = float(torch.sqrt(torch.mean((design @ coef - y) ** 2)))
    d_peak = gold_peak = None
    if beta > 0:
        if form == "rl":
            exponent = alpha / beta - 1.0
            d_peak = math.exp(exponent) if exponent < 700 else float("inf")
        else:
            d_peak = alpha / (2.0 * beta)
        if d_peak <= 0:  # α <= 0: the fitted curve falls from d = 0 on; d = sqrt(KL) has no peak below 0
            d_peak = None
        gold_peak = float((gold_rl if form == "rl" else gold_bon)(d_peak, alpha, beta)) \
            if d_peak is not None and math.isfinite(d_peak) else None
    return Fit(form, alpha, beta, rmse, int(x.numel()), d_peak, gold_peak)


def describe_peak(fit: Fit, d_max: float) -> str:
    """The fit's peak in words for a report: ``peak at d = X`` when it lies within the
    measured distances (0, ``d_max``], else ``no peak within the measured range (d <= d_max)``
    — a fitted peak beyond the last point is an extrapolation, and a curve that falls from
    the start (α <= 0) or never turns (β <= 0) has none there."""
    if fit.d_peak is not None and 0 < fit.d_peak <= d_max:
        return f"peak at d = {fit.d_peak:.3f}"
    beyond = f"; the fitted curve would peak at d = {fit.d_peak:.3f}" \
        if fit.d_peak is not None and math.isfinite(fit.d_peak) else ""
    return f"no peak within the measured range (d <= {d_max:.3f}){beyond}"


def kl_bon(n: int) -> float:
    """``KL_bon = log n − (n − 1)/n``: the KL of best-of-n sampling to the base policy (an
    upper bound, Gao et al. 2022; exact for distinct samples)."""
    if n < 1:
        raise ValueError(f"n = {n}: expected >= 1")
    return math.log(n) - (n - 1) / n


def sequence_kl(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence log-ratio ``Σ_t mask·(log π(y_t) − log π_ref(y_t))``: [n, S] -> [n] (float64).

    For y drawn from π its mean over samples is an unbiased estimate of the sequence-level
    ``KL(π || π_ref) = E_{y~π}[log π(y) − log π_ref(y)]`` (the k1 estimator summed over the
    response; a single sample may be negative, the expectation is not).
    """
    return ((logps.double() - ref_logps.double()) * mask.double()).sum(-1)


def mean_and_se(values: torch.Tensor) -> Tuple[float, float]:
    """Mean and standard error of the mean of [n] values (SE NaN for n < 2)."""
    v = values.double().flatten()
    n = v.numel()
    if n == 0:
        return float("nan"), float("nan")
    mean = float(v.mean())
    se = float(v.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return mean, se


def gold_drop(best_gold: Sequence[float], gold: Sequence[float]) -> Tuple[float, float]:
    """How far the gold reward fell since its best evaluation, with its standard error:
    ``(mean(best − now), SE)``. The monitor draws the same prompts and seeds at every
    evaluation, so the two [n] lists are paired per sample and the SE is that of the
    paired differences (NaN for n < 2); lists of different lengths (an evaluation of
    other size) are compared unpaired, ``sqrt(SE_best² + SE_now²)``."""
    best, now = torch.as_tensor(list(best_gold), dtype=torch.float64), torch.as_tensor(list(gold), dtype=torch.float64)
    if best.numel() == now.numel():
        return mean_and_se(best - now)
    (mb, sb), (mn, sn) = mean_and_se(best), mean_and_se(now)
    return mb - mn, math.sqrt(sb * sb + sn * sn)


def is_overoptimized(drop: float, drop_se: float, proxy_rise: float, warn_drop: float, z: float = 2.0) -> bool:
    """The monitor's warning condition: the gold fell by ``warn_drop`` or more, by more than
    ``z`` standard errors of the drop (a fall the sampling noise does not explain), while the
    proxy rose above its value at the gold's best (``proxy_rise > 0``). A drop whose SE is
    unknown (NaN: one sample) is not significant."""
    return drop >= warn_drop and drop > 0 and math.isfinite(drop_se) and drop > z * drop_se and proxy_rise > 0


def combine_ensemble(scores: torch.Tensor, mode: str = "mean", lam: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """K reward models' scores [K, n] -> (the combined proxy [n], the ensemble variance [n]).

    ``mean``: mean_k R_k; ``min``: worst case min_k R_k; ``mean_minus_var``:
    ``mean_k R_k − λ Var_k R_k`` (uncertainty-weighted; Coste et al. 2023). The variance is
    the population variance over members (0 for K = 1) and is itself an alarm signal: it
    grows where the members disagree, which is where the policy exploits one of them.
    """
    if scores.dim() != 2 or scores.shape[0] < 1:
        raise ValueError(f"ensemble scores of shape {tuple(scores.shape)}: expected [K >= 1, n]")
    s = scores.double()
    var = s.var(dim=0, unbiased=False)
    if mode == "mean":
        return s.mean(0), var
    if mode == "min":
        return s.min(0).values, var
    if mode == "mean_minus_var":
        return s.mean(0) - lam * var, var
    raise ValueError(f"ensemble mode {mode!r}: expected mean, min or mean_minus_var")


def best_of_n(proxy: torch.Tensor, gold: torch.Tensor, n: int) -> Dict[str, float]:
    """Best-of-n by the proxy from N >= n samples per prompt, estimated without bias.

    proxy, gold: [P, N] scores of the same N samples of each of P prompts. Picking the
    proxy-best of a uniformly random n-subset of the N samples selects the sample of proxy
    rank i (1 = lowest) with probability ``C(i−1, n−1) / C(N, n)``; the estimate of the
    picked response's expected proxy and gold is the weighted sum over all N samples (the
    estimator of Gao et al. 2022, appendix; it uses every sample for every n, so the n's
    are compared on the same samples). Proxy ties are ordered by sample position. Returns
    per-prompt means over prompts with their standard errors (over prompts), and
    ``kl_bon``, ``d_bon = sqrt(kl_bon)``.
    """
    if proxy.shape != gold.shape or proxy.dim() != 2:
        raise ValueError(f"proxy {tuple(proxy.shape)} and gold {tuple(gold.shape)}: expected two [P, N] tensors")
    P, N = proxy.shape
    if not 1 <= n <= N:
        raise ValueError(f"n = {n}: expected 1 <= n <= N = {N} samples per prompt")
    ranks = torch.arange(1, N + 1)
    weights = torch.tensor([math.comb(int(i) - 1, n - 1) for i in ranks], dtype=torch.float64) / math.comb(N, n)
    order = torch.sort(proxy.double(), dim=1, stable=True).indices
    proxy_sorted = torch.gather(proxy.double(), 1, order)
    gold_sorted = torch.gather(gold.double(), 1, order)
    picked_proxy = proxy_sorted @ weights
    picked_gold = gold_sorted @ weights
    proxy_mean, proxy_se = mean_and_se(picked_proxy)
    gold_mean, gold_se = mean_and_se(picked_gold)
    kl = kl_bon(n)
    return {"n": n, "kl_bon": kl, "d_bon": math.sqrt(kl), "proxy": proxy_mean, "proxy_se": proxy_se,
            "gold": gold_mean, "gold_se": gold_se, "prompts": P}


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two [n] tensors (NaN for n < 2 or a constant side)."""
    x, y = x.double().flatten(), y.double().flatten()
    return pearson_from_sums(float(x.numel()), float(x.sum()), float(y.sum()), float((x * x).sum()),
                             float((y * y).sum()), float((x * y).sum()))


__all__ = ["FORMS", "Fit", "best_of_n", "combine_ensemble", "describe_peak", "fit_form", "gold_bon", "gold_drop",
           "gold_rl", "is_overoptimized", "kl_bon", "mean_and_se", "pearson", "sequence_kl"]
