"""Rollout logs: what the policy generated, readable beside the metrics.

With ``trainer.log_rollouts = N`` (> 0) an online run writes, every N steps, at most
``trainer.log_rollouts_rows`` of global rank 0's rows to ``<out_dir>/rollouts/step_<step>.jsonl``
(``step`` numbered as in ``metrics.jsonl``, from 1). One JSON object a line: ``sample_index``,
``prompt``, ``response``, ``reward``, ``attributes`` (attribute name -> score, when the
reward has attributes), ``advantage`` (mean over the response tokens), ``length`` (response
tokens), ``eos`` (ended on a stop token), ``logprob`` / ``ref_logprob`` (sums over the
response tokens under the policy before the update and the reference).

The same rows go to TensorBoard's text tab (``train/rollouts``, a Markdown table per
logged step) and to W&B (a ``wandb.Table``) when the run logs there
(:func:`aligner.training.logging.log_table`).

A step's file is written whole or not at all (:mod:`aligner.files`), so a run killed and
resumed rewrites a step it repeats instead of appending to it: the rows of a step are
never duplicated. ``aligner rollouts show RUN --step N`` prints one step; pandas reads one
with ``pandas.read_json(path, lines=True)``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence

from aligner.files import write_jsonl
from aligner.training.logging import log_table

FIELDS = ("sample_index", "prompt", "response", "reward", "attributes", "advantage", "length", "eos",
          "logprob", "ref_logprob")


def rollout_path(out_dir, step: int) -> Path:
    return Path(out_dir) / "rollouts" / f"step_{step:07d}.jsonl"


class RolloutLog:
    """Writes the rollout log of a run folder: every ``every`` steps (0: never), at most
    ``max_rows`` rows a step."""

    def __init__(self, out_dir, every: int, max_rows: int):
        self.out_dir, self.every, self.max_rows = Path(out_dir), int(every), int(max_rows)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def write(self, step: int, rows: Sequence[dict]) -> Path:
        """The step's file, and the same rows as a table to the run's TensorBoard / W&B."""
        rows = list(rows)[:self.max_rows]
        path = write_jsonl(rollout_path(self.out_dir, step), rows, ensure_ascii=False)
        columns, values = table_of(rows)
        log_table(step, "rollouts", columns, values)
        return path


def table_of(rows: Sequence[dict]):
    """``(columns, rows)`` of rollout rows: the fields, ``attributes`` as one column per
    attribute name (``attr/<name>``), in the order of :data:`FIELDS`."""
    names: List[str] = []
    for r in rows:
        names += [n for n in (r.get("attributes") or {}) if n not in names]
    columns = [f for f in FIELDS if f != "attributes"] + [f"attr/{n}" for n in names]
    values = [[r.get(f) for f in FIELDS if f != "attributes"] + [(r.get("attributes") or {}).get(n) for n in names]
              for r in rows]
    return columns, values


def logged_steps(out_dir) -> List[int]:
    """The steps with a rollout log in run folder ``out_dir``, ascending."""
    folder = Path(out_dir) / "rollouts"
    return sorted(int(p.stem.split("_")[1]) for p in folder.glob("step_*.jsonl")) if folder.is_dir() else []


def read_rollouts(out_dir, step: int) -> List[dict]:
    """The rows logged at ``step`` (FileNotFoundError naming the file and the logged steps)."""
    path = rollout_path(out_dir, step)
    if not path.is_file():
        steps = logged_steps(out_dir)
        have = f"logged steps: {', '.join(map(str, steps))}" if steps else "no rollouts logged (trainer.log_rollouts)"
        raise FileNotFoundError(f"{path}: no rollout log for step {step}; {have}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def rollout_table(rows: Sequence[dict], width: Optional[int] = 60) -> str:
    """A Markdown table of rollout rows (TensorBoard renders its text plugin as Markdown);
    prompt and response cut to ``width`` characters (None: whole)."""
    def cell(text) -> str:
        text = " ".join(str(text).split()).replace("|", "\\|")
        return text if width is None or len(text) <= width else text[:width - 1] + "…"

    lines = ["| # | prompt | response | reward | advantage | length | eos | logprob |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['sample_index']} | {cell(r['prompt'])} | {cell(r['response'])} | {r['reward']:.4g}"
                     f" | {r['advantage']:.4g} | {r['length']} | {'yes' if r['eos'] else 'no'}"
                     f" | {r['logprob']:.4g} |")
    return "\n".join(lines)
