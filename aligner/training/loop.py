"""The one training loop every algorithm runs on.

``TrainingLoop(algorithm, models, train_data, optim=..., trainer=...)`` wraps the model chunks
in megatron-core's DistributedDataParallel, builds megatron-core's optimizer (the
distributed optimizer when ``optim.distributed``) and LR / weight-decay schedule, and
runs ``fit()``:

- data order: epoch ``e`` visits the training samples in ``randperm(n, seed + e)``; step
  ``k`` takes the ``k``-th block of ``global_batch_size`` samples of that order (a last
  incomplete block of an epoch is not used; its size is reported at start). Data-parallel
  rank ``r`` takes the ``r``-th contiguous share of the block and splits it into
  micro-batches (gradient accumulation), so the data position is a function of the
  step alone and resuming needs nothing else.
- an algorithm that owns its step (online RL, ``Algorithm.owns_step``) is handed a
  :class:`~aligner.training.algorithm.StepContext` (roles, the step's prompts, schedule
  runner, collectives) instead; its other roles come in ``roles`` (a
  :class:`~aligner.training.roles.RoleSet`) and are checkpointed and exported with the
  policy (docs/online_core.md).
- each step runs megatron-core's pipeline schedule for the layout (no pipelining,
  1F1B, interleaved) with ``calculate_per_token_loss`` — see
  :mod:`aligner.training.algorithm` for the loss convention — then the optimizer step
  (gradient clipping inside). Micro-batches of one schedule call have one shape
  (zero-weight filler rows and micro-batches, :mod:`aligner.training.batching`).
- learning rate: step ``k`` (1-based) updates with the schedule's value for ``k``
  (megatron-core's ``OptimizerParamScheduler`` at ``num_steps = k``): ``lr * k / W``
  during ``W`` warmup steps, then constant or a decay that reaches ``min_lr`` at the last
  step; the logged ``lr`` is the one that step used.
- metrics: summed over micro-batches and data-parallel ranks (over the union of the
  ranks' metric names), sent from the last pipeline stage, logged by rank 0 to
  ``metrics.jsonl`` / TensorBoard / W&B and the progress line; with an MoE policy the
  router's ``moe/`` metrics of the step's training passes (tokens per expert, load
  balance, auxiliary losses: :class:`aligner.models.moe.RouterStats`, docs/moe.md).
- hooks (:class:`~aligner.training.algorithm.StepHook`, e.g. the gold-vs-proxy monitor the
  trainers attach, docs/monitor.md): set up before a resume, run before the first step of a
  fresh run and after every step with every random stream restored, their metrics logged
  under the hook's name, their state in every checkpoint; a hook may end training early
  (``request_stop``), which saves and exports as at the last step.
- validation every ``val_interval`` steps and at the end, without effect on training
  (eval mode, every RNG stream restored afterwards); checkpoints every
  ``save_interval`` steps and at the end (aligner.models.checkpoint: written under a
  temporary name, marked latest only when complete, keep-last-k); resume from the latest
  complete checkpoint when ``trainer.resume``; HF export of the final model when
  ``trainer.export_hf``. A run resumed at its last step trains nothing and returns the
  figures it recorded (``result.json``), exporting only a missing HF folder.
- signals: Ctrl-C stops at once; SIGTERM (what Slurm sends before a time limit) finishes
  the current step, saves a checkpoint (``trainer.save_on_signal``; a second SIGTERM stops
  at once) and stops. Either way :class:`aligner.runtime.RunStopped` says where the run can
  resume from: the last complete checkpoint (checkpoints are written under a temporary
  name, so one cut short is never it). Every rank agrees on a SIGTERM at the end of a step.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from aligner.models.checkpoint import find_latest, load_checkpoint, save_checkpoint
from aligner.models.hf import export_hf
from aligner.models.lora import has_adapters
from aligner.models.lora_peft import export_peft
from aligner.models.moe import RouterStats
from aligner.parallel import get_device, padded_length
from aligner.parallel.seeds import data_order_generator
from aligner.runtime import RunStopped
from aligner.training.algorithm import Algorithm, StepContext
from aligner.training.batching import schedule_microbatches
from aligner.training.config import OptimSection, TrainerSection
from aligner.training.logging import MetricsLogger, Progress
from aligner.training.metrics import means, reduce_metrics
from aligner.training.roles import RoleSet, build_trainable_role, in_step_with_experts, run_schedule
from aligner.training.run_folder import recorded_result


@contextlib.contextmanager
def preserved_rng():
    """Restore, on exit, every random stream training draws from: Python's, NumPy's,
    torch's CPU and CUDA generators and megatron-core's model-parallel RNG tracker
    (dropout inside tensor-parallel regions)."""
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    saved = (
        random.getstate(),
        np.random.get_state(),
        torch.get_rng_state(),
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        {name: state.clone() if torch.is_tensor(state) else state for name, state in tracker.get_states().items()},
    )
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
        if saved[3] is not None:
            torch.cuda.set_rng_state_all(saved[3])
        tracker.set_states(saved[4])


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=data_order_generator(seed, epoch))


class TrainingLoop:
    """Runs an :class:`Algorithm` on model chunks built for the current parallel layout."""

    def __init__(
        self,
        algorithm: Algorithm,
        models: List[torch.nn.Module],
        train_data: Sequence[dict],
        *,
        optim: OptimSection,
        trainer: TrainerSection,
        val_data: Optional[Sequence[dict]] = None,
        model_cfg=None,
        tokenizer_dir: Optional[str] = None,
        run_config: Optional[dict] = None,
        roles=None,
        hooks: Sequence = (),
        export_metadata: Optional[dict] = None,
    ):
        self.algorithm = algorithm
        self.optim_cfg = optim
        self.cfg = trainer
        self.train_data = train_data
        self.val_data = val_data
        self.model_cfg = model_cfg
        self.tokenizer_dir = tokenizer_dir
        self.run_config = run_config or {}
        self.export_metadata = export_metadata  # what the HF export records (aligner.models.hf.export_hf)
        self.out_dir = Path(trainer.out_dir)
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        # the loop splits a step's samples into micro-batches; an algorithm that owns its step batches its own rows
        if not algorithm.owns_step and trainer.global_batch_size % (trainer.micro_batch_size * self.dp_size):
            raise ValueError(
                f"trainer.global_batch_size = {trainer.global_batch_size} must be a multiple of"
                f" trainer.micro_batch_size x data-parallel size = {trainer.micro_batch_size} x {self.dp_size}"
            )
        if len(train_data) < trainer.global_batch_size:
            raise ValueError(
                f"the training set has {len(train_data)} samples, fewer than"
                f" trainer.global_batch_size = {trainer.global_batch_size}"
            )
        self.steps_per_epoch = len(train_data) // trainer.global_batch_size
        self.unused_per_epoch = len(train_data) - self.steps_per_epoch * trainer.global_batch_size
        steps = trainer.max_steps
        if trainer.max_epochs is not None:
            by_epochs = trainer.max_epochs * self.steps_per_epoch
            steps = by_epochs if steps < 0 else min(steps, by_epochs)
        self.max_steps = steps

        # the policy is a trainable role like any other (aligner.training.roles); an online
        # algorithm's trainer passes its other roles in ``roles``
        updates = self.max_steps * algorithm.optimizer_steps_per_step
        self.policy = build_trainable_role("policy", models, optim, updates, export_head=algorithm.head)
        self.models, self.optimizer, self.scheduler = self.policy.chunks, self.policy.optimizer, self.policy.scheduler
        self.roles = roles if roles is not None else RoleSet()
        self.roles.add(self.policy)
        self.router_stats = RouterStats(self.models)  # nothing to do for a dense policy
        for router in self.router_stats.routers:
            # megatron-core's router copies the per-token-loss flag when it is built (before
            # the role sets it); the schedule weighs each micro-batch's router losses by its
            # loss count instead (aligner.models.moe.weighted_losses, docs/moe.md)
            router.calculate_per_token_loss = False
        self.step = 0
        self.history: List[dict] = []
        self.hooks = list(hooks)  # aligner.training.algorithm.StepHook
        self.stop_reason: Optional[str] = None
        self._signalled = 0  # the number of a signal that asks training to stop after this step
        self._interrupted = False  # a Ctrl-C arrived (see _signals_handled)

    def request_stop(self, reason: str) -> None:
        """End training after the current step (a hook's early stop); checkpoint and export
        follow as at the last step."""
        self.stop_reason = reason

    # ---------------------------------------------------------------- data
    def global_batch(self, step: int) -> List[dict]:
        """The samples of training step ``step`` (0-based), identical on every rank."""
        gbs = self.cfg.global_batch_size
        epoch, k = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.train_data), self.cfg.seed, epoch)
        return [self.train_data[int(i)] for i in order[k * gbs : (k + 1) * gbs]]

    def local_share(self, samples: Sequence[dict]) -> List[dict]:
        """This data-parallel rank's contiguous share of ``samples``."""
        share = math.ceil(len(samples) / self.dp_size)
        return list(samples[self.dp_rank * share : (self.dp_rank + 1) * share])

    def seq_length(self, samples: Sequence[dict]) -> int:
        """The micro-batches' sequence length for ``samples``: the longest, padded to 8 x TP."""
        return padded_length(max(self.algorithm.sample_length(s) for s in samples))

    # ---------------------------------------------------------------- schedule
    def microbatches(self, samples: Sequence[dict], seq_length: int) -> List[dict]:
        """This rank's micro-batches of ``samples``, all of one shape (see
        :mod:`aligner.training.batching`): a short one gets zero-weight rows, and under
        interleaved pipelining zero-weight micro-batches make the count a multiple of
        the pipeline size, as megatron-core's interleaved schedule requires."""
        micro = self.algorithm.microbatches(samples, self.cfg.micro_batch_size, seq_length)
        seqs = {b["tokens"].shape[1] for b in micro}
        if len(seqs) > 1:
            raise ValueError(
                f"{type(self.algorithm).__name__}.microbatches returned micro-batches of sequence lengths"
                f" {sorted(seqs)}; one schedule call needs one length"
            )
        return schedule_microbatches(micro, interleaved=len(self.models) > 1)

    def run_schedule(self, samples: Sequence[dict], *, forward_only: bool, seq_length: int,
                     like: Sequence[dict] = ()) -> List[dict]:
        """Forward (and backward) over this rank's micro-batches of ``samples``; the metric
        dicts. ``like``: samples whose shape a zero-weight micro-batch may take when this rank
        has none of its own (see :meth:`_in_step_with_experts`)."""
        micro = self._in_step_with_experts(self.microbatches(samples, seq_length), like, seq_length)
        return run_schedule(self.models, micro, self.algorithm.forward, self.algorithm.loss,
                            forward_only=forward_only, count=self.algorithm.loss_count)

    def _in_step_with_experts(self, micro: List[dict], like: Sequence[dict], seq_length: int) -> List[dict]:
        """With experts split over the data-parallel ranks (EP > 1) every rank runs as many
        micro-batches as the others: a rank with fewer (the short share of a last validation
        batch, packing's variable bins) gets fillers that count for nothing, shaped like
        ``like``'s first sample when it has none of its own
        (:func:`aligner.training.roles.in_step_with_experts`)."""
        return in_step_with_experts(micro, lambda: self.microbatches(list(like)[:1], seq_length)[0])

    def reduce_metrics(self, store: List[dict]) -> Dict[str, float]:
        """Metric [sum, count] pairs summed over micro-batches and DP ranks (the union of the
        ranks' names, :func:`aligner.training.metrics.reduce_metrics`); every rank gets
        ``sum / count`` and the algorithm's derived metrics."""
        sums = reduce_metrics(store)
        return self.algorithm.finalize_metrics(means(sums), sums)

    # ---------------------------------------------------------------- phases
    def train_step(self) -> Dict[str, float]:
        """One step; with an MoE policy its router metrics too (aligner.models.moe.RouterStats)."""
        self.router_stats.reset()
        metrics = self._train_step()
        metrics.update(self.router_stats.collect())
        return metrics

    def _train_step(self) -> Dict[str, float]:
        samples = self.global_batch(self.step)
        if self.algorithm.owns_step:
            return self._owned_step(samples)
        seq_length = self.seq_length(samples)
        local = self.local_share(samples)
        t0 = time.perf_counter()
        self.algorithm.before_step(self, local, seq_length)
        for m in self.models:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        store = self.run_schedule(local, forward_only=False, seq_length=seq_length)
        # the schedule's value for this step (1-based) is set before the update that uses it
        self.scheduler.step(increment=1)
        lr = float(self.optimizer.param_groups[0]["lr"])
        ok, grad_norm, _ = self.optimizer.step()
        self.step += 1
        metrics = self.reduce_metrics(store)
        elapsed = time.perf_counter() - t0
        tokens = sum(self.algorithm.sample_tokens(s) for s in samples)
        metrics.update(
            lr=lr,
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            step_time=elapsed,
            tokens_per_s=tokens / elapsed,
            skipped=0.0 if ok else 1.0,
        )
        return metrics

    def _owned_step(self, samples: Sequence[dict]) -> Dict[str, float]:
        """An algorithm that owns its step (online RL) gets a narrow context
        (:class:`aligner.training.algorithm.StepContext`); the loop keeps the step count,
        logging, checkpoints and resume."""
        t0 = time.perf_counter()
        context = StepContext(roles=self.roles, step=self.step, samples=samples, local_samples=self.local_share(samples),
                              micro_batch_size=self.cfg.micro_batch_size, seed=self.cfg.seed)
        metrics = dict(self.algorithm.train_step(context))
        self.step += 1
        metrics.setdefault("step_time", time.perf_counter() - t0)
        return metrics

    @torch.no_grad()
    def evaluate(self, data: Optional[Sequence[dict]] = None, max_batches: Optional[int] = None) -> Dict[str, float]:
        """Forward-only pass over ``data`` (default: the validation set) in global batches.

        Training does not depend on it: it runs in eval mode (no dropout), leaves every
        model in the mode it found it, and restores every random stream it could draw
        from (:func:`preserved_rng`), so a run with validation follows the trajectory of
        the same run without.
        """
        data = self.val_data if data is None else data
        if not data:
            return {}
        with preserved_rng():
            return self._evaluate(data, max_batches)

    def _evaluate(self, data, max_batches):
        modes = [m.training for m in self.models]
        for m in self.models:
            m.eval()
        gbs = self.cfg.global_batch_size
        store = []
        starts = list(range(0, len(data), gbs))
        if max_batches is not None:
            starts = starts[:max_batches]
        offset = len(self.train_data) if data is self.val_data else 0
        for start in starts:
            samples = [dict(data[i], index=offset + i) for i in range(start, min(start + gbs, len(data)))]
            store += self.run_schedule(self.local_share(samples), forward_only=True, seq_length=self.seq_length(samples),
                                       like=samples)
        for m, mode in zip(self.models, modes):
            m.train(mode)
        return self.reduce_metrics(store)

    def save(self) -> Path:
        extra = {
            "step": self.step,
            "consumed_samples": self.step * self.cfg.global_batch_size,
            "algorithm": self.algorithm.state_dict(),
            "hooks": {h.name: h.state_dict() for h in self.hooks},
        }
        models, optimizer, scheduler = self.roles.checkpoint_parts()
        return save_checkpoint(
            self.out_dir / "checkpoints",
            self.step,
            models,
            optimizer=optimizer,
            scheduler=scheduler,
            extra=extra,
            keep_last=self.cfg.keep_last,
            model_config=self.model_cfg.to_dict() if self.model_cfg is not None else None,
        )

    def resume_state(self) -> Optional[dict]:
        """The algorithm state of the checkpoint :meth:`maybe_resume` would load (its
        ``extra.json``), read without loading anything else; None for a run that starts
        fresh. For setup work that must match what the run began with."""
        if not self.cfg.resume:
            return None
        latest = find_latest(self.out_dir / "checkpoints")
        if latest is None:
            return None
        return json.loads((latest / "extra.json").read_text()).get("algorithm", {})

    def maybe_resume(self) -> Optional[int]:
        if not self.cfg.resume:
            return None
        latest = find_latest(self.out_dir / "checkpoints")
        if latest is None:
            return None
        models, optimizer, scheduler = self.roles.checkpoint_parts()
        extra = load_checkpoint(latest, models, optimizer=optimizer, scheduler=scheduler)
        self.step = int(extra["step"])
        self.algorithm.load_state_dict(extra.get("algorithm", {}))
        for h in self.hooks:
            h.load_state_dict(extra.get("hooks", {}).get(h.name, {}))
        return self.step

    def export(self, out: Optional[Path] = None, policy_only: bool = False) -> Optional[Path]:
        """The HF export of the policy to ``out`` (default ``<out_dir>/hf``; a policy with LoRA
        adapters: merged, and its adapters as a PEFT folder ``<out>_peft``) and, unless
        ``policy_only``, of every other trainable role to ``<out_dir>/hf_<role>``."""
        if self.model_cfg is None:
            return None
        out = self.out_dir / "hf" if out is None else Path(out)
        export_hf(
            [m.module for m in self.models],
            self.model_cfg,
            out,
            tokenizer_dir=self.tokenizer_dir,
            head=self.algorithm.head,
            metadata=self.export_metadata,
        )
        policy = [m.module for m in self.models]
        if has_adapters(policy):  # the adapters alone as well, in PEFT's format (docs/lora.md)
            export_peft(policy, out.with_name(out.name + "_peft"))
        for name, role in self.roles.trainable.items():  # other trainable roles: hf_<role>/
            if role is not self.policy and not policy_only:
                export_hf(role.modules, role.model_cfg or self.model_cfg, self.out_dir / f"hf_{name}",
                          tokenizer_dir=self.tokenizer_dir, head=role.export_head)
        return out

    def fit(self) -> Dict[str, Any]:
        """Train to ``max_steps``; returns the last train and validation metrics."""
        try:
            with self._signals_handled():
                return self._fit()
        except KeyboardInterrupt:
            raise RunStopped(self.resume_note(f"interrupted (Ctrl-C) at step {self.step}"), signal.SIGINT) from None

    def _fit(self) -> Dict[str, Any]:
        # before the resume: setup sees the initial weights (e.g. DPO's reference model)
        self.algorithm.setup(self)
        for h in self.hooks:
            h.setup(self)
        resumed = self.maybe_resume()
        progress = Progress(self.algorithm.name, self.max_steps, start_step=self.step, enabled=self.cfg.progress)
        if resumed is not None and self.step >= self.max_steps:
            # a finished run: nothing to train, its figures stay as recorded
            progress.message(f"resumed from step {resumed}: the run is complete (trainer.max_steps ="
                             f" {self.max_steps}), nothing to train")
            progress.close()
            self._export_unless_done(progress)
            return recorded_result(self.out_dir, self.step) or self.logged_result()
        logger = MetricsLogger(
            self.out_dir,
            tensorboard=self.cfg.tensorboard,
            wandb_project=self.cfg.wandb_project,
            wandb_name=self.cfg.wandb_name,
            config=self.run_config,
            resume_step=resumed,
        )
        if resumed is not None:
            progress.message(f"resumed from step {resumed}")
        else:
            progress.message(
                f"{len(self.train_data)} training samples, {self.steps_per_epoch} steps per epoch"
                f" ({self.unused_per_epoch} samples per epoch beyond the last full global batch are not used),"
                f" {self.max_steps} steps"
            )
        train_metrics: Dict[str, float] = {}
        val_metrics: Dict[str, float] = {}
        if resumed is None and self.val_data and self.cfg.val_interval > 0:
            val_metrics = self.evaluate(max_batches=self.cfg.val_batches)
            logger.log(self.step, "val", val_metrics)
        try:
            if resumed is None:
                self._run_hooks(logger)
            while self.step < self.max_steps and self.stop_reason is None:
                train_metrics = self.train_step()
                if self.step % self.cfg.log_interval == 0 or self.step == self.max_steps:
                    logger.log(self.step, "train", train_metrics)
                    progress.update(self.step, train_metrics)
                self._run_hooks(logger)
                if self.stop_reason is not None:
                    progress.message(f"stopping at step {self.step}: {self.stop_reason}")
                last = self.step == self.max_steps or self.stop_reason is not None
                if self.val_data and (last or (self.cfg.val_interval > 0 and self.step % self.cfg.val_interval == 0)):
                    val_metrics = self.evaluate(max_batches=None if last else self.cfg.val_batches)
                    logger.log(self.step, "val", val_metrics)
                    progress.message("validation " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(val_metrics.items())))
                saved = None
                if last or (self.cfg.save_interval > 0 and self.step % self.cfg.save_interval == 0):
                    saved = self.save()
                self._stop_if_signalled(saved)
            if self.cfg.export_hf:
                path = self.export()
                if path is not None:
                    progress.message(f"exported HF model to {path}")
        finally:
            logger.close()
        result = {"step": self.step, "train": train_metrics, "val": val_metrics}
        if self.stop_reason is not None:
            result["stopped"] = self.stop_reason
        return result

    def _export_unless_done(self, progress) -> None:
        """A finished run's HF export, written only where it is missing (e.g.
        ``trainer.export_hf`` turned on after the run): an export of the same weights
        changes nothing."""
        if self.cfg.export_hf and not (self.out_dir / "hf" / "config.json").is_file():
            path = self.export()
            if path is not None:
                progress.message(f"exported HF model to {path}")

    def logged_result(self) -> Dict[str, Any]:
        """The figures of this run at its step as ``metrics.jsonl`` logged them (the last
        ``train`` and ``val`` rows up to it): for a finished run whose ``result.json`` is
        missing (stopped between its last checkpoint and that file)."""
        path = self.out_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        last = {row["split"]: row for row in rows if row["step"] <= self.step}
        figures = {split: {k: v for k, v in last.get(split, {}).items() if k not in ("step", "split")}
                   for split in ("train", "val")}
        return {"step": self.step, **figures}

    # ---------------------------------------------------------------- signals
    @contextlib.contextmanager
    def _signals_handled(self):
        """While training, SIGTERM asks for a stop after the current step (with a checkpoint
        when ``trainer.save_on_signal``); a second one, or one without saving, stops at once.
        Ctrl-C (SIGINT, where Python's default handler is in place) stops at once, as by
        default, and is also remembered: an interrupt raised where Python cannot pass it on
        (inside a finalizer, ``__del__`` or a weakref callback, where it is reported as
        ignored) still stops the run at the end of the step. Handlers can only be set in the
        main thread: elsewhere the caller's stay."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_sigterm(signum, frame):
            if self._signalled or not self.cfg.save_on_signal:
                raise RunStopped(self.resume_note(f"stopped by SIGTERM at step {self.step}"), signum)
            self._signalled = signum

        def on_sigint(signum, frame):
            self._interrupted = True
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, on_sigterm)
        previous_int = None
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            previous_int = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)
            if previous_int is not None:
                signal.signal(signal.SIGINT, previous_int)

    def _stop_if_signalled(self, saved: Optional[Path]) -> None:
        """At the end of a step: a Ctrl-C that did not stop the run where it arrived stops it
        now; if any rank was sent SIGTERM, every rank saves a checkpoint (unless this step's
        was just written: ``saved``) and stops (:class:`RunStopped`)."""
        if self._interrupted:  # an interrupt swallowed on its way (see _signals_handled)
            raise KeyboardInterrupt
        if not self.cfg.save_on_signal:  # a SIGTERM has stopped the run at once (the same on every rank)
            return
        flag = torch.tensor([self._signalled], dtype=torch.int64, device=get_device())
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # ranks may receive the signal in different steps
        if not int(flag):
            return
        path = saved or self.save()
        raise RunStopped(f"stopped by SIGTERM after step {self.step}: saved the checkpoint {path}; the same"
                         " command resumes from it", int(flag))

    def resume_note(self, what: str) -> str:
        """``what`` and where the run can resume from: its last complete checkpoint."""
        latest = find_latest(self.out_dir / "checkpoints")
        if latest is None:
            return f"{what}; no checkpoint was written yet: the same command starts the run again"
        return f"{what}; the last complete checkpoint is {latest}: the same command resumes from it"

    def _run_hooks(self, logger) -> None:
        """Every hook's :meth:`~aligner.training.algorithm.StepHook.after_step`, with the random
        streams and the models' modes restored afterwards (a hook never changes training)."""
        for h in self.hooks:
            modes = [m.training for m in self.models]
            with preserved_rng():
                metrics = h.after_step(self)
            for m, mode in zip(self.models, modes):
                m.train(mode)
            if metrics:
                logger.log(self.step, h.name, metrics)
