"""The DPO family on the shared loop: DPO, IPO, RPO variants, margin / scaled DPO, SFT mixing.

Samples are pairs ``{"chosen", "chosen_loss_mask", "rejected", "rejected_loss_mask",
"strength", "index", ...}`` (``index``: the sample's position in the training set), with the
optional ``margin`` (margin DPO; else the strength, :func:`aligner.algorithms.sft.pair_margin`)
and ``reward_gap`` = r*_chosen − r*_rejected (RPO: every pair must have one; the data layer
takes it from ``chosen_reward`` / ``rejected_reward``).
The chosen and rejected response of a pair always share a micro-batch (padded: adjacent
rows; packed: the same bin, so a pair must fit one bin of ``data.max_length`` tokens:
checked before training). Per response, ``logp = Σ_t mask · log π(y_t)`` over response
tokens (or the per-token mean with ``average_log_probs``); the loss is
:func:`aligner.algorithms.losses.preference_loss` of kind ``loss_type`` (docs/dpo.md),
averaged over pairs of the global batch.

The reference model is the initial policy, always: :meth:`DPOAlgorithm.setup` runs before
the loop resumes a checkpoint (:meth:`aligner.training.loop.TrainingLoop.fit`), so it sees
the initial weights (``init.hf``, or the seeded random initialisation), both in a fresh run
and in a resumed one. Two ways to use it (``reference``):

- ``precompute``: before training, forward-only passes with the initial weights store each
  pair's reference log-probs (summed, and token counts) in a table indexed by ``index``:
  first epoch 0's global batches exactly as step 0.. will see them (same batches, shapes and
  ranks, so the policy's log-probs at step 0 equal the reference bit for bit), then the
  pairs beyond epoch 0's last full global batch in extra batches, so every training pair
  has its reference in every epoch (later epochs reshuffle). A resumed run recomputes the
  table from the initial weights (one forward pass over the data, as at the start): the
  same numbers bit for bit at the same layout.
- ``resident``: the initial weights are kept in host memory (the ``reference`` role of the
  online algorithms, :class:`aligner.training.roles.ReferencePolicy` in host mode); before
  each step they are swapped into the model for a forward-only pass over the step's pairs,
  then the policy weights are swapped back. No precompute pass; costs two weight copies per
  step.

Validation pairs get their reference log-probs in ``setup`` either way (indices after the
training set's, batched as ``evaluate()`` batches them).

Checkpoint state (:meth:`DPOAlgorithm.state_dict`): a resume needs no stored table (it is
recomputed), so the state records what the reference was computed over — the reference
kind, and per split the number of pairs, their token count and the sum of |reference
log-prob| — and :meth:`load_state_dict` refuses a resume whose recomputed reference
disagrees (other data: counts differ; other initial weights: the sum differs by more than
a relative 1e-3, far above layout round-off).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from aligner.algorithms.losses import preference_loss
from aligner.algorithms.sft import TokenAlgorithm, pair_margin
from aligner.parallel import get_device
from aligner.training.algorithm import metric
from aligner.training.batching import per_item_sum, shifted_logprobs


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
        reference: str = "precompute",
        packing: bool = False,
        capacity: Optional[int] = None,
    ):
        super().__init__(pad_id, packing, capacity)
        if reference not in ("precompute", "resident"):
            raise ValueError(f"dpo.reference must be 'precompute' or 'resident', got {reference!r}")
        self.loss_type = loss_type
        self.beta = beta
        self.average_log_probs = average_log_probs
        self.sft_weight = sft_weight
        self.preference_weight = preference_weight
        self.eta = eta
        self.reference = reference
        self.rows_per_sample = 2
        self._ref: Optional[torch.Tensor] = None  # [n_train + n_val, 4]: logp_c, logp_r, count_c, count_r
        self._collect = False
        self._host_ref = None
        self._summary: Optional[Dict[str, dict]] = None

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
    def response_logps(self, batch, logits):
        lp = shifted_logprobs(logits, batch["tokens"]).float()
        mask = batch["loss_mask"]
        sums = per_item_sum(lp * mask, batch)
        counts = per_item_sum(mask, batch)
        return sums[0::2], sums[1::2], counts[0::2], counts[1::2]

    def loss(self, batch, logits):
        lc, lr, cc, cr = self.response_logps(batch, logits)
        n = lc.numel()
        if self._collect:  # reference pass: record, no loss
            self._ref[batch["index"].to(self._ref.device)] = torch.stack([lc, lr, cc, cr], -1).detach().double().cpu()
            zero = logits.sum() * 0.0
            return zero, torch.tensor(n), {}
        ref = self._ref[batch["index"].cpu()].to(lc.device)
        unseen = (ref[:, 2] == 0) & (cc > 0)  # a pair no reference pass saw (its row is still zero)
        if bool(unseen.any()):
            missing = batch["index"].cpu()[unseen.cpu()].tolist()
            raise RuntimeError(f"DPO: no reference log-probs for the pairs of index {missing}")
        rc, rr = ref[:, 0].to(lc.dtype), ref[:, 1].to(lc.dtype)
        pc, pr = lc, lr
        if self.average_log_probs:
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
    def _reference_pass(self, trainer, samples, seq_length):
        self._collect = True
        try:
            trainer.run_schedule(samples, forward_only=True, seq_length=seq_length)
        finally:
            self._collect = False

    def setup(self, trainer):
        """Check the data, then compute the reference from the models' current (= initial) weights."""
        super().setup(trainer)  # packing: every pair fits one bin
        self._check_reward_gaps(trainer)
        n_train = len(trainer.train_data)
        val = trainer.val_data or []
        self._ref = torch.zeros(n_train + len(val), 4, dtype=torch.float64)
        gbs = trainer.cfg.global_batch_size
        batches: List[List[dict]] = []
        # validation pairs: indices after the training set's, batched as evaluate() batches them
        for start in range(0, len(val), gbs):
            batches.append([dict(val[i], index=n_train + i) for i in range(start, min(start + gbs, len(val)))])
        if self.reference == "precompute":
            # epoch 0 batch for batch as training will see it (step 0 reproduces these numbers
            # bit for bit), then the pairs of epoch 0's unused tail: later epochs train them
            covered = set()
            for step in range(trainer.steps_per_epoch):
                samples = trainer.global_batch(step)
                covered.update(int(s["index"]) for s in samples)
                batches.append(samples)
            tail = [trainer.train_data[i] for i in range(n_train) if i not in covered]  # index i: position i
            batches += [tail[i : i + gbs] for i in range(0, len(tail), gbs)]
        else:
            from aligner.training.roles import ReferencePolicy

            # the online algorithms' reference role: initial weights on the host, swapped in
            self._host_ref = ReferencePolicy(trainer.models, mode="host")
        for m in trainer.models:
            m.eval()
        with torch.no_grad():
            for samples in batches:
                self._reference_pass(trainer, trainer._local(samples), trainer._seq_length(samples))
        for m in trainer.models:
            m.train()
        self._reduce_table()
        self._summary = self._table_summary(n_train)

    def _check_reward_gaps(self, trainer):
        if not self.loss_type.startswith("rpo"):
            return
        for split, data in (("training", trainer.train_data), ("validation", trainer.val_data or [])):
            missing = [s for s in data if s.get("reward_gap") is None]
            if missing:
                where = f"line {missing[0]['line']}" if "line" in missing[0] else f"index {missing[0].get('index')}"
                raise ValueError(
                    f"dpo.loss_type = {self.loss_type} needs the ground-truth rewards of every pair (fields"
                    f" 'chosen_reward' and 'rejected_reward'); {len(missing)} {split} pairs have none (first: {where})"
                )

    def _table_summary(self, n_train: int) -> Dict[str, dict]:
        """Per split: pairs with a reference, their token count, Σ|reference log-prob| (all ranks alike)."""
        parts = {"validation": self._ref[n_train:]}
        if self.reference == "precompute":
            parts["training"] = self._ref[:n_train]
        return {
            split: {"pairs": int(t.shape[0]), "tokens": int(t[:, 2:].sum()), "abs_logps": float(t[:, :2].abs().sum())}
            for split, t in parts.items()
        }

    def _reduce_table(self):
        """Each pair's row was filled by one data-parallel rank on the last pipeline stage: sum
        over DP ranks, then send the table to every pipeline stage (each rank holds it all)."""
        reduce = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_data_parallel_world_size() > 1
        send = ps.get_pipeline_model_parallel_world_size() > 1
        if not (reduce or send):
            return
        table = self._ref.to(get_device())  # the collectives' device (NCCL takes no host tensors)
        if reduce:
            dist.all_reduce(table, group=ps.get_data_parallel_group())
        if send:
            dist.broadcast(table, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        self._ref = table.cpu()

    @torch.no_grad()
    def before_step(self, trainer, local_samples, seq_length):
        if self.reference != "resident":
            return
        with self._host_ref.active():
            self._reference_pass(trainer, local_samples, seq_length)

    def state_dict(self):
        """What the reference was computed over (see the module docstring): checked on resume."""
        return {"reference": self.reference, "reference_table": self._summary or {}}

    def load_state_dict(self, state):
        """Refuse a resume whose recomputed reference is not the run's (other data or initial weights)."""
        saved = state.get("reference_table") or {}
        for split, mine in (self._summary or {}).items():
            theirs = saved.get(split)
            if theirs is None:
                continue  # e.g. the run began with reference=resident: no training table to compare
            if (theirs["pairs"], theirs["tokens"]) != (mine["pairs"], mine["tokens"]):
                raise ValueError(
                    f"resume: the {split} data differ from the checkpoint's run ({theirs['pairs']} pairs of"
                    f" {theirs['tokens']} response tokens then, {mine['pairs']} of {mine['tokens']} now)"
                )
            if not math.isclose(theirs["abs_logps"], mine["abs_logps"], rel_tol=1e-3):
                raise ValueError(
                    f"resume: the reference log-probs recomputed from the initial weights differ from the"
                    f" checkpoint's run on the {split} pairs (Σ|log p| {mine['abs_logps']:.6g} now,"
                    f" {theirs['abs_logps']:.6g} then): the initial weights (init.hf, or model and"
                    f" trainer.seed) changed since the run began"
                )
