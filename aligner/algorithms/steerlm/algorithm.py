"""The SteerLM 2.0 objective on the shared loop (docs/steerlm.md, "SteerLM 2.0 objective").

:class:`SteerLM2Algorithm` trains on groups of scored responses (a pre-scored file: the
loop runs its step); :class:`IterativeSteerLM2Algorithm` owns its step and, at the first
step of each iteration, samples and scores the iteration's groups from the current model
(:class:`aligner.algorithms.steerlm.sampler.SteerLM2Sampler`), writes them to the run
folder and reads them back on resume. The loss is
:func:`aligner.algorithms.losses.steerlm.steerlm2_loss` over the global batch.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist

from aligner.algorithms.base import TokenAlgorithm
from aligner.algorithms.losses.steerlm import steerlm2_loss
from aligner.files import atomic_write_bytes, jsonl_text
from aligner.parallel import padded_length
from aligner.training.algorithm import StepContext
from aligner.training.batching import per_item_sum, schedule_microbatches, shifted_logprobs
from aligner.training.metrics import metric


class SteerLM2Algorithm(TokenAlgorithm):
    """The SteerLM 2.0 objective over groups of scored responses: a sample is one group
    ``{"responses": [(tokens, loss_mask)], "log_p_attr", "log_p_sft", "log_q_prime": [n]}``
    (all of a group's responses share a micro-batch, so the within-group softmaxes are
    exact under every layout)."""

    name = "steerlm2"

    # ---------------------------------------------------------------- batches and loss
    def groups(self, sample):
        return list(sample["responses"])

    def attach(self, batch, samples):
        sizes = torch.tensor([len(s["responses"]) for s in samples])
        batch["group_ids"] = torch.repeat_interleave(torch.arange(len(samples)), sizes)
        for key in ("log_p_attr", "log_p_sft", "log_q_prime"):
            batch[key] = torch.cat([s[key] for s in samples])
        return batch

    def loss(self, batch, logits):
        if batch.get("filler"):  # a zero-weight micro-batch (interleaved pipelining)
            return logits.reshape(-1)[:1].sum() * 0.0, 0, {}
        lp = shifted_logprobs(logits, batch["tokens"]).float()
        mask = batch["loss_mask"]
        policy_logps = per_item_sum(lp * mask, batch)
        num_tokens = per_item_sum(mask, batch)
        dev = policy_logps.device
        # Σ n_g (w' − b') NLL over the response tokens: megatron-core divides by the step's global
        # token count, which makes it (1/G) Σ (w' − b') NLL / T̄ (steerlm2_loss)
        total, count, sums = steerlm2_loss(policy_logps, num_tokens, batch["log_p_attr"].to(dev),
                                           batch["log_p_sft"].to(dev), batch["log_q_prime"].to(dev),
                                           batch["group_ids"].to(dev))
        g = sums["groups"]
        metrics = {
            "loss": metric(total, count),
            "kl_w_b": metric(sums["kl_w_b"], g),
            "weight_max": metric(sums["weight_max"], g),
            "response_tokens": metric(count, num_tokens.numel()),
        }
        return total, count.round().long(), metrics



class IterativeSteerLM2Algorithm(SteerLM2Algorithm):
    """SteerLM 2.0 with sampling inside the run: ``steps_per_iteration`` steps per
    iteration, the iteration's groups sampled and scored at its first step (or read back
    from ``samples_dir`` on resume); the loop's prompt groups stand for their scored groups."""

    owns_step = True

    def __init__(self, pad_id: int, *, sampler, steps_per_iteration: int, samples_dir,
                 packing: bool = False, capacity: Optional[int] = None):
        super().__init__(pad_id, packing, capacity)
        self.sampler = sampler
        self.steps_per_iteration = steps_per_iteration
        self.samples_dir = Path(samples_dir)
        self._iteration: Optional[int] = None  # the iteration whose groups are in memory
        self._groups: Dict[int, dict] = {}
        self._sampling_metrics: Dict[str, float] = {}
        self._digest: Optional[str] = None
        self._resume_digests: Dict[int, str] = {}  # iteration -> digest of its samples (from a checkpoint)

    def state_dict(self) -> dict:
        if self._iteration is None or self._digest is None:
            return {}
        return {"iteration": self._iteration, "samples_sha256": self._digest}

    def load_state_dict(self, state: dict) -> None:
        if state.get("samples_sha256"):
            self._resume_digests[int(state["iteration"])] = state["samples_sha256"]

    def samples_path(self, iteration: int) -> Path:
        return self.samples_dir / f"iteration_{iteration}.jsonl"

    def iteration_groups(self, context: StepContext, iteration: int) -> None:
        """The iteration's scored groups in memory: read back on resume, else sampled and saved."""
        if self._iteration == iteration:
            return
        t0 = time.perf_counter()
        path = self.samples_path(iteration)
        expected = self._resume_digests.pop(iteration, None)
        if expected is not None:  # a resumed run: the very samples this iteration started with
            if not path.is_file():
                raise FileNotFoundError(f"{path}: the checkpoint continues SteerLM 2.0 iteration {iteration}, but its"
                                        " samples are missing from the run folder")
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != expected:
                raise ValueError(f"{path}: differs from the samples SteerLM 2.0 iteration {iteration} was trained on"
                                 " (its digest is recorded in the checkpoint)")
            rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
            self.sampler.check_rows(rows, path)
            digest = expected
        else:
            rows = self.sampler.sample(context, iteration)
            data = jsonl_text(rows, sort_keys=True).encode("utf-8")
            digest = hashlib.sha256(data).hexdigest()
            if dist.get_rank() == 0:
                atomic_write_bytes(path, data)
            # the rows as the file holds them (floats round-trip exactly through JSON), so a
            # fresh and a resumed run train on bit-identical values
            rows = [json.loads(line) for line in data.decode("utf-8").splitlines()]
        self._groups = {int(r["index"]): self.sampler.to_sample(r) for r in rows}
        self._sampling_metrics = self.sampler.metrics(rows)
        self._sampling_metrics["time/sampling"] = time.perf_counter() - t0
        self._iteration, self._digest = iteration, digest

    def train_step(self, context: StepContext) -> Dict[str, float]:
        t0 = time.perf_counter()
        iteration, within = divmod(context.step, self.steps_per_iteration)
        self.iteration_groups(context, iteration)
        samples = [self._groups[int(s["index"])] for s in context.samples]
        local = [self._groups[int(s["index"])] for s in context.local_samples]
        seq_length = padded_length(max(self.sample_length(s) for s in samples))
        policy = context.roles["policy"]
        micro = schedule_microbatches(self.microbatches(local, context.micro_batch_size, seq_length),
                                      interleaved=len(policy.chunks) > 1)
        policy.train()
        policy.zero_grad()
        lr = policy.lr
        store = context.run_schedule(policy.chunks, micro, self.forward, self.loss, forward_only=False)
        ok, grad_norm = policy.step()
        metrics = context.reduce_metrics(store)
        metrics.update(self._sampling_metrics)
        metrics.update(iteration=float(iteration), epoch=float(within // (self.steps_per_iteration
                                                                          // self.sampler.epochs)),
                       lr=lr, grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                       skipped=0.0 if ok else 1.0, step_time=time.perf_counter() - t0)
        self._sampling_metrics = {k: v for k, v in self._sampling_metrics.items() if not k.startswith("time/")}
        return metrics
