"""KTO on the shared loop (docs/kto.md): unpaired responses labelled desirable or undesirable
(Ethayarajh et al. 2024, arXiv 2402.01306); ``aligner train kto``.

Samples are the rows of the data (kind ``unpaired``, :mod:`aligner.data.datasets`): one
labelled response per ``unpaired`` row, or both responses of a pair (chosen desirable,
rejected undesirable), which then share a micro-batch. Per response ``ρ = log π(y|x) − log
π_ref(y|x)`` (summed over the response tokens); the loss is
:func:`aligner.algorithms.losses.kto.kto_loss`, the mean over the responses of the global
batch, against the reference point ``z_ref`` of the step. ``kto.sft_weight`` adds DPO's SFT
term (docs/dpo.md) on the desirable responses: the mean over the global batch's desirable
responses of each one's NLL averaged over its tokens (the step's response and desirable
counts are taken from the global batch before the step, so every micro-batch divides by
them: the same number under every layout).

The reference point: before each step the responses of the global batch are put in data
order, and row ``i`` gets the completion of the row before it after its own prompt
(:func:`~aligner.algorithms.losses.kto.mismatched_rows`: TRL's rotation by one, passing over
a row of the same prompt); policy and reference log-probs of these mismatched sequences
give ``z_ref = max(0, mean(log π − log π_ref))`` over the whole global batch (every
data-parallel rank's share), detached: the same number under every layout and micro-batch
size. The policy's pass is forward-only at the step's starting weights, as TRL's (under
``no_grad``).

The reference is the initial policy, as DPO's (docs/dpo.md): ``reference: precompute``
computes each response's reference log-probs once (epoch 0's batches as training sees
them, so step 0's policy log-probs equal them bit for bit) and the reference log-probs of
every step's mismatched sequences (one forward per step's batch, at the start), recomputed
on resume and checked against the checkpoint's summary; ``resident`` keeps the initial
weights in host memory and swaps them in for both before each step. Validation uses the
reference point of the last training step.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from aligner.algorithms.base import (
    Reference,
    RunConfig,
    TokenAlgorithm,
    Trainer,
    computing_reference,
    WEIGHTS_CHANGED,
    check_reference_table,
    coverage_summary,
    init_from_hf,
    reduce_table,
    reference_batches,
    reference_scope,
    reference_steps,
    register_trainer,
    resumes_whole_table,
)
from aligner.algorithms.losses.kto import kto_loss, kto_reference_point, mismatched_rows
from aligner.config import ConfigError
from aligner.runtime import UserError, is_rank0
from aligner.training.batching import per_item_sum, shifted_logprobs
from aligner.training.config import InitSection
from aligner.training.metrics import metric
from aligner.training.roles import ReferencePolicy

# the paper's guidance (section 4.2): λ_D n_D / (λ_U n_U) in [1, 4/3]
WEIGHT_RATIO = (1.0, 4.0 / 3.0)


# ------------------------------------------------------------------------------ config
@dataclass
class KTOSection:
    """``kto``: KTO (docs/kto.md)."""

    beta: float = 0.1  # the KL strength β (> 0)
    desirable_weight: float = 1.0  # λ_D
    undesirable_weight: float = 1.0  # λ_U
    sft_weight: float = 0.0  # weight of the NLL on the desirable responses (0: the paper's objective)
    reference: Reference = Reference.precompute


@dataclass
class KTOConfig(RunConfig):
    """KTO, from an SFT model (``init.hf`` required), on unpaired rows or pairs split in two."""

    algorithm: str = "kto"
    init: InitSection = field(default_factory=init_from_hf)
    kto: KTOSection = field(default_factory=KTOSection)


def check_kto_section(p, key: str = "kto") -> None:
    """The ``kto`` section's values (ConfigError naming the key)."""
    if not p.beta > 0:
        raise ConfigError(f"{key}.beta = {p.beta!r}: expected > 0")
    for name in ("desirable_weight", "undesirable_weight"):
        if not p[name] > 0:
            raise ConfigError(f"{key}.{name} = {p[name]!r}: expected > 0")
    if not p.sft_weight >= 0:
        raise ConfigError(f"{key}.sft_weight = {p.sft_weight!r}: expected >= 0")


def weight_advice(n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float,
                  key: str = "kto") -> Optional[str]:
    """A line of advice when ``λ_D n_D / (λ_U n_U)`` is outside the paper's [1, 4/3] (None
    inside it, or when one label is absent): the values of either weight that bring it in."""
    if not n_desirable or not n_undesirable:
        return None
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    lo, hi = WEIGHT_RATIO
    if lo <= ratio <= hi:
        return None
    d_lo, d_hi = (r * undesirable_weight * n_undesirable / n_desirable for r in (lo, hi))
    u_lo, u_hi = (desirable_weight * n_desirable / (r * n_undesirable) for r in (hi, lo))
    return (f"KTO: {n_desirable} desirable and {n_undesirable} undesirable training responses give"
            f" {key}.desirable_weight·n_D / ({key}.undesirable_weight·n_U) = {ratio:.3g}, outside the paper's"
            f" [1, 4/3]: set {key}.desirable_weight in [{d_lo:.3g}, {d_hi:.3g}] or {key}.undesirable_weight in"
            f" [{u_lo:.3g}, {u_hi:.3g}]")


# ------------------------------------------------------------------------------ algorithm
def response_start(mask: torch.Tensor) -> int:
    """Where a sequence's response begins: its first target token (the data layer keeps the
    last assistant turn's targets only, so what comes before is the prompt)."""
    on = torch.nonzero(mask > 0)
    return int(on[0, 0]) if on.numel() else int(mask.numel())


class KTOAlgorithm(TokenAlgorithm):
    name = "kto"

    def __init__(
        self,
        pad_id: int,
        *,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        sft_weight: float = 0.0,
        reference: str = "precompute",
        max_length: Optional[int] = None,
        packing: bool = False,
        capacity: Optional[int] = None,
    ):
        super().__init__(pad_id, packing, capacity)
        if reference not in tuple(Reference):
            raise ValueError(f"kto.reference must be 'precompute' or 'resident', got {reference!r}")
        if not beta > 0:
            raise ValueError(f"kto.beta must be > 0, got {beta}")
        self.beta = beta
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight
        if not sft_weight >= 0:
            raise ValueError(f"kto.sft_weight must be >= 0, got {sft_weight}")
        self.sft_weight = sft_weight
        self.reference = reference
        self.max_length = max_length
        self._ref: Optional[torch.Tensor] = None  # [n_train + n_val, 2, 2]: per response (logp, count)
        self._ref_kl: Optional[torch.Tensor] = None  # precompute: [max_steps, rows] the mismatched rows' ref logps
        self._kl: Optional[torch.Tensor] = None  # the pass being collected: [rows] log-probs
        self._collect: Optional[str] = None  # None (training), "reference" or "kl"
        self._z: Optional[torch.Tensor] = None  # the step's reference point
        self._totals: Optional[tuple] = None  # the step's (responses, desirable responses), global batch
        self._host_ref = None
        self._summary: Optional[Dict[str, dict]] = None
        self._steps: Optional[int] = None  # the epoch-0 steps the training table covers (None: every sample)

    # ------------------------------------------------------------------ batches
    def groups(self, sample):
        return list(sample["responses"])

    def attach(self, batch, samples):
        rows = [(s, k) for s in samples for k in range(len(s["responses"]))]
        batch["index"] = torch.tensor([int(s["index"]) for s, _ in rows], dtype=torch.long)
        batch["row"] = torch.tensor([k for _, k in rows], dtype=torch.long)
        if all("kl_pos" in s for s in samples):  # the mismatched sequences of a step
            batch["kl_pos"] = torch.cat([s["kl_pos"] for s in samples])
        else:
            batch["desirable"] = torch.cat([s["labels"].to(torch.bool) for s in samples])
        return batch

    def mismatched(self, samples: Sequence[dict]) -> List[dict]:
        """The KL samples of a global batch, aligned with ``samples``: row ``p`` of the batch in
        data order (``index``, then the row in its sample) gets the prompt of ``p`` and the
        response of :func:`mismatched_rows`'s partner; ``kl_pos`` is ``p``."""
        order = sorted(range(len(samples)), key=lambda i: int(samples[i]["index"]))
        rows = [(i, k) for i in order for k in range(len(samples[i]["responses"]))]
        split = []
        for i, k in rows:
            tokens, mask = samples[i]["responses"][k]
            start = response_start(mask)
            split.append((tokens[:start], tokens[start:], mask[start:]))
        partner = mismatched_rows(len(rows), [tuple(p.tolist()) for p, _, _ in split]).tolist()
        out = [{"responses": [], "kl_pos": [], "index": s["index"]} for s in samples]
        for pos, ((i, _), q) in enumerate(zip(rows, partner)):
            prompt = split[pos][0]
            _, response, response_mask = split[q]
            tokens = torch.cat([prompt, response])
            mask = torch.cat([torch.zeros(prompt.numel()), response_mask.float()])
            if self.max_length and tokens.numel() > self.max_length:  # keep the response: drop prompt from the left
                tokens, mask = tokens[-self.max_length:], mask[-self.max_length:]
            out[i]["responses"].append((tokens, mask))
            out[i]["kl_pos"].append(pos)
        for s in out:
            s["kl_pos"] = torch.tensor(s["kl_pos"], dtype=torch.long)
        return out

    # ------------------------------------------------------------------ loss
    def loss_count(self, batch):
        return int(batch["num_items"])  # responses

    def loss(self, batch, logits):
        lp = shifted_logprobs(logits, batch["tokens"]).float()
        mask = batch["loss_mask"]
        logps = per_item_sum(lp * mask, batch)
        counts = per_item_sum(mask, batch)
        n = logps.numel()
        if self._collect is not None:  # a reference or mismatched pass: record, no loss
            if self._collect == "kl":
                self._kl[batch["kl_pos"].to(self._kl.device)] = logps.detach().double().cpu()
            else:
                idx, row = batch["index"].cpu(), batch["row"].cpu()
                self._ref[idx, row] = torch.stack([logps, counts], -1).detach().double().cpu()
            return logits.sum() * 0.0, torch.tensor(n), {}
        ref = self._ref[batch["index"].cpu(), batch["row"].cpu()].to(logps.device)
        unseen = (ref[:, 1] == 0) & (counts > 0)  # a response no reference pass saw
        if bool(unseen.any()):
            raise RuntimeError(f"KTO: no reference log-probs for the responses of index "
                               f"{batch['index'].cpu()[unseen.cpu()].tolist()}")
        z = self._z if self._z is not None else torch.zeros((), dtype=torch.float64)
        desirable = batch["desirable"].to(logps.device)
        # the step's counts divide both terms, so the micro-batches' totals add up to the step's loss
        # (validation, which takes no gradient, reuses the last step's; every logged loss is rebuilt
        # from the exact sums in finalize_metrics)
        totals = self._totals or (n, int(desirable.sum()))
        loss, stats = kto_loss(logps, ref[:, 0].to(logps.dtype), desirable, z.to(logps.device), self.beta,
                               self.desirable_weight, self.undesirable_weight,
                               desirable_nll=-logps / counts.clamp(min=1), sft_weight=self.sft_weight, totals=totals)
        total = loss * totals[0]  # the loop divides by the step's responses
        n_d = stats["count/desirable"].double()
        n_u = n - n_d
        with torch.no_grad():
            metrics = {
                "loss": metric(total, n),
                "loss/kto": metric(stats["loss/kto"].double() * n, n),
                "loss/sft": metric(stats["loss/sft"].double() * n_d, n_d),
                "kl": metric(stats["kl"].double() * n, n),
                "rewards/chosen": metric(stats["rewards/chosen"].double() * n_d, n_d),
                "rewards/rejected": metric(stats["rewards/rejected"].double() * n_u, n_u),
                "logps/chosen": metric(torch.where(desirable, logps.detach(), 0).sum(), n_d),
                "logps/rejected": metric(torch.where(~desirable, logps.detach(), 0).sum(), n_u),
                "fraction_desirable": metric(n_d, n),
            }
        return total, torch.tensor(n), metrics

    def finalize_metrics(self, means, sums):
        """``loss`` from its exact parts: the mean value over the responses plus ``sft_weight``
        times the mean NLL over the desirable ones (0 when there are none)."""
        out = dict(means)
        if "loss/kto" in sums:
            sft_sum, n_d = sums.get("loss/sft", (0.0, 0.0))
            out["loss/sft"] = sft_sum / n_d if n_d else 0.0
            out["loss"] = out["loss/kto"] + self.sft_weight * out["loss/sft"]
        return out

    # ------------------------------------------------------------------ passes
    def _pass(self, loop, kind, samples, seq_length):
        self._collect = kind
        try:
            loop.run_schedule(samples, forward_only=True, seq_length=seq_length)
        finally:
            self._collect = None

    def _kl_pass(self, loop, kl_samples, rows: int) -> torch.Tensor:
        """The summed log-probs of a step's mismatched sequences, [rows] (every DP rank's share;
        meaningful on the last pipeline stage)."""
        self._kl = torch.zeros(rows, dtype=torch.float64)
        self._pass(loop, "kl", loop.local_share(kl_samples), loop.seq_length(kl_samples))
        return reduce_table(self._kl, spread=False)

    def _step_kl(self, loop, step):
        samples = loop.global_batch(step)
        kl_samples = self.mismatched(samples)
        return kl_samples, sum(len(s["responses"]) for s in kl_samples)

    # ------------------------------------------------------------------ reference
    def setup(self, loop):
        """Check the data (two rows to mismatch, the weights' balance), then compute the
        reference from the models' current (= initial) weights."""
        super().setup(loop)
        self._check_labels(loop)
        n_train = len(loop.train_data)
        self._ref = torch.zeros(n_train + len(loop.val_data or []), 2, 2, dtype=torch.float64)
        self._steps = reference_steps(loop, full=resumes_whole_table(loop))
        batches = reference_batches(loop, training=self.reference == Reference.precompute, steps=self._steps)
        if self.reference == Reference.resident:
            self._host_ref = ReferencePolicy(loop.models, mode="host")
        scope = reference_scope(loop, batches, "samples")
        if self.reference == Reference.precompute:  # precompute covers the training samples: scope is not None
            if self._steps is not None:
                scope += f" (those of the run's {self._steps} steps)"
            scope += f" and the mismatched rows of {loop.max_steps} steps"
        with computing_reference(loop, self.name, scope):
            for samples in batches:
                self._pass(loop, "reference", loop.local_share(samples), loop.seq_length(samples))
            if self.reference == Reference.precompute:
                kl = []
                for step in range(loop.max_steps):  # every step's mismatched rows, as the step will batch them
                    kl_samples, rows = self._step_kl(loop, step)
                    kl.append(self._kl_pass(loop, kl_samples, rows))
                width = max(t.numel() for t in kl)
                self._ref_kl = torch.full((len(kl), width), math.nan, dtype=torch.float64)
                for step, t in enumerate(kl):
                    self._ref_kl[step, : t.numel()] = t
        self._ref = reduce_table(self._ref, spread=True)
        if self._ref_kl is not None:
            self._ref_kl = reduce_table(self._ref_kl, spread=True, summed=False)
        self._summary = self._table_summary(loop, n_train)

    def _check_labels(self, loop):
        """Each step needs two responses to mismatch; advise on the weights' balance (the paper's)."""
        rows = sum(len(s["responses"]) for s in loop.global_batch(0))
        if rows < 2:
            raise ValueError(f"KTO's reference point mismatches the responses of a step; a step of"
                             f" trainer.global_batch_size = {loop.cfg.global_batch_size} rows holds {rows}:"
                             " raise it to >= 2")
        labels = torch.cat([loop.train_data[i]["labels"] for i in range(len(loop.train_data))])
        advice = weight_advice(int(labels.sum()), int((~labels).sum()), self.desirable_weight, self.undesirable_weight)
        if advice and is_rank0():
            print(advice, file=sys.stderr, flush=True)

    def _table_summary(self, loop, n_train: int) -> Dict[str, dict]:
        """Per split: rows, response tokens, Σ|reference log-prob| (and the mismatched rows'), all
        ranks alike, of what the table covers; for the training rows also per covered step
        (:func:`aligner.algorithms.base.coverage_summary`)."""
        parts = {"validation": (self._ref[n_train:], None)}
        if self.reference == Reference.precompute:
            parts["training"] = (self._ref[:n_train], self._ref_kl)
        out = {}
        for split, (t, kl) in parts.items():
            out[split] = {"rows": int(t.shape[0]), "tokens": int(t[..., 1].sum()),
                          "abs_logps": float(t[..., 0].abs().sum())}
            if split == "training":
                out[split].update(coverage_summary(loop, self._steps, t[..., 1].sum(-1), t[..., 0].abs().sum(-1)))
            if kl is not None:
                per_step = kl.nan_to_num().abs().sum(-1)
                out[split]["abs_kl_logps"] = float(per_step.sum())
                # per step: a run extended on resume (trainer.max_steps) is compared over its first steps
                out[split]["abs_kl_logps_per_step"] = [float(v) for v in per_step]
        return out

    @torch.no_grad()
    def before_step(self, loop, local_samples, seq_length):
        """The step's reference point ``z_ref`` over the global batch (module docstring)."""
        step = loop.step
        samples = loop.global_batch(step)
        self._totals = (sum(len(s["labels"]) for s in samples), sum(int(s["labels"].sum()) for s in samples))
        kl_samples, rows = self._step_kl(loop, step)
        modes = [m.training for m in loop.models]
        for m in loop.models:
            m.eval()
        try:
            if self.reference == Reference.resident:
                with self._host_ref.active():
                    self._pass(loop, "reference", local_samples, seq_length)
                    ref_kl = self._kl_pass(loop, kl_samples, rows)
            else:
                ref_kl = self._ref_kl[step, :rows]
            policy_kl = self._kl_pass(loop, kl_samples, rows)
        finally:
            for m, mode in zip(loop.models, modes):
                m.train(mode)
        self._z = kto_reference_point(policy_kl, ref_kl)

    def state_dict(self):
        """What the reference was computed over (checked on resume) and the last reference point."""
        return {"reference": self.reference, "reference_table": self._summary or {},
                "z_ref": None if self._z is None else float(self._z)}

    def load_state_dict(self, state):
        """Refuse a resume whose recomputed reference is not the run's (other data or initial weights)."""
        if state.get("z_ref") is not None:
            self._z = torch.tensor(state["z_ref"], dtype=torch.float64)
        saved = state.get("reference_table") or {}
        for split, mine in (self._summary or {}).items():
            theirs = saved.get(split)
            if theirs is None:
                continue
            check_reference_table(split, theirs, mine, "rows", "rows")
            steps = "abs_kl_logps_per_step"  # the mismatched rows' reference, step by step where both have it
            if steps in theirs and steps in mine:  # each step both runs have (trainer.max_steps may change)
                pairs = [(f"abs_kl_logps of step {k + 1}", then, now)
                         for k, (then, now) in enumerate(zip(theirs[steps], mine[steps]))]
                why = WEIGHTS_CHANGED
            else:  # a checkpoint without the steps' sums: the totals
                pairs = [("abs_kl_logps", theirs["abs_kl_logps"], mine["abs_kl_logps"])] \
                    if "abs_kl_logps" in theirs and "abs_kl_logps" in mine else []
                why = (WEIGHTS_CHANGED + ", or trainer.max_steps did (a checkpoint without the reference's per-step"
                       " sums resumes at its own trainer.max_steps only)")
            for what, then, now in pairs:
                if not math.isclose(then, now, rel_tol=1e-3):
                    raise UserError(f"resume: the reference log-probs recomputed from the initial weights differ from"
                                    f" the checkpoint's run on the {split} rows ({what} {now:.6g} now, {then:.6g}"
                                    f" then): {why}")


# ------------------------------------------------------------------------------ trainer
@register_trainer("kto")
class KTOTrainer(Trainer):
    """``aligner train kto``."""

    schema = KTOConfig
    data_kind = "unpaired"

    @classmethod
    def check(cls, cfg):
        check_kto_section(cfg.kto)
        if cfg.data.packing:
            raise ConfigError("data.packing = true: KTO batches its mismatched sequences unpacked; set"
                              " data.packing=false")

    def algorithm(self):
        p, d = self.cfg.kto, self.cfg.data
        return KTOAlgorithm(
            self.tokenizer().pad_id,
            beta=p.beta,
            desirable_weight=p.desirable_weight,
            undesirable_weight=p.undesirable_weight,
            sft_weight=p.sft_weight,
            reference=str(p.reference),
            max_length=d.max_length,
            packing=d.packing,
            capacity=d.max_length,
        )
