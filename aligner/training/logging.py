"""Metrics sinks (JSONL, TensorBoard, optionally Weights & Biases) and the console progress bar.

Only global rank 0 writes or prints (:func:`aligner.runtime.is_rank0`).

- ``metrics.jsonl`` holds one JSON object per logged step and split; on resume, lines of
  steps after the resumed checkpoint are dropped first, so a run killed and resumed ends
  with the same file as an uninterrupted one.
- TensorBoard (``tensorboard/``): on resume the writer purges the events of steps after
  the resumed checkpoint (TensorBoard's ``purge_step``), so the curves show each step once;
  a fresh start removes the previous events.
- Weights & Biases: the run id is kept in the run folder (``wandb.json``,
  :func:`aligner.training.run_folder.wandb_run_id`), so a resumed run continues the same
  W&B run (``resume="allow"``) instead of starting a new one. (``wandb`` is an optional
  extra: the tests check the id kept in the run folder, not a W&B session.)
- Tables (:func:`log_table`, e.g. an online run's rollout log, aligner/training/rollout_log.py):
  a Markdown table in TensorBoard's text tab (tag ``<split>/<name>``, at the step) and a
  ``wandb.Table`` in W&B; not in ``metrics.jsonl`` (the rows have files of their own). They
  go to the loggers open in this process, that is to the running loop's.
- :class:`Progress`: a ``tqdm`` bar per stage (step / total, loss, reward, tokens/s, ETA), or the
  same meter as a logged line per step where stderr is not a terminal; messages go through
  the ``aligner`` logger (:func:`aligner.runtime.setup_logging`).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import List, Optional, Sequence

from aligner.files import atomic_write_text
from aligner.runtime import get_logger, is_rank0
from aligner.training.run_folder import wandb_run_id

log = get_logger(__name__)

_OPEN: List["MetricsLogger"] = []  # the loggers of this process not yet closed (the running loop's)


def log_table(step: int, name: str, columns: Sequence[str], rows: Sequence[Sequence], split: str = "train") -> None:
    """A table (``rows``: one value per column) at ``step`` to every open logger of this
    process (TensorBoard text, W&B table); nothing where none is open or on other ranks."""
    for logger in list(_OPEN):
        logger.log_table(step, name, columns, rows, split=split)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence]) -> str:
    """``rows`` as a Markdown table (TensorBoard renders text summaries as Markdown): cells
    on one line, ``|`` escaped, floats to 4 significant digits, None empty."""
    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.4g}"
        return " ".join(str(value).split()).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class MetricsLogger:
    def __init__(
        self,
        out_dir,
        *,
        tensorboard: bool = True,
        wandb_project: Optional[str] = None,
        wandb_name: Optional[str] = None,
        config: Optional[dict] = None,
        resume_step: Optional[int] = None,
    ):
        self.enabled = is_rank0()
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.truncate(resume_step)
        _OPEN.append(self)
        if tensorboard:
            self._tb = self._tensorboard(resume_step)
        if wandb_project:
            import wandb  # an explicit request: a missing package is an error

            run_id = wandb_run_id(self.out_dir, resume=resume_step is not None)
            self._wandb = wandb.init(project=wandb_project, name=wandb_name, config=config, id=run_id,
                                     resume="allow", dir=str(self.out_dir))

    def _tensorboard(self, resume_step: Optional[int]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed; TensorBoard logging is off")
            return None
        folder = self.out_dir / "tensorboard"
        if resume_step is None:
            shutil.rmtree(folder, ignore_errors=True)  # a fresh start: no events of an earlier run
            return SummaryWriter(str(folder))
        # events of steps > resume_step were written after the checkpoint: TensorBoard drops them
        return SummaryWriter(str(folder), purge_step=resume_step + 1)

    def truncate(self, resume_step: Optional[int]) -> None:
        """Keep only lines of steps <= resume_step (None: start a new file)."""
        if resume_step is None or not self.path.exists():
            if self.path.exists():
                self.path.unlink()
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= resume_step
        ]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, step: int, split: str, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "split": split}
        row.update({k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(f"{split}/{k}", v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({f"{split}/{k}": v for k, v in numeric.items()}, step=step)

    def log_table(self, step: int, name: str, columns: Sequence[str], rows: Sequence[Sequence],
                  split: str = "train") -> None:
        """``rows`` under ``<split>/<name>`` at ``step``: TensorBoard text (Markdown), W&B table."""
        if not self.enabled:
            return
        for row in rows:
            if len(row) != len(columns):
                raise ValueError(f"table {split}/{name}: a row of {len(row)} values for {len(columns)} columns")
        if self._tb is not None:
            self._tb.add_text(f"{split}/{name}", markdown_table(columns, rows), step)
            self._tb.flush()
        if self._wandb is not None:
            import wandb  # present: the run was opened with it

            self._wandb.log({f"{split}/{name}": wandb.Table(columns=list(columns), data=[list(r) for r in rows])},
                            step=step)

    def close(self) -> None:
        if self in _OPEN:
            _OPEN.remove(self)
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


# (shown name, metric): the loss (an online algorithm's policy loss), the mean reward of an
# online algorithm's rollouts; the first metric a step has of each name is shown
PROGRESS_METRICS = (("loss", "loss"), ("loss", "loss/policy"), ("reward", "reward/mean"))


class Progress:
    """Progress of one stage: step / total, loss, reward (online algorithms), tokens/s,
    elapsed, ETA (tqdm's meter).

    On a terminal a ``tqdm`` bar; otherwise (a Slurm or CI log) the same meter as one logged
    line per update, so log files stay readable. Silent on ranks other than 0 and when
    ``enabled`` is false (messages are still logged).
    """

    def __init__(self, stage: str, total_steps: int, start_step: int = 0, enabled: bool = True):
        import sys
        import time

        self.stage = stage
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.perf_counter()
        self.enabled = enabled and is_rank0()
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=stage, unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def update(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        postfix = {}
        for name, key in PROGRESS_METRICS:
            if key in metrics and name not in postfix:
                postfix[name] = f"{metrics[key]:.4f}"
        if "tokens_per_s" in metrics:
            postfix["tok/s"] = f"{metrics['tokens_per_s']:.0f}"
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(step - self.bar.n)
            if step >= self.total:
                self.close()
            return
        import time

        from tqdm import tqdm

        log.info(tqdm.format_meter(step, self.total, time.perf_counter() - self.t0, prefix=self.stage, unit="step",
                                   initial=self.start_step, postfix=", ".join(f"{k}={v}" for k, v in postfix.items())))

    def message(self, text: str) -> None:
        log.info(f"[{self.stage}] {text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
