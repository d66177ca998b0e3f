"""Metrics sinks (JSONL, TensorBoard, optionally Weights & Biases) and the console progress line.

Only global rank 0 writes. ``metrics.jsonl`` holds one JSON object per logged step and
split; on resume, lines of steps after the resumed checkpoint are dropped first, so a run
killed and resumed ends with the same file as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


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
        self.enabled = _is_rank0()
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.truncate(resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:
                print("aligner: tensorboard is not installed; TensorBoard logging is off", file=sys.stderr)
        if wandb_project:
            import wandb  # an explicit request: a missing package is an error

            self._wandb = wandb.init(project=wandb_project, name=wandb_name, config=config, resume="allow")

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
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

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

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """One console line per logged step: stage, step / total, loss, tokens/s, ETA."""

    def __init__(self, stage: str, total_steps: int, start_step: int = 0, enabled: bool = True):
        self.stage = stage
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.perf_counter()
        self.enabled = enabled and _is_rank0()
        self.tty = sys.stderr.isatty()

    def update(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        width = 20
        filled = int(width * step / max(1, self.total))
        bar = "#" * filled + "." * (width - filled)
        parts = [f"[{self.stage}] {bar} {step}/{self.total}"]
        if "loss" in metrics:
            parts.append(f"loss {metrics['loss']:.4f}")
        if "tokens_per_s" in metrics:
            parts.append(f"{metrics['tokens_per_s']:.0f} tok/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        parts.append(f"ETA {_clock(eta) if math.isfinite(eta) else '?'}")
        line = " | ".join(parts)
        if self.tty:
            end = "\n" if step >= self.total else ""
            print("\r" + line, end=end, file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(("\n" if self.tty else "") + f"[{self.stage}] {text}", file=sys.stderr, flush=True)
