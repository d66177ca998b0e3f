"""Pure loss functions of every algorithm (../REFERENCE sections 2 to 5).

Each loss is a plain torch function of already-reduced quantities (per-sequence
log-probs, per-token log-probs with a mask, head outputs) and returns
``(loss, stats)``: a scalar tensor carrying the graph, and a dict of detached scalar
tensors worth logging. Nothing here knows about parallelism: a trainer calls these from
its megatron-core loss function on the last pipeline stage, and sums summable
statistics (:func:`masked_moments`, :class:`RunningMoments`) over data-parallel ranks
itself.

Shape notation: ``b`` sequences (or pairs), ``s`` sequence positions, ``N`` head outputs
(attributes). Masks are 1 (or True) where a position counts; float masks act as weights.

Contents
- reductions: :func:`masked_sum`, :func:`masked_mean`, :func:`sequence_logps`,
  :func:`masked_moments`, :func:`masked_whiten`
- reward models (section 2): :func:`masked_mse_loss`, :func:`bradley_terry_loss`,
  :func:`bt_accuracy`, :func:`combine_attributes`, :class:`RunningMoments`,
  :func:`expo_extrapolate`
- DPO family (section 3): :func:`dpo_loss`, :func:`ipo_loss`, :func:`rpo_sq_loss`,
  :func:`rpo_fwd_kl_loss`, :func:`rpo_bwd_kl_loss`, :func:`margin_dpo_loss`,
  :func:`scaled_dpo_loss`, the registry :data:`PREFERENCE_LOSSES` and the entry point
  :func:`preference_loss` (adds the optional SFT term)
- PPO / REINFORCE (section 4): :func:`kl_penalty`, :func:`ppo_token_rewards`,
  :func:`gae_advantages`, :func:`ppo_policy_loss`, :func:`ppo_value_loss`,
  :func:`rloo_advantages`, :func:`reinforce_loss`
- SteerLM 2.0 (section 5): :func:`steerlm2_weights`, :func:`steerlm2_loss`,
  :func:`beta_cdf`, :func:`attribute_log_likelihood`
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

Stats = Dict[str, torch.Tensor]
LossAndStats = Tuple[torch.Tensor, Stats]
Group = Union[int, torch.Tensor]

# ====================================================================== checks


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


# ====================================================================== reductions


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
    m = _as_mask(mask, values, "mask")
    total = masked_sum(values, m, dim)
    count = m.sum() if dim is None else m.sum(dim)
    return total / _safe_count(count)


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Per-sequence log-prob of the response: ``Σ_t mask·logp`` (or the per-token mean).

    token_logps, mask: [b, s] (mask 1 on response tokens). Returns [b]. Used for the DPO
    family's ``ρ`` (REFERENCE section 3): either the sum or, with ``average``, the mean
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
    (scales only). REFERENCE section 4: advantages are whitened across the whole batch.
    """
    m = _as_mask(mask, values, "mask")
    mean, var = moments_mean_var(masked_moments(values, m) if moments is None else moments)
    mean, var = mean.to(values.dtype), var.to(values.dtype)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m != 0, out, torch.zeros_like(out))


# ====================================================================== reward models (section 2)


def masked_mse_loss(pred: torch.Tensor, labels: torch.Tensor, label_mask: torch.Tensor) -> LossAndStats:
    """Multi-attribute regression loss (REFERENCE section 2): ``Σ mask·(ŷ − y)² / Σ mask``.

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
    """Bradley-Terry reward-model loss (REFERENCE section 2, HelpSteer2-Preference).

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


HELPSTEER2_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
# r = w · ŷ (REFERENCE section 2). RewardBench weights of the HelpSteer2 regression RMs:
REWARDBENCH_WEIGHTS_70B = {
    "helpfulness": 0.65, "correctness": 0.8, "coherence": 0.45, "complexity": 0.55, "verbosity": -0.4,
}
REWARDBENCH_WEIGHTS_340B = {
    "helpfulness": 0.3, "correctness": 0.74, "coherence": 0.46, "complexity": 0.47, "verbosity": -0.33,
}
# Reward for PPO / iterative DPO, standardised afterwards (see RunningMoments):
GOODNESS_WEIGHTS = {"helpfulness": 0.65, "correctness": 0.8, "coherence": 0.45}


def combine_attributes(
    values: torch.Tensor,
    weights: Union[Sequence[float], torch.Tensor, Mapping[str, float]],
    attributes: Optional[Sequence[str]] = None,
) -> torch.Tensor:
    """Scalar reward from attribute predictions: ``r = w · ŷ`` (REFERENCE section 2).

    values: [b, N]. weights: N numbers, or a name -> weight mapping together with
    ``attributes`` (the head's N output names in order); attributes missing from the
    mapping get weight 0, a mapping key that is not an attribute is an error.
    Returns [b].
    """
    if values.dim() != 2:
        raise ValueError(f"values must be [b, N], got shape {tuple(values.shape)}")
    n = values.shape[1]
    if isinstance(weights, Mapping):
        if attributes is None:
            raise ValueError("weights given by name need `attributes` (the head's output names in order)")
        if len(attributes) != n:
            raise ValueError(f"{len(attributes)} attribute names for a head of {n} outputs")
        unknown = sorted(set(weights) - set(attributes))
        if unknown:
            raise ValueError(f"attribute weights name {unknown}, not among the head's attributes {list(attributes)}")
        w = torch.tensor([float(weights.get(a, 0.0)) for a in attributes])
    else:
        w = torch.as_tensor(weights).flatten()
        if w.numel() != n:
            raise ValueError(f"{w.numel()} attribute weights for a head of {n} outputs")
    return values @ w.to(device=values.device, dtype=values.dtype)


class RunningMoments:
    """Mean and standard deviation of rewards over many batches and ranks (REFERENCE
    section 2: the "goodness" reward is standardised by its mean and std over the
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
    """ExPO model extrapolation (REFERENCE section 2): ``θ = θ_w + α·(θ_s − θ_w)``.

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


# ====================================================================== DPO family (section 3)


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


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, **_) -> torch.Tensor:
    """DPO (REFERENCE section 3): ``−logσ(βΔ)`` per pair, [b] -> [b].

    Identical chosen and rejected (Δ = 0) give ``ln 2 = 0.693147``.
    """
    delta = _delta(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -F.logsigmoid(beta * delta)


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, **_) -> torch.Tensor:
    """IPO (REFERENCE section 3): ``(Δ − 1/(2β))²`` per pair, [b] -> [b]."""
    delta = _delta(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (delta - 1.0 / (2.0 * beta)) ** 2


def rpo_sq_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                reward_gap=None, eta=1.0, **_) -> torch.Tensor:
    """Reward-aware PO, squared (REFERENCE section 3): ``(βΔ − η(r*_c − r*_r))²`` per pair.

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


def rpo_bwd_kl_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                    reward_gap=None, eta=1.0, **_) -> torch.Tensor:
    """Reward-aware PO, backward KL (REFERENCE section 3):
    ``KL(Bern(σ(η(r*_c − r*_r))) ‖ Bern(σ(βΔ)))`` per pair — the target distribution first."""
    delta = _delta(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    gap = _reward_gap(reward_gap, delta, "rpo_bwd_kl")
    return _bernoulli_kl(eta * gap, beta * delta)


def rpo_fwd_kl_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                    reward_gap=None, eta=1.0, **_) -> torch.Tensor:
    """Reward-aware PO, forward KL (REFERENCE section 3): the reverse direction of
    :func:`rpo_bwd_kl_loss`, ``KL(Bern(σ(βΔ)) ‖ Bern(σ(η(r*_c − r*_r))))`` per pair."""
    delta = _delta(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    gap = _reward_gap(reward_gap, delta, "rpo_fwd_kl")
    return _bernoulli_kl(beta * delta, eta * gap)


def margin_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                    strength=None, margin=None, **_) -> torch.Tensor:
    """Margin DPO from preference strength (REFERENCE section 3, HelpSteer2-Preference):
    the margin Bradley-Terry loss on the implicit reward difference, ``−logσ(βΔ − m)``
    per pair, ``m`` = ``margin`` when given, else ``|strength|``."""
    delta = _delta(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if margin is not None:
        m = torch.as_tensor(margin, dtype=delta.dtype, device=delta.device)
        _check_same_shape("policy_chosen_logps", delta, margin=m)
    else:
        m = _strength(strength, delta, "margin_dpo")
    return -F.logsigmoid(beta * delta - m)


def scaled_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                    strength=None, **_) -> torch.Tensor:
    """Scaled DPO from preference strength (REFERENCE section 3, HelpSteer2-Preference):
    the scaled Bradley-Terry loss on the implicit reward difference, ``−m·logσ(βΔ)`` per
    pair with ``m = |strength|``."""
    delta = _delta(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -_strength(strength, delta, "scaled_dpo") * F.logsigmoid(beta * delta)


PreferenceLossFn = Callable[..., torch.Tensor]
PREFERENCE_LOSSES: Dict[str, PreferenceLossFn] = {
    "dpo": dpo_loss,
    "ipo": ipo_loss,
    "rpo_sq": rpo_sq_loss,
    "rpo_fwd_kl": rpo_fwd_kl_loss,
    "rpo_bwd_kl": rpo_bwd_kl_loss,
    "margin_dpo": margin_dpo_loss,
    "scaled_dpo": scaled_dpo_loss,
}


def register_preference_loss(name: str) -> Callable[[PreferenceLossFn], PreferenceLossFn]:
    """Decorator adding a per-pair loss ``fn(pc, pr, rc, rr, beta, **kw) -> [b]`` to the registry."""

    def add(fn: PreferenceLossFn) -> PreferenceLossFn:
        if name in PREFERENCE_LOSSES:
            raise ValueError(f"preference loss {name!r} is already registered")
        PREFERENCE_LOSSES[name] = fn
        return fn

    return add


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
    chosen_nll: Optional[torch.Tensor] = None,
    sft_weight: float = 0.0,
    preference_weight: float = 1.0,
) -> LossAndStats:
    """The DPO family's entry point (REFERENCE section 3).

    ``total = preference_weight · mean_pairs(L_kind) + sft_weight · mean_pairs(chosen_nll)``

    Inputs are per-sequence quantities [b]: policy and reference log-probs of the chosen
    and rejected responses, each summed over response tokens or averaged per token (see
    :func:`sequence_logps`; both of a pair must use the same reduction). ``kind`` is a key
    of :data:`PREFERENCE_LOSSES`: ``dpo``, ``ipo``, ``rpo_sq``, ``rpo_fwd_kl``,
    ``rpo_bwd_kl``, ``margin_dpo``, ``scaled_dpo``. Kind-specific inputs:
    ``strength`` (|preference_strength|, margin/scaled), ``margin`` (margin_dpo, instead
    of strength), ``reward_gap`` and ``eta`` (RPO). Inputs a kind does not use are
    ignored, so a trainer may always pass its batch's fields.

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
    per_pair = PREFERENCE_LOSSES[kind](
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
        strength=strength, margin=margin, reward_gap=reward_gap, eta=eta,
    )
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


# ====================================================================== PPO / REINFORCE (section 4)

KL_KINDS = ("abs", "k1", "k3")


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, kind: str = "abs") -> torch.Tensor:
    """Per-token KL estimate between the sampling policy and the initial one
    (REFERENCE section 4): with ``d = log π_old(y_t) − log π_init(y_t)``,

    - ``abs``: ``|d|`` (the default of the tool that came before)
    - ``k1``:  ``d``
    - ``k3``:  ``exp(−d) − 1 + d`` (non-negative, unbiased for KL(π_old ‖ π_init))

    logps, ref_logps: [b, s] -> [b, s].
    """
    _check_same_shape("logps", logps, ref_logps=ref_logps)
    d = logps - ref_logps
    if kind == "abs":
        return d.abs()
    if kind == "k1":
        return d
    if kind == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"KL estimator must be one of {KL_KINDS}, got {kind!r}")


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
    """Per-token rewards for PPO (REFERENCE section 4).

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
    """Generalised advantage estimation (REFERENCE section 4).

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


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    entropy: Optional[torch.Tensor] = None,
    entropy_coef: float = 0.0,
) -> LossAndStats:
    """PPO clipped policy loss (REFERENCE section 4).

    ``ratio = exp(log π − log π_old)``;
    ``L = masked_mean(max(−A·ratio, −A·clip(ratio, 1−ε, 1+ε))) − c_H · masked_mean(entropy)``,
    the mean over all response tokens of the batch. logps (with grad), old_logps,
    advantages, mask, entropy: [b, s]. Sanity value: ratios 0.5/1.0/1.5, advantages
    1/−1/2, ε 0.2 -> −0.6333.

    Stats: ``loss``, ``loss/policy``, ``clipfrac`` (share of tokens where the clipped term
    is the larger), ``ratio`` (mean), ``approx_kl`` (mean ``(ratio−1) − log ratio``),
    ``entropy`` (when given).
    """
    _check_same_shape("logps", logps, old_logps=old_logps, advantages=advantages, entropy=entropy)
    m = _as_mask(mask, logps, "mask")
    adv = advantages.detach()
    log_ratio = logps - old_logps.detach()
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    policy = masked_mean(torch.maximum(unclipped, clipped), m)
    loss = policy
    with torch.no_grad():
        stats: Stats = {
            "loss/policy": policy.detach(),
            "clipfrac": masked_mean((clipped > unclipped).to(logps.dtype), m).detach(),
            "ratio": masked_mean(ratio.detach(), m),
            "approx_kl": masked_mean((ratio - 1.0 - log_ratio).detach(), m),
        }
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
    """PPO clipped value loss (REFERENCE section 4).

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
    """REINFORCE leave-one-out advantages (REFERENCE section 4).

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
    """REINFORCE / RLOO policy loss (REFERENCE section 4):
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


# ====================================================================== SteerLM 2.0 (section 5)


def steerlm2_weights(
    log_p_attr: torch.Tensor,
    log_p_y: torch.Tensor,
    log_q_prime: torch.Tensor,
    log_q_theta: torch.Tensor,
    group: Group,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SteerLM 2.0 importance weights (REFERENCE section 5), within each prompt's group:

    ``w'_i = softmax_i(log P(a|x,y_i) + log P(y_i|x) − log Q'(y_i|a,x))`` and
    ``b'_i = softmax_i(log Q_θ(y_i|a,x) − log Q'(y_i|a,x))`` (no gradient).
    All inputs [b] sequence log-probs; ``group`` as in :func:`rloo_advantages`.
    Returns ``(w', b')`` [b], detached.
    """
    _check_pairs(log_p_attr=log_p_attr, log_p_y=log_p_y, log_q_prime=log_q_prime, log_q_theta=log_q_theta)
    q_prime = log_q_prime.detach()
    w = group_softmax((log_p_attr.detach() + log_p_y.detach() - q_prime).double(), group)
    b = group_softmax((log_q_theta.detach() - q_prime).double(), group)
    return w.to(log_q_theta.dtype), b.to(log_q_theta.dtype)


def steerlm2_loss(
    policy_logps: torch.Tensor,
    num_tokens: torch.Tensor,
    log_p_attr: torch.Tensor,
    log_p_y: torch.Tensor,
    log_q_prime: torch.Tensor,
    group: Group,
    avg_tokens: Optional[float] = None,
) -> LossAndStats:
    """SteerLM 2.0 loss (REFERENCE section 5).

    The gradient ``−Σ_i (w'_i − b'_i) ∇log Q_θ(y_i|a,x)`` per prompt, implemented as each
    sequence's NLL times ``(w' − b')`` divided by the average number of valid tokens:

    ``L = (1/G) Σ_i (w'_i − b'_i) · (−log Q_θ(y_i|a,x)) / T̄``

    summed over a group's responses and averaged over the G prompts of the batch.
    policy_logps: [b] summed response log-probs under the model being trained (with
    grad; ``b'`` uses them detached); num_tokens: [b] valid response tokens; the other
    inputs [b] precomputed. ``T̄`` = mean of num_tokens, unless ``avg_tokens`` (e.g. the
    global-batch mean) is given.

    Stats: ``loss``, ``kl_w_b`` (mean over groups of ``Σ_i w'_i log(w'_i / b'_i)``),
    ``weight_max`` (mean of each group's largest w').
    """
    _check_pairs(policy_logps=policy_logps, num_tokens=num_tokens)
    w, b = steerlm2_weights(log_p_attr, log_p_y, log_q_prime, policy_logps, group)
    ids, g = _group_ids(group, policy_logps.shape[0], policy_logps.device)
    t_bar = float(num_tokens.double().mean()) if avg_tokens is None else float(avg_tokens)
    if not t_bar > 0:
        raise ValueError(f"average number of valid tokens must be > 0, got {t_bar}")
    loss = ((w - b) * -policy_logps).sum() / (g * t_bar)
    with torch.no_grad():
        wd, bd = w.double(), b.double()
        terms = torch.where(wd > 0, wd * (wd.log() - bd.log()), torch.zeros_like(wd))
        w_max = torch.full((g,), -math.inf, dtype=wd.dtype, device=wd.device).scatter_reduce(0, ids, wd, reduce="amax")
        stats = {
            "loss": loss.detach(),
            "kl_w_b": (_group_sum(terms, ids, g).mean()).float(),
            "weight_max": w_max.mean().float(),
        }
    return loss, stats


def beta_cdf(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, iterations: int = 300) -> torch.Tensor:
    """Regularised incomplete beta ``I_x(a, b)`` (the Beta(a, b) CDF at x), float64.

    Continued-fraction evaluation (modified Lentz), using ``I_x(a,b) = 1 − I_{1−x}(b,a)``
    on the side where the fraction converges fast. x in [0, 1], a, b > 0; broadcast.
    """
    x, a, b = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float64) for v in (x, a, b)))
    if bool(((x < 0) | (x > 1)).any()) or bool(((a <= 0) | (b <= 0)).any()):
        raise ValueError("beta_cdf needs x in [0, 1] and a, b > 0")
    flip = x > (a + 1.0) / (a + b + 2.0)
    xx, aa, bb = torch.where(flip, 1 - x, x), torch.where(flip, b, a), torch.where(flip, a, b)
    tiny = 1e-300
    inner = xx.clamp(tiny, 1 - 1e-16)
    log_front = (torch.lgamma(aa + bb) - torch.lgamma(aa) - torch.lgamma(bb)
                 + aa * torch.log(inner) + bb * torch.log1p(-inner))
    c = torch.ones_like(xx)
    d = 1.0 - (aa + bb) * xx / (aa + 1.0)
    d = 1.0 / torch.where(d.abs() < tiny, torch.full_like(d, tiny), d)
    h = d.clone()
    for m in range(1, iterations + 1):
        for coef in (m * (bb - m) * xx / ((aa + 2 * m - 1) * (aa + 2 * m)),
                     -(aa + m) * (aa + bb + m) * xx / ((aa + 2 * m) * (aa + 2 * m + 1))):
            d = 1.0 + coef * d
            d = 1.0 / torch.where(d.abs() < tiny, torch.full_like(d, tiny), d)
            c = 1.0 + coef / c
            c = torch.where(c.abs() < tiny, torch.full_like(c, tiny), c)
            h = h * d * c
        if bool(((d * c - 1.0).abs() < 1e-15).all()):
            break
    val = torch.exp(log_front) * h / aa
    val = torch.where(xx <= 0, torch.zeros_like(val), val)
    return torch.where(flip, 1.0 - val, val)


def attribute_log_likelihood(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    concentration: float = 24.0,
    num_levels: int = 5,
    max_value: float = 4.0,
    eps: float = 1e-4,
) -> torch.Tensor:
    """``log P(a | x, y)`` from a regression reward model (REFERENCE section 5).

    Each predicted attribute ``ŷ`` (on the 0..max_value scale) is scaled to
    ``r = ŷ / max_value`` (clamped to [eps, 1−eps]) and modelled as
    ``Beta(α = c·r, β = c − α)`` with ``c = concentration`` (24). The probability of level
    ``n`` of the 0..num_levels−1 scale is the Beta mass of bin n, with equal-width bins
    ``[n/num_levels, (n+1)/num_levels]`` on [0, 1] (the papers do not publish their bin
    edges; this is this module's choice). Attributes combine as a product: the result is
    ``Σ_j mask_j · log P(a_j = target_j)``.

    pred: [b, N] float; target: [b, N] integer levels; mask: [b, N] (1 = conditioned on).
    Returns [b] float64 (no gradient: a precomputed quantity).
    """
    if pred.shape != target.shape:
        raise ValueError(f"target has shape {tuple(target.shape)}; expected {tuple(pred.shape)} like pred")
    levels = torch.as_tensor(target).detach().double()
    if bool(((levels < 0) | (levels > num_levels - 1) | (levels != levels.round())).any()):
        raise ValueError(f"attribute targets must be integers in 0..{num_levels - 1}")
    r = (pred.detach().double() / max_value).clamp(eps, 1 - eps)
    alpha = concentration * r
    beta = concentration - alpha
    lo, hi = levels / num_levels, (levels + 1) / num_levels
    # mass of [lo, hi]: take the difference on the side of the lighter tail (precision)
    upper = lo >= r
    p_lower_side = beta_cdf(hi, alpha, beta) - beta_cdf(lo, alpha, beta)
    p_upper_side = beta_cdf(1 - lo, beta, alpha) - beta_cdf(1 - hi, beta, alpha)
    p = torch.where(upper, p_upper_side, p_lower_side).clamp(min=1e-300)
    logp = p.log()
    if mask is not None:
        m = torch.as_tensor(mask).to(logp.dtype)
        logp = torch.where(m != 0, logp * m, torch.zeros_like(logp))
    return logp.sum(-1)
