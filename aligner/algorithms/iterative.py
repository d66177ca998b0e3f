"""Sample-then-train iterations (SteerLM 2.0, SPIN): what they share.

A run of ``iterations x epochs`` epochs; at the first step of each iteration the
algorithm's sampler draws the iteration's rows from the current model, rank 0 writes them
to ``<samples_dir>/iteration_<k>.jsonl`` atomically (:func:`aligner.files.atomic_write_bytes`),
and the checkpoint records the file's SHA-256: a resumed run reads the very rows back (the
file is never sampled again), so its metrics are those of an uninterrupted run. The loop's
samples (prompts, by ``index``) stand for the iteration's rows of the same index.

A sampler gives ``epochs``, ``sample(context, iteration) -> rows`` (global order, identical
on every rank), ``check_rows(rows, path)``, ``to_sample(row) -> training sample`` and
``metrics(rows)``.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch.distributed as dist
from omegaconf import OmegaConf

from aligner.algorithms.base import TokenAlgorithm, policy_update
from aligner.config import ConfigError
from aligner.files import atomic_write_bytes, jsonl_text
from aligner.training.algorithm import StepContext


def derive_iteration_epochs(cfg, key: str, defaults, title: str):
    """``trainer.max_epochs`` = ``<key>.iterations x <key>.epochs`` (derived before the config is
    checked; ``trainer.max_steps`` can only cut the run short); ConfigError naming the key."""
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg.copy()
    section = OmegaConf.select(cfg, key) or {}
    try:
        counts = {name: int(section.get(name, getattr(defaults, name))) for name in ("iterations", "epochs")}
    except (TypeError, ValueError):
        return cfg  # a wrong type: validation names the key
    for name, value in counts.items():
        if value < 1:
            raise ConfigError(f"{key}.{name} = {value}: expected >= 1")
    total = counts["iterations"] * counts["epochs"]
    given = OmegaConf.select(cfg, "trainer.max_epochs")
    if given is not None and given != total:
        raise ConfigError(f"trainer.max_epochs = {given}: {title} runs {key}.iterations x {key}.epochs = {total}"
                          " epochs", hint="remove the override")
    OmegaConf.update(cfg, "trainer.max_epochs", total, force_add=True)
    return cfg


def gather_rows(context: StepContext, rows: List[dict]) -> List[dict]:
    """Every data-parallel rank's rows of an iteration, in rank order (identical on every rank)."""
    if context.dp_size == 1:
        return rows
    from megatron.core import parallel_state as ps  # megatron-core loads when a run samples, not at config checks

    gathered = [None] * context.dp_size
    dist.all_gather_object(gathered, rows, group=ps.get_data_parallel_group())
    return [r for part in gathered for r in part]


def check_row_indices(rows: List[dict], expected, path, what: str) -> None:
    """A samples file read back holds a row for every ``expected`` index (``what``: its rows' name)."""
    got = sorted(int(r["index"]) for r in rows)
    if got != sorted(expected):
        raise ValueError(f"{path}: holds {what} {got[:5]}... ({len(got)}); this run has {len(expected)}")


class IterativeAlgorithm(TokenAlgorithm):
    """An algorithm trained on rows sampled at the start of each iteration (module docstring);
    a subclass gives the objective (``groups``, ``attach``, ``loss``) on the sampler's samples."""

    owns_step = True
    title = "the"  # the algorithm's name in messages

    def __init__(self, pad_id: int, *, sampler, steps_per_iteration: int, samples_dir,
                 packing: bool = False, capacity: Optional[int] = None):
        super().__init__(pad_id, packing, capacity)
        self.sampler = sampler
        self.steps_per_iteration = steps_per_iteration
        self.samples_dir = Path(samples_dir)
        self._iteration: Optional[int] = None  # the iteration whose rows are in memory
        self._samples: Dict[int, dict] = {}
        self._sampling_metrics: Dict[str, float] = {}
        self._digest: Optional[str] = None
        self._resume_digests: Dict[int, str] = {}  # iteration -> digest of its rows (from a checkpoint)

    def state_dict(self) -> dict:
        if self._iteration is None or self._digest is None:
            return {}
        return {"iteration": self._iteration, "samples_sha256": self._digest}

    def load_state_dict(self, state: dict) -> None:
        if state.get("samples_sha256"):
            self._resume_digests[int(state["iteration"])] = state["samples_sha256"]

    def samples_path(self, iteration: int) -> Path:
        return self.samples_dir / f"iteration_{iteration}.jsonl"

    def iteration_samples(self, context: StepContext, iteration: int) -> None:
        """The iteration's samples in memory: read back on resume, else sampled and saved."""
        if self._iteration == iteration:
            return
        t0 = time.perf_counter()
        path = self.samples_path(iteration)
        expected = self._resume_digests.pop(iteration, None)
        if expected is not None:  # a resumed run: the very rows this iteration started with
            if not path.is_file():
                raise FileNotFoundError(f"{path}: the checkpoint continues {self.title} iteration {iteration}, but"
                                        " its samples are missing from the run folder")
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != expected:
                raise ValueError(f"{path}: differs from the samples {self.title} iteration {iteration} was trained"
                                 " on (its digest is recorded in the checkpoint)")
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
        self._samples = {int(r["index"]): self.sampler.to_sample(r) for r in rows}
        self._sampling_metrics = self.sampler.metrics(rows)
        self._sampling_metrics["time/sampling"] = time.perf_counter() - t0
        self._iteration, self._digest = iteration, digest

    def train_step(self, context: StepContext) -> Dict[str, float]:
        t0 = time.perf_counter()
        iteration, within = divmod(context.step, self.steps_per_iteration)
        self.iteration_samples(context, iteration)
        samples = [self._samples[int(s["index"])] for s in context.samples]
        local = [self._samples[int(s["index"])] for s in context.local_samples]
        metrics = policy_update(context, self, local, samples)
        metrics.update(self._sampling_metrics)
        metrics.update(iteration=float(iteration),
                       epoch=float(within // (self.steps_per_iteration // self.sampler.epochs)),
                       step_time=time.perf_counter() - t0)
        self._sampling_metrics = {k: v for k, v in self._sampling_metrics.items() if not k.startswith("time/")}
        return metrics
