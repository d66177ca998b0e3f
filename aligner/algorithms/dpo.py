"""The DPO family on the shared loop (docs/dpo.md): DPO, IPO, RPO variants, margin / scaled
DPO, the reference-free ORPO and SimPO, SFT mixing, and any preference loss registered
later; ``aligner train dpo``.

Samples are pairs (chosen and rejected share a micro-batch: adjacent rows, or one packing
bin). Per response, ``logp = Σ_t mask · log π(y_t)`` over response tokens (the per-token
mean with ``average_log_probs``); the loss is
:func:`aligner.algorithms.losses.preference.preference_loss` of kind ``loss_type``,
averaged over the pairs of the global batch.

The reference is the initial policy: :meth:`DPOAlgorithm.setup` runs before the loop
resumes a checkpoint, so it sees the initial weights. ``reference: precompute`` stores each
pair's reference log-probs once, in batches exactly as training will see them (so the
policy's log-probs at step 0 equal the reference bit for bit), recomputed on resume and
checked against the checkpoint's summary; ``resident`` keeps the initial weights in host
memory and swaps them in for a forward before each step. A loss registered without a
reference (ORPO, SimPO) gets neither: no reference pass, no table, no weight copy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from aligner.algorithms.base import (
    Reference,
    RunConfig,
    TokenAlgorithm,
    Trainer,
    init_from_hf,
    pair_count,
    pair_logps,
    pair_margin,
    computing_reference,
    check_reference_table,
    coverage_summary,
    reduce_table,
    reference_batches,
    reference_scope,
    reference_steps,
    resumes_whole_table,
    register_trainer,
)
from aligner.algorithms.losses.preference import PREFERENCE_LOSSES, preference_loss
from aligner.config import ConfigError, registered
from aligner.training.config import InitSection
from aligner.training.metrics import metric
from aligner.training.roles import ReferencePolicy


# ------------------------------------------------------------------------------ config
@dataclass
class DPOSection:
    """``dpo``: the DPO family (docs/dpo.md)."""

    loss_type: str = registered(PREFERENCE_LOSSES, "dpo")  # a registered preference loss
    beta: float = 0.1  # the KL strength (> 0)
    average_log_probs: bool = False  # per-token mean log-probs instead of sums
    sft_weight: float = 0.0  # weight of the NLL on the chosen response
    preference_weight: float = 1.0  # weight of the preference loss
    eta: float = 1.0  # the reward-gap scale of the losses that read it (RPO)
    gamma: float = 0.5  # SimPO's target reward margin γ
    reference: Reference = Reference.precompute


@dataclass
class DPOConfig(RunConfig):
    """DPO family, from an SFT model (``init.hf`` required)."""

    algorithm: str = "dpo"
    init: InitSection = field(default_factory=init_from_hf)
    dpo: DPOSection = field(default_factory=DPOSection)


def check_dpo_section(p, key: str = "dpo") -> None:
    """The ``dpo`` section's values and combinations (ConfigError naming the key)."""
    if not p.beta > 0:
        raise ConfigError(f"{key}.beta = {p.beta!r}: expected > 0")
    for name in ("sft_weight", "preference_weight"):
        if p[name] < 0:
            raise ConfigError(f"{key}.{name} = {p[name]!r}: expected >= 0")
    if p.sft_weight == 0 and p.preference_weight == 0:
        raise ConfigError(f"{key}.sft_weight and {key}.preference_weight are both 0: nothing would be trained")
    eta_losses = [name for name, loss in PREFERENCE_LOSSES.items() if "eta" in loss.inputs]
    if p.eta != DPOSection.eta and p.loss_type not in eta_losses:
        raise ConfigError(f"{key}.eta = {p.eta} has no effect with {key}.loss_type = {p.loss_type!r}"
                          f" (only the {', '.join(eta_losses)} losses scale the reward gap)",
                          hint=f"remove the override, or set {key}.loss_type to one of those")
    if not p.eta > 0:
        raise ConfigError(f"{key}.eta = {p.eta!r}: expected > 0")
    if p.loss_type in PREFERENCE_LOSSES and not PREFERENCE_LOSSES[p.loss_type].reference \
            and p.reference != DPOSection.reference:
        raise ConfigError(f"{key}.reference = {p.reference} has no effect with {key}.loss_type = {p.loss_type!r}"
                          " (a reference-free loss: no reference pass, no reference weights)",
                          hint="remove the override")
    gamma_losses = [name for name, loss in PREFERENCE_LOSSES.items() if "gamma" in loss.inputs]
    if p.gamma != DPOSection.gamma and p.loss_type not in gamma_losses:
        raise ConfigError(f"{key}.gamma = {p.gamma} has no effect with {key}.loss_type = {p.loss_type!r}"
                          f" (only the {', '.join(gamma_losses)} losses read a target margin)",
                          hint=f"remove the override, or set {key}.loss_type to one of those")


# ------------------------------------------------------------------------------ algorithm


class DPOAlgorithm(TokenAlgorithm):
    name = "dpo"

    def __init__(
        self,
        pad_id: int,
        *,
        loss_type: str = "dpo",
        beta: float = 0.1,
        average_log_probs: bool = False,
        sft_weight: float = 0.0,
        preference_weight: float = 1.0,
        eta: float = 1.0,
        gamma: float = 0.5,
        reference: str = "precompute",
        packing: bool = False,
        capacity: Optional[int] = None,
    ):
        super().__init__(pad_id, packing, capacity)
        if reference not in tuple(Reference):
            raise ValueError(f"dpo.reference must be 'precompute' or 'resident', got {reference!r}")
        self.loss_type = loss_type
        self.beta = beta
        self.average_log_probs = average_log_probs
        self.sft_weight = sft_weight
        self.preference_weight = preference_weight
        self.eta = eta
        self.gamma = gamma
        self.reference = reference
        entry = PREFERENCE_LOSSES[loss_type]
        self.needs_reference = entry.reference  # ORPO, SimPO: no reference pass, no reference weights
        self.length_normalised = average_log_probs or entry.length_normalised
        self.rows_per_sample = 2
        self._ref: Optional[torch.Tensor] = None  # [n_train + n_val, 4]: logp_c, logp_r, count_c, count_r
        self._collect = False
        self._host_ref = None
        self._summary: Optional[Dict[str, dict]] = None
        self._steps: Optional[int] = None  # the epoch-0 steps the training table covers (None: every pair)

    def groups(self, sample):
        return [
            (sample["chosen"], sample["chosen_loss_mask"]),
            (sample["rejected"], sample["rejected_loss_mask"]),
        ]

    def attach(self, batch, samples):
        batch["index"] = torch.tensor([int(s["index"]) for s in samples], dtype=torch.long)
        batch["strength"] = torch.tensor([abs(float(s.get("strength", 0.0))) for s in samples])
        batch["margin"] = torch.tensor([pair_margin(s) for s in samples])
        # NaN where a pair has no rewards: only the RPO kinds read it, and setup() refuses such data for them
        gaps = [s.get("reward_gap") for s in samples]
        batch["reward_gap"] = torch.tensor([float("nan") if g is None else float(g) for g in gaps])
        return batch

    # ------------------------------------------------------------------ log-probs
    def loss_count(self, batch):
        return pair_count(batch)  # pairs

    def loss(self, batch, logits):
        lc, lr, cc, cr = pair_logps(batch, logits)
        n = lc.numel()
        if self._collect:  # reference pass: record, no loss
            self._ref[batch["index"].to(self._ref.device)] = torch.stack([lc, lr, cc, cr], -1).detach().double().cpu()
            zero = logits.sum() * 0.0
            return zero, torch.tensor(n), {}
        if self.needs_reference:
            ref = self._ref[batch["index"].cpu()].to(lc.device)
            unseen = (ref[:, 2] == 0) & (cc > 0)  # a pair no reference pass saw (its row is still zero)
            if bool(unseen.any()):
                missing = batch["index"].cpu()[unseen.cpu()].tolist()
                raise RuntimeError(f"DPO: no reference log-probs for the pairs of index {missing}")
            rc, rr = ref[:, 0].to(lc.dtype), ref[:, 1].to(lc.dtype)
        else:
            rc, rr = torch.zeros_like(lc), torch.zeros_like(lr)
        pc, pr = lc, lr
        if self.length_normalised:
            pc, pr = lc / cc.clamp(min=1), lr / cr.clamp(min=1)
            rc, rr = rc / cc.clamp(min=1), rr / cr.clamp(min=1)
        chosen_nll = -lc / cc.clamp(min=1)
        loss, stats = preference_loss(
            self.loss_type,
            pc,
            pr,
            rc,
            rr,
            beta=self.beta,
            strength=batch["strength"],
            margin=batch["margin"],
            reward_gap=batch["reward_gap"],
            eta=self.eta,
            gamma=self.gamma,
            chosen_nll=chosen_nll,
            sft_weight=self.sft_weight,
            preference_weight=self.preference_weight,
        )
        total = loss * n
        metrics = {"loss": metric(total, n)}
        for key, value in stats.items():
            if torch.is_tensor(value) and value.numel() == 1:
                metrics[key] = metric(value.detach().double() * n, n)
        return total, torch.tensor(n), metrics

    # ------------------------------------------------------------------ reference
    def _reference_pass(self, loop, samples, seq_length):
        self._collect = True
        try:
            loop.run_schedule(samples, forward_only=True, seq_length=seq_length)
        finally:
            self._collect = False

    def setup(self, loop):
        """Check the data, then compute the reference from the models' current (= initial) weights."""
        super().setup(loop)  # packing: every pair fits one bin
        self._check_reward_gaps(loop)
        if not self.needs_reference:
            return
        n_train = len(loop.train_data)
        self._ref = torch.zeros(n_train + len(loop.val_data or []), 4, dtype=torch.float64)
        self._steps = reference_steps(loop, full=resumes_whole_table(loop))
        batches = reference_batches(loop, training=self.reference == Reference.precompute, steps=self._steps)
        if self.reference == Reference.resident:
            # the online algorithms' reference role: initial weights on the host, swapped in
            self._host_ref = ReferencePolicy(loop.models, mode="host")
        scope = reference_scope(loop, batches, "pairs")
        if self.reference == Reference.precompute and self._steps is not None:
            scope += f" (those of the run's {self._steps} steps)"
        with computing_reference(loop, self.name, scope):
            for samples in batches:
                self._reference_pass(loop, loop.local_share(samples), loop.seq_length(samples))
        self._ref = reduce_table(self._ref)
        self._summary = self._table_summary(loop, n_train)

    def _check_reward_gaps(self, loop):
        """Every pair carries ``reward_gap`` when the loss reads it (its declared inputs)."""
        if "reward_gap" not in PREFERENCE_LOSSES[self.loss_type].inputs:
            return
        for split, data in (("training", loop.train_data), ("validation", loop.val_data or [])):
            missing = [s for s in data if s.get("reward_gap") is None]
            if missing:
                where = f"line {missing[0]['line']}" if "line" in missing[0] else f"index {missing[0].get('index')}"
                raise ValueError(
                    f"dpo.loss_type = {self.loss_type} needs the ground-truth rewards of every pair (fields"
                    f" 'chosen_reward' and 'rejected_reward'); {len(missing)} {split} pairs have none (first: {where})"
                )

    def _table_summary(self, loop, n_train: int) -> Dict[str, dict]:
        """Per split: the pairs, the response tokens and Σ|reference log-prob| of those the
        table covers (all ranks alike); for the training pairs also per covered step
        (:func:`aligner.algorithms.base.coverage_summary`), so that a run resumed with another
        length compares what both computed."""
        parts = {"validation": self._ref[n_train:]}
        if self.reference == Reference.precompute:
            parts["training"] = self._ref[:n_train]
        out = {
            split: {"pairs": int(t.shape[0]), "tokens": int(t[:, 2:].sum()), "abs_logps": float(t[:, :2].abs().sum())}
            for split, t in parts.items()
        }
        if "training" in out:
            t = parts["training"]
            out["training"].update(coverage_summary(loop, self._steps, t[:, 2:].sum(-1), t[:, :2].abs().sum(-1)))
        return out

    @torch.no_grad()
    def before_step(self, loop, local_samples, seq_length):
        if self.reference != Reference.resident or not self.needs_reference:
            return
        with self._host_ref.active():
            self._reference_pass(loop, local_samples, seq_length)

    def state_dict(self):
        """What the reference was computed over — the kind, and per split the pairs, their tokens and
        Σ|reference log-prob| — checked on resume (:meth:`load_state_dict`)."""
        return {"reference": self.reference, "reference_table": self._summary or {}}

    def load_state_dict(self, state):
        """Refuse a resume whose recomputed reference is not the run's (other data or initial weights)."""
        saved = state.get("reference_table") or {}
        for split, mine in (self._summary or {}).items():
            theirs = saved.get(split)
            if theirs is not None:  # None: e.g. the run began with reference=resident, no training table
                check_reference_table(split, theirs, mine, "pairs", "pairs")


# ------------------------------------------------------------------------------ trainer
@register_trainer("dpo")
class DPOTrainer(Trainer):
    """``aligner train dpo``."""

    schema = DPOConfig
    data_kind = "pairs"

    @classmethod
    def check(cls, cfg):
        check_dpo_section(cfg.dpo)

    def algorithm(self):
        p, d = self.cfg.dpo, self.cfg.data
        return DPOAlgorithm(
            self.tokenizer().pad_id,
            loss_type=p.loss_type,
            beta=p.beta,
            average_log_probs=p.average_log_probs,
            sft_weight=p.sft_weight,
            preference_weight=p.preference_weight,
            eta=p.eta,
            gamma=p.gamma,
            reference=str(p.reference),
            packing=d.packing,
            capacity=d.max_length,
        )
