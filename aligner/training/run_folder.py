"""Run folders: one run per folder, resumed only with the config it was started with.

A run folder (``trainer.out_dir``) holds ``config.yaml`` (the composed config, written when
the run starts), ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``, ``wandb.json`` (the
Weights & Biases run id, so a resumed run continues the same W&B run), ``hf/`` and
``result.json``.

Starting a trainer in a folder that holds a complete checkpoint:

- ``trainer.resume=true`` (the default) resumes it if the training-relevant config equals
  the recorded one, and otherwise refuses, naming the keys that differ
  (:func:`check_resume`). Keys that do not change what is trained — how the run is laid
  out (``parallel``: checkpoints reshard), watched (logging, validation, progress),
  checkpointed or exported, and how many rows are generated or scored together — are
  free to change (:data:`FREE_KEYS`). A run that is complete resumes to nothing: its
  files, ``result.json`` included, stay as they are.
- ``trainer.resume=false`` starts afresh there: the previous run's outputs — whatever a
  run of any algorithm writes (:data:`RUN_OUTPUTS`) — are removed first
  (:func:`start_fresh`), so files of two runs never mix.
"""
from __future__ import annotations

import fnmatch
import json
import shutil
import uuid
from pathlib import Path
from typing import Any, List, Optional, Tuple

import yaml

from aligner.files import atomic_write_text
from aligner.runtime import UserError, get_logger

CONFIG_FILE = "config.yaml"
WANDB_FILE = "wandb.json"
RESULT_FILE = "result.json"
# What a run of any algorithm writes into its folder (glob patterns), all removed before a
# fresh start there so that no file of an earlier run (of this or another algorithm) is
# left to be mistaken for this one's: the loop's checkpoints, metrics, loggers, HF exports
# (hf/ and hf_<role>/ of the other trainable roles, e.g. PPO's critic), the tokenizer copy,
# result and config (with their temporary files), the monitor's best_gold/ (and the
# folders of its swap), the online SteerLM 2.0 sampler's scored groups, SPIN's generations,
# distillation's precomputed teacher top-k.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "metrics.jsonl.tmp", "tensorboard", "wandb", WANDB_FILE, "hf", "hf_*",
               "tokenizer", RESULT_FILE, CONFIG_FILE, CONFIG_FILE + ".tmp", "best_gold", "best_gold.old",
               "best_gold.tmp-*", "steerlm2_samples", "spin_samples",
               "teacher_topk.pt", "teacher_topk.pt.tmp")

# Keys (glob patterns over dotted paths) whose change does not change what is trained.
FREE_KEYS = (
    "parallel.*",  # a checkpoint reshards to another layout
    "model.layer_spec",  # which kernels compute the same layers
    "data.validation",
    "trainer.micro_batch_size",  # the objective is normalised over the global batch
    "trainer.val_interval",
    "trainer.val_batches",
    "trainer.save_interval",
    "trainer.keep_last",
    "trainer.log_interval",
    "trainer.resume",
    "trainer.out_dir",
    "trainer.export_hf",
    "trainer.progress",
    "trainer.tensorboard",
    "trainer.wandb_project",
    "trainer.wandb_name",
    "trainer.save_on_signal",
    # speed-only knobs: how many rows are generated or scored together. Sample k draws from
    # its own seed whatever the batch (docs/online_core.md) and a reward is read per
    # sequence, so they change the time a step takes, not what it computes
    "*.generation.max_batch",  # pg, ppo, steerlm2: rollouts generated together
    "*.generation.continuous_batching",  # pg, ppo, steerlm2, spin, distill: slot refill on or off
    "*.reward.micro_batch_size",  # pg, ppo: responses per reward-model forward
    "*.reward_micro_batch_size",  # steerlm2: responses per reward-model forward
    "monitor.micro_batch_size",  # the monitor's reward-model forwards (watching, not training)
)

# Keys that may change on a resume: the run length (a run can be extended or shortened).
# The LR schedule keeps the checkpoint's (megatron-core's scheduler restores its decay
# length), so past the recorded length a decaying LR stays at optim.min_lr. Logged, not refused.
EXTENDABLE_KEYS = ("trainer.max_steps", "trainer.max_epochs")


def _flatten(node: Any, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def config_diff(recorded: dict, current: dict) -> List[Tuple[str, Any, Any]]:
    """``(key, recorded value, current value)`` for every training-relevant key that differs
    (a key only one side has counts as differing), in sorted key order."""
    a, b = _flatten(recorded), _flatten(current)
    missing = object()
    out = []
    for key in sorted(set(a) | set(b)):
        if any(fnmatch.fnmatchcase(key, pat) for pat in FREE_KEYS + EXTENDABLE_KEYS):
            continue
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            out.append((key, "(absent)" if va is missing else va, "(absent)" if vb is missing else vb))
    return out


def recorded_config(out_dir) -> Optional[dict]:
    path = Path(out_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: the recorded config is not valid YAML ({exc.__class__.__name__})",
                        hint="start afresh with trainer.resume=false or use another trainer.out_dir") from None
    return data if isinstance(data, dict) else None


def holds_run(out_dir) -> bool:
    """Whether ``out_dir`` holds a run that can be resumed (a complete checkpoint)."""
    from aligner.models.checkpoint import find_latest  # megatron-core: loaded when a run folder is checked

    root = Path(out_dir) / "checkpoints"
    return root.is_dir() and find_latest(root) is not None


def check_resume(out_dir, config: dict, resume: bool) -> bool:
    """Decide how a run starts in ``out_dir``; True when it will resume a run found there.

    Raises :class:`UserError` when ``resume`` is set, the folder holds a run, and its
    recorded config differs from ``config`` in training-relevant keys (named, with both
    values). Reads only: nothing is written or removed here.
    """
    if not resume or not holds_run(out_dir):
        return False
    recorded = recorded_config(out_dir)
    if recorded is None:  # a run started without a recorded config (a research script)
        return True
    diff = config_diff(recorded, config)
    flat_recorded, flat_config = _flatten(recorded), _flatten(config)
    for key in EXTENDABLE_KEYS:
        if flat_recorded.get(key) != flat_config.get(key):
            get_logger(__name__).warning(
                f"{key} changes from {flat_recorded.get(key)!r} to {flat_config.get(key)!r} on resume: the run"
                f" continues to the new length with the recorded LR schedule (a decaying LR stays at optim.min_lr"
                f" past the recorded length)")
    if diff:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff[:8])
        more = f" (and {len(diff) - 8} more)" if len(diff) > 8 else ""
        raise UserError(
            f"{out_dir} holds a run with a different config, so it is not resumed: {shown}{more}",
            hint="resume it with the same config, or start fresh: trainer.resume=false (replaces that run)"
                 " or another trainer.out_dir",
        )
    return True


def start_fresh(out_dir) -> List[str]:
    """Remove a previous run's outputs (:data:`RUN_OUTPUTS`) from ``out_dir`` (call on
    global rank 0 only, after every check passed); returns what was removed. Files of the
    user's own there are kept."""
    out = Path(out_dir)
    removed = []
    found = sorted({path for pattern in RUN_OUTPUTS for path in out.glob(pattern)}) if out.is_dir() else []
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path.name)
    if removed:
        get_logger(__name__).warning(f"starting afresh in {out}: removed the previous run's {', '.join(removed)}")
    return removed


def recorded_result(out_dir, step: int) -> Optional[dict]:
    """The figures ``result.json`` records for a run that ended at ``step`` (None if it
    records none, or another step's)."""
    path = Path(out_dir) / RESULT_FILE
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and result.get("step") == step else None


def write_config(out_dir, config_yaml: str) -> None:
    """Record the run's composed config (``config.yaml``), atomically."""
    atomic_write_text(Path(out_dir) / CONFIG_FILE, config_yaml)


def wandb_run_id(out_dir, resume: bool) -> str:
    """The W&B run id of the run in ``out_dir``: the recorded one when resuming, else a new
    one, recorded in ``wandb.json`` so the next resume continues the same W&B run."""
    path = Path(out_dir) / WANDB_FILE
    if resume and path.is_file():
        try:
            run_id = json.loads(path.read_text())["id"]
            if isinstance(run_id, str) and run_id:
                return run_id
        except (ValueError, KeyError, TypeError):
            pass
        get_logger(__name__).warning(f"{path}: no run id recorded; this W&B run gets a new one")
    run_id = uuid.uuid4().hex[:8]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"id": run_id}) + "\n")
    return run_id


__all__ = ["CONFIG_FILE", "FREE_KEYS", "RESULT_FILE", "RUN_OUTPUTS", "check_resume", "config_diff", "holds_run",
           "recorded_config", "recorded_result", "start_fresh", "wandb_run_id", "write_config"]
