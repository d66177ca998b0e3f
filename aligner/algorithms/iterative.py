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

The recording itself (:func:`record_rows`, :func:`read_recorded_rows`) serves any rows
generated once and read back on resume (distillation's teacher responses, docs/distill.md).

A window of iterations (``keep_previous = k > 0``, SPIN's ``spin.keep_previous``): iteration
``t`` trains on its own rows and on the rows iterations ``t − k .. t − 1`` generated, its
width ``w_t = min(t, k) + 1``. The sampler is then called as ``sample(context, iteration,
previous)`` with those earlier rows (read from iteration ``t − 1``'s file, which holds its
own window; the file's digest is checked) and returns the iteration's own rows followed by
the earlier ones as it trains on them; a row's ``iteration`` is the iteration that generated
it. A pass over the window's rows is ``w_t`` passes of the loop over the prompts: in the
``j``-th of them prompt ``i`` stands for its row of iteration ``t − ((j + h(i)) mod w_t)``,
``h(i)`` drawn per iteration and pass (:func:`aligner.parallel.seeds.window_slot_generator`),
so every row is trained once per pass and each batch mixes the iterations' rows. Iteration
``t`` takes ``w_t`` times the steps of an iteration without the window.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from aligner.algorithms.base import TokenAlgorithm, policy_update
from aligner.config import ConfigError
from aligner.files import atomic_write_bytes, jsonl_text
from aligner.parallel.seeds import window_slot_generator
from aligner.runtime import UserError
from aligner.training.algorithm import StepContext


def window_widths(iterations: int, keep_previous: int = 0) -> List[int]:
    """Per iteration ``t``, the iterations whose rows it trains on: ``min(t, keep_previous) + 1``."""
    return [min(t, keep_previous) + 1 for t in range(iterations)]


def derive_iteration_epochs(cfg, key: str, defaults, title: str):
    """``trainer.max_epochs`` = ``<key>.epochs x`` the sum of the iterations' window widths
    (``<key>.iterations x <key>.epochs`` without ``<key>.keep_previous``; derived before the
    config is checked; ``trainer.max_steps`` can only cut the run short); ConfigError naming
    the key."""
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg.copy()
    section = OmegaConf.select(cfg, key) or {}
    try:
        counts = {name: int(section.get(name, getattr(defaults, name))) for name in ("iterations", "epochs")}
        keep = int(section.get("keep_previous", getattr(defaults, "keep_previous", 0)))
    except (TypeError, ValueError):
        return cfg  # a wrong type: validation names the key
    for name, value in counts.items():
        if value < 1:
            raise ConfigError(f"{key}.{name} = {value}: expected >= 1")
    if keep < 0:
        raise ConfigError(f"{key}.keep_previous = {keep}: expected >= 0")
    total = counts["epochs"] * sum(window_widths(counts["iterations"], keep))
    given = OmegaConf.select(cfg, "trainer.max_epochs")
    if given is not None and given != total:
        what = f"{key}.iterations x {key}.epochs" if keep == 0 else \
            f"{key}.epochs x the iterations' windows ({key}.keep_previous = {keep})"
        raise ConfigError(f"trainer.max_epochs = {given}: {title} runs {what} = {total} epochs",
                          hint="remove the override")
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


def record_rows(path: Path, rows: List[dict]) -> Tuple[List[dict], str]:
    """``rows`` (identical on every rank) written by rank 0 (or the one process) to ``path`` as JSON lines with
    sorted keys, atomically; returns the rows as the file holds them (floats round-trip
    exactly through JSON, so a fresh and a resumed run use bit-identical values) and the
    file's SHA-256, which a checkpoint records."""
    data = jsonl_text(rows, sort_keys=True).encode("utf-8")
    if not dist.is_initialized() or dist.get_rank() == 0:
        atomic_write_bytes(path, data)
    return [json.loads(line) for line in data.decode("utf-8").splitlines()], hashlib.sha256(data).hexdigest()


def read_recorded_rows(path: Path, expected: Optional[str], missing: str, changed: str) -> List[dict]:
    """The rows of the file ``path`` whose SHA-256 a checkpoint recorded as ``expected``:
    FileNotFoundError ``"<path>: <missing>"`` without the record or the file, UserError
    ``"<path>: <changed>"`` when the file differs from it (both one line on the command line)."""
    if expected is None or not path.is_file():
        raise FileNotFoundError(f"{path}: {missing}")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != expected:
        raise UserError(f"{path}: {changed}")
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def check_row_indices(rows: List[dict], expected, path, what: str) -> None:
    """A samples file read back holds a row for every ``expected`` index (``what``: its rows' name)."""
    got = sorted(int(r["index"]) for r in rows)
    if got != sorted(expected):
        raise UserError(f"{path}: holds {what} {got[:5]}... ({len(got)}); this run has {len(expected)}")


class IterativeAlgorithm(TokenAlgorithm):
    """An algorithm trained on rows sampled at the start of each iteration (module docstring);
    a subclass gives the objective (``groups``, ``attach``, ``loss``) on the sampler's samples."""

    owns_step = True
    title = "the"  # the algorithm's name in messages

    def __init__(self, pad_id: int, *, sampler, steps_per_iteration: int, samples_dir,
                 packing: bool = False, capacity: Optional[int] = None, keep_previous: int = 0):
        super().__init__(pad_id, packing, capacity)
        self.sampler = sampler
        self.steps_per_iteration = steps_per_iteration  # an iteration's steps without the window
        self.samples_dir = Path(samples_dir)
        self.keep_previous = keep_previous
        self._iteration: Optional[int] = None  # the iteration whose rows are in memory
        self._rows: List[dict] = []  # its rows as the file holds them
        self._samples: Dict[tuple, dict] = {}  # (generating iteration, index) -> training sample
        self._slots: Dict[tuple, Dict[int, int]] = {}  # (iteration, pass) -> index -> h(index)
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

    def width(self, iteration: int) -> int:
        """The iterations whose rows ``iteration`` trains on (1 without a window)."""
        return min(iteration, self.keep_previous) + 1

    def locate(self, step: int):
        """``(iteration, step within it)`` of the 0-based loop step."""
        iteration = 0
        while step >= self.steps_per_iteration * self.width(iteration):
            step -= self.steps_per_iteration * self.width(iteration)
            iteration += 1
        return iteration, step

    def previous_rows(self, iteration: int) -> List[dict]:
        """The rows of the window's earlier iterations, from iteration ``iteration − 1``'s rows
        (in memory, or its file checked against the digest a checkpoint recorded)."""
        if self._iteration == iteration - 1:
            rows = self._rows
        else:
            path = self.samples_path(iteration - 1)
            rows = self.read_recorded(path, self._resume_digests.pop(iteration - 1, None), iteration - 1,
                                      f"{self.title} iteration {iteration} trains on iteration {iteration - 1}'s"
                                      " samples, but the checkpoint does not record them or the file is missing"
                                      " from the run folder")
        first = iteration - self.width(iteration) + 1
        return [r for r in rows if first <= int(r["iteration"]) < iteration]

    def read_recorded(self, path: Path, expected: Optional[str], iteration: int, missing: str) -> List[dict]:
        """The rows of ``iteration``'s file ``path``, whose SHA-256 a checkpoint recorded as
        ``expected``: FileNotFoundError (``missing``) without the record or the file,
        ValueError when the file differs from it."""
        return read_recorded_rows(path, expected, missing,
                                  f"differs from the samples {self.title} iteration {iteration} was trained on (its"
                                  " digest is recorded in the checkpoint)")

    def slots(self, seed: int, iteration: int, epoch: int) -> Dict[int, int]:
        """``h(index)`` of the window's pass ``epoch`` of ``iteration`` (module docstring)."""
        key = (iteration, epoch)
        if key not in self._slots:
            indices = sorted({i for _, i in self._samples})
            h = torch.randint(self.width(iteration), (len(indices),),
                              generator=window_slot_generator(seed, iteration, epoch))
            self._slots = {key: dict(zip(indices, h.tolist()))}
        return self._slots[key]

    def iteration_samples(self, context: StepContext, iteration: int) -> None:
        """The iteration's samples in memory: read back on resume, else sampled and saved."""
        if self._iteration == iteration:
            return
        t0 = time.perf_counter()
        path = self.samples_path(iteration)
        expected = self._resume_digests.pop(iteration, None)
        if expected is not None:  # a resumed run: the very rows this iteration started with
            rows = self.read_recorded(path, expected, iteration,
                                      f"the checkpoint continues {self.title} iteration {iteration}, but its"
                                      " samples are missing from the run folder")
            self.sampler.check_rows(rows, path)
            digest = expected
        else:
            if self.width(iteration) > 1:
                rows = self.sampler.sample(context, iteration, self.previous_rows(iteration))
            else:
                rows = self.sampler.sample(context, iteration)
            rows, digest = record_rows(path, rows)
        self._rows = rows
        self._samples = {(int(r.get("iteration", iteration)), int(r["index"])): self.sampler.to_sample(r)
                         for r in rows}
        self._sampling_metrics = self.sampler.metrics([r for r in rows if int(r.get("iteration", iteration))
                                                       == iteration])
        self._sampling_metrics["time/sampling"] = time.perf_counter() - t0
        self._iteration, self._digest = iteration, digest

    def train_step(self, context: StepContext) -> Dict[str, float]:
        t0 = time.perf_counter()
        iteration, within = self.locate(context.step)
        self.iteration_samples(context, iteration)
        width = self.width(iteration)
        # the loop's passes over the prompts: `width` of them make one pass over the window's rows
        epoch, j = divmod(within // (self.steps_per_iteration // self.sampler.epochs), width)
        if width == 1:
            def source(index):
                return iteration
        else:
            h = self.slots(context.seed, iteration, epoch)

            def source(index):
                return iteration - (j + h[index]) % width
        keys = [(source(int(s["index"])), int(s["index"])) for s in context.samples]
        samples = [self._samples[k] for k in keys]
        local = [self._samples[source(int(s["index"])), int(s["index"])] for s in context.local_samples]
        metrics = policy_update(context, self, local, samples)
        metrics.update(self._sampling_metrics)
        metrics.update(iteration=float(iteration), epoch=float(epoch), step_time=time.perf_counter() - t0)
        if width > 1:  # the share of the step's rows that earlier iterations generated
            metrics["window/previous"] = sum(k[0] < iteration for k in keys) / len(keys)
        self._sampling_metrics = {k: v for k, v in self._sampling_metrics.items() if not k.startswith("time/")}
        return metrics
