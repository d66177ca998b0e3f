"""Training checkpoints: megatron-core dist_checkpointing, resumable at another TP / PP layout.

Layout of ``<root>``::

    step_0000012/            one complete checkpoint
        (dist_checkpointing files: model, optimizer, scheduler)
        rng/rank_00000.json  RNG states of each global rank
        extra.json           the caller's data (step, data position, ...); written last
        model_config.json    the architecture (for ``aligner export``), when given
    latest                   {"step": 12, "dir": "step_0000012"}, replaced atomically

Crash safety: a checkpoint is written under ``step_XXXXXXX.tmp``, renamed to its final
name only after every rank finished, and ``latest`` is replaced after the rename; a
crash at any point leaves ``latest`` naming the previous complete checkpoint (a stale
``.tmp`` directory is removed by the next save). ``keep_last=k`` then deletes older
complete checkpoints. Nothing is unpickled on load: dist_checkpointing's tensors, JSON
for everything else.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _unwrap(m):
    from aligner.models.gpt import unwrap_model

    return unwrap_model(m)


def _model_state(models) -> dict:
    models = list(models)
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
    forked; give it a Manager started the same way, which imports nothing."""
    import multiprocessing as mp

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = mp.get_context("fork").Manager().Queue()


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


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
    """Save a complete checkpoint of step ``step`` (collective: every rank calls it)."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = _step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
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
        if model_config is not None:
            (tmp / "model_config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True))
        meta = dict(extra or {}, step=step, world_size=dist.get_world_size() if dist.is_initialized() else 1)
        (tmp / "extra.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(json.dumps({"step": step, "dir": final.name}))
        os.replace(latest_tmp, root / "latest")
        if keep_last:
            complete = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
            for old in complete[:-keep_last]:
                if old != final:
                    shutil.rmtree(old)
    _barrier()
    return final


def find_latest(root) -> Optional[Path]:
    """The complete checkpoint ``latest`` names, or None."""
    root = Path(root)
    marker = root / "latest"
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{marker}: not valid JSON ({exc.msg})") from None
    path = root / info["dir"]
    if not (path / "extra.json").is_file():
        raise FileNotFoundError(f"{marker} names {path}, which is missing or incomplete (no extra.json)")
    return path


def load_checkpoint(path_or_root, models, optimizer=None, scheduler=None) -> dict:
    """Load model (and optimizer / scheduler / RNG) state; returns the saved ``extra`` (with ``step``).

    The checkpoint may come from another TP / PP layout (dist_checkpointing reshards).
    RNG states are restored only when the world size is unchanged.
    """
    from megatron.core import dist_checkpointing

    path = Path(path_or_root)
    if (path / "latest").is_file():
        path = find_latest(path)
    if not (path / "extra.json").is_file():
        raise FileNotFoundError(f"{path}: not a complete aligner checkpoint (no extra.json)")
    extra = json.loads((path / "extra.json").read_text())
    models = list(models)
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
    root = Path(root)
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
