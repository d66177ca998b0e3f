"""Training checkpoints: megatron-core dist_checkpointing, resumable at another TP / PP layout.

Layout of ``<root>``::

    step_0000012/            one complete checkpoint
        (dist_checkpointing files: model, optimizer, scheduler)
        rng/rank_00000.json  RNG states of each global rank
        extra.json           the caller's data (step, data position, ...); written last
        model_config.json    the architecture (for ``aligner export``), when given
    latest                   {"step": 12, "dir": "step_0000012"}, replaced atomically

Crash safety: a checkpoint is written under ``step_XXXXXXX.tmp-<id>``, renamed to its
final name only after every rank finished, and ``latest`` is replaced (write + rename)
after that; a crash at any point leaves ``latest`` naming the previous complete
checkpoint. Directories ending in ``.tmp-*`` are never read and are removed by the next
save. ``keep_last=k`` then deletes older complete checkpoints.

Nothing is unpickled by aligner: RNG states, extra data and the model config are JSON;
tensors and the non-tensor state (optimizer hyper-parameters, scheduler) go through
dist_checkpointing, whose ``common.pt`` is read with ``torch.load``'s default
``weights_only=True`` (torch >= 2.6) unpickler.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

from aligner.models.gpt import unwrap_model


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _unwrap(m):
    return unwrap_model(m)


def _as_list(models) -> list:
    return list(models) if isinstance(models, (list, tuple)) else [models]


def _model_state(models) -> dict:
    models = _as_list(models)
    if len(models) == 1:
        return {"model": _unwrap(models[0]).sharded_state_dict()}
    return {f"model{i}": _unwrap(m).sharded_state_dict() for i, m in enumerate(models)}


def _rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    np_state = np.random.get_state()
    tracker = {k: v.tolist() for k, v in get_cuda_rng_tracker().get_states().items()}
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
        "tracker": tracker,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), npst[2], npst[3], npst[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))
    get_cuda_rng_tracker().set_states({k: torch.tensor(v, dtype=torch.uint8) for k, v in state["tracker"].items()})


def _writer_queue() -> None:
    """dist_checkpointing's writer collects results through a multiprocessing Manager that
    it starts with the *spawn* method, which re-imports the ``__main__`` module: a research
    script without a ``__main__`` guard would run again inside it. Its write workers are
    forked; give it a Manager started the same way, which imports nothing. The Manager is a
    process of its own: it is made to die with the training process, so a rank killed with
    SIGKILL leaves no Manager behind (Linux)."""
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        manager = SyncManager(ctx=mp.get_context("fork"))
        manager.start(initializer=_serve_the_parent, initargs=(os.getpid(),))
        filesystem_async._results_queue = manager.Queue()


def _serve_the_parent(parent: int) -> None:
    """The writer's Manager lives and ends with the training process: it ignores SIGTERM
    (a scheduler sends it to every process of a job, and the training process answers it
    by saving a checkpoint through this Manager) and dies with ``parent``."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """In a child process: be killed when ``parent`` ends, however it ends (Linux's
    PR_SET_PDEATHSIG; elsewhere nothing)."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent ended before the request was made
        os._exit(0)


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def _is_partial(path: Path) -> bool:
    return ".tmp-" in path.name


def _json_or_error(what: str, value) -> str:
    try:
        return json.dumps(value, indent=2, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"save_checkpoint: {what} must be JSON-serialisable ({exc})") from None


def save_checkpoint(
    root,
    step: int,
    models,
    optimizer=None,
    scheduler=None,
    extra: Optional[dict] = None,
    keep_last: Optional[int] = None,
    model_config: Optional[dict] = None,
) -> Path:
    """Save a complete checkpoint of step ``step`` under ``root``; returns its directory.

    models: the model chunks (megatron modules, possibly DDP-wrapped); optimizer: a
    megatron-core optimizer or None; scheduler: an object with ``state_dict()`` /
    ``load_state_dict()`` or None; extra: JSON-serialisable caller data (data position,
    consumed samples, ...); model_config: the architecture (``ModelConfig.to_dict()``),
    written as ``model_config.json`` for ``aligner export``. ``keep_last=k`` keeps the k
    newest complete checkpoints. Collective: every rank calls it.
    """
    from megatron.core import dist_checkpointing

    if keep_last is not None and keep_last < 1:
        raise ValueError(f"save_checkpoint: keep_last must be >= 1 or None, got {keep_last}")
    world = dist.get_world_size() if dist.is_initialized() else 1
    # checked before anything is written, on every rank (no rank fails alone mid-save)
    extra_json = _json_or_error("extra", dict(extra or {}, step=int(step), world_size=world))
    config_json = _json_or_error("model_config", model_config) if model_config is not None else None

    root = Path(root)
    final = _step_dir(root, step)
    tag = [f"{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}"]
    if dist.is_initialized():
        dist.broadcast_object_list(tag, src=0)
    tmp = final.with_name(f"{final.name}.tmp-{tag[0]}")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("step_*.tmp-*"):  # left by a crashed save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    state = _model_state(models)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    _writer_queue()
    dist_checkpointing.save(state, str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)
    with open(tmp / "rng" / f"rank_{_rank():05d}.json", "w") as f:
        json.dump(_rng_state(), f)
    _barrier()
    if _rank() == 0:
        if config_json is not None:
            (tmp / "model_config.json").write_text(config_json)
        (tmp / "extra.json").write_text(extra_json)  # last: marks the directory complete
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / f"latest.tmp-{tag[0]}"
        latest_tmp.write_text(json.dumps({"step": int(step), "dir": final.name}))
        os.replace(latest_tmp, root / "latest")
        if keep_last:
            for old in list_checkpoints(root)[:-keep_last]:
                if old != final:
                    shutil.rmtree(old)
    _barrier()
    return final


def find_latest(root) -> Optional[Path]:
    """The complete checkpoint that ``<root>/latest`` names; without a ``latest`` file, the
    newest complete ``step_*`` directory; None when there is none. ``*.tmp-*`` directories
    (unfinished saves) are never returned."""
    root = Path(root)
    marker = root / "latest"
    if not marker.is_file():
        complete = list_checkpoints(root)
        return complete[-1] if complete else None
    try:
        info = json.loads(marker.read_text())
        name = info["dir"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{marker}: expected JSON {{\"step\": N, \"dir\": \"step_...\"}} ({exc})") from None
    path = root / name
    if _is_partial(path) or not (path / "extra.json").is_file():
        raise FileNotFoundError(f"{marker} names {path}, which is missing or incomplete (no extra.json)")
    return path


def load_checkpoint(path_or_root, models, optimizer=None, scheduler=None) -> dict:
    """Load model (and optimizer / scheduler / RNG) state; returns the saved ``extra`` (with ``step``).

    ``path_or_root``: a step directory, or a root (its ``latest`` complete checkpoint).
    The checkpoint may come from another TP / PP layout (dist_checkpointing reshards
    model and optimizer). RNG states (Python, NumPy, torch, megatron-core's tracker) are
    per rank, so they are restored when the world size is unchanged; at another world
    size the current seeds stay.
    """
    from megatron.core import dist_checkpointing

    path = Path(path_or_root)
    if not (path / "extra.json").is_file():  # a root: its latest complete checkpoint
        found = find_latest(path) if path.is_dir() else None
        if found is None:
            raise FileNotFoundError(f"{path}: no complete aligner checkpoint here (no extra.json, no latest)")
        path = found
    extra = json.loads((path / "extra.json").read_text())
    models = _as_list(models)
    state = _model_state(models)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True)
    loaded = dist_checkpointing.load(state, str(path))
    if len(models) == 1:
        _unwrap(models[0]).load_state_dict(loaded["model"])
    else:
        for i, m in enumerate(models):
            _unwrap(m).load_state_dict(loaded[f"model{i}"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        if "scheduler" not in loaded:
            raise KeyError(f"{path}: no scheduler state saved")
        scheduler.load_state_dict(loaded["scheduler"])
    world = dist.get_world_size() if dist.is_initialized() else 1
    rng_file = path / "rng" / f"rank_{_rank():05d}.json"
    if extra.get("world_size") == world and rng_file.is_file():
        _set_rng_state(json.loads(rng_file.read_text()))
    return extra


def list_checkpoints(root) -> List[Path]:
    """Complete checkpoint directories under ``root``, oldest first."""
    root = Path(root)
    return sorted(p for p in root.glob("step_*")
                  if p.is_dir() and not _is_partial(p) and (p / "extra.json").is_file())
