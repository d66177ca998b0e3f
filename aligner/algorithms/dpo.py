"""The DPO family on the shared loop: DPO, IPO, RPO variants, margin / scaled DPO, SFT mixing.

Samples are pairs ``{"chosen", "chosen_loss_mask", "rejected", "rejected_loss_mask",
"strength", "index", ...}`` (``index``: the sample's position in the training set).
The chosen and rejected response of a pair always share a micro-batch (padded: adjacent
rows; packed: the same bin). Per response, ``logp = Σ_t mask · log π(y_t)`` over response
tokens (or the per-token mean with ``average_log_probs``); the loss is
:func:`aligner.algorithms.losses.preference_loss` of kind ``loss_type`` (../REFERENCE
section 3), averaged over pairs of the global batch.

Reference model, two ways (``reference``):

- ``precompute``: before training, one forward-only pass over the training set with the
  initial weights stores each pair's reference log-probs (summed and token counts) in a
  table indexed by ``index``; training then needs no second model.
- ``resident``: the reference weights are kept in host memory; before each step they are
  swapped into the model for a forward-only pass over the step's pairs, then the policy
  weights are swapped back. Same numbers, no precompute pass; costs two weight copies
  per step.

Either way the reference log-probs come from the very same forward path as the policy's,
so at step 0 they are identical under every TP / PP layout (implicit rewards exactly 0).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from aligner.algorithms.losses import preference_loss
from aligner.algorithms.sft import TokenAlgorithm
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
        self._ref: Optional[torch.Tensor] = None  # [n_train, 4]: logp_c, logp_r, count_c, count_r
        self._collect = False
        self._host_ref = None

    def groups(self, sample):
        return [
            (sample["chosen"], sample["chosen_loss_mask"]),
            (sample["rejected"], sample["rejected_loss_mask"]),
        ]

    def attach(self, batch, samples):
        batch["index"] = torch.tensor([int(s["index"]) for s in samples], dtype=torch.long)
        batch["strength"] = torch.tensor([abs(float(s.get("strength", 0.0))) for s in samples])
        batch["reward_gap"] = torch.tensor([float(s.get("reward_gap", s.get("margin", 0.0))) for s in samples])
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
        val = trainer.val_data or []
        self._ref = torch.zeros(len(trainer.train_data) + len(val), 4, dtype=torch.float64)
        for m in trainer.models:
            m.eval()
        with torch.no_grad():
            # validation pairs: indices after the training set's, batched as evaluate() batches them
            gbs = trainer.cfg.global_batch_size
            for start in range(0, len(val), gbs):
                samples = [dict(val[i], index=len(trainer.train_data) + i) for i in range(start, min(start + gbs, len(val)))]
                self._reference_pass(trainer, trainer._local(samples), trainer._seq_length(samples))
        for m in trainer.models:
            m.train()
        if self.reference == "resident":
            self._host_ref = [
                {n: p.detach().to("cpu", copy=True) for n, p in m.module.named_parameters()} for m in trainer.models
            ]
            self._reduce_table()
            return
        # precompute over the training steps of the first epoch, batch for batch as training
        # will see them (same shapes, so step 0 reproduces these numbers bit for bit); samples
        # beyond the last full global batch are never trained on and need no reference.
        for m in trainer.models:
            m.eval()
        with torch.no_grad():
            for step in range(trainer.steps_per_epoch):
                samples = trainer.global_batch(step)
                self._reference_pass(trainer, trainer._local(samples), trainer._seq_length(samples))
        for m in trainer.models:
            m.train()
        self._reduce_table()

    def _reduce_table(self):
        if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_data_parallel_world_size() > 1:
            dist.all_reduce(self._ref, group=ps.get_data_parallel_group())

    @torch.no_grad()
    def before_step(self, trainer, local_samples, seq_length):
        if self.reference != "resident":
            return
        policy = []
        for m, ref in zip(trainer.models, self._host_ref):
            saved = {}
            for n, p in m.module.named_parameters():
                saved[n] = p.detach().to("cpu", copy=True)
                p.data.copy_(ref[n].to(p.device))
            policy.append(saved)
        for m in trainer.models:
            m.eval()
        try:
            self._reference_pass(trainer, local_samples, seq_length)
        finally:
            for m, saved in zip(trainer.models, policy):
                for n, p in m.module.named_parameters():
                    p.data.copy_(saved[n].to(p.device))
                m.train()

    def state_dict(self):
        return {}
