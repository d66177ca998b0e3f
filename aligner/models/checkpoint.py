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

Adapter-only checkpoints: a model with LoRA adapters (docs/lora.md) saves its trainable
tensors only (the adapters and a score head) and their optimizer state; the frozen base
is left out, and ``extra.json`` records its fingerprint (:func:`base_fingerprint`), which
a resume checks before it loads anything: adapters are never loaded onto another base.

Nothing is unpickled by aligner: RNG states, extra data and the model config are JSON;
tensors and the non-tensor state (optimizer hyper-parameters, scheduler) go through
dist_checkpointing, whose ``common.pt`` is read with ``torch.load``'s default
``weights_only=True`` (torch >= 2.6) unpickler.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import is_main_replica

from aligner.models.gpt import unwrap_model
from aligner.models.hf import CheckpointError
from aligner.models.lora import has_adapters


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _unwrap(m):
    return unwrap_model(m)


def _as_list(models) -> list:
    return list(models) if isinstance(models, (list, tuple)) else [models]


def split_state(module) -> Tuple[dict, dict]:
    """``(saved, left_out)``: ``module``'s sharded state dict (megatron-core) split into what
    a checkpoint holds and what it leaves out. A model with LoRA adapters saves its
    trainable parameters (adapters, score head); its frozen base (and the base layers'
    extra state) is left out. Any other model saves everything."""
    state = module.sharded_state_dict()
    if not has_adapters(module):
        return state, {}
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    return ({k: v for k, v in state.items() if k in trainable},
            {k: v for k, v in state.items() if k not in trainable})


def load_module_state(module, state: dict, where) -> None:
    """Load ``state`` (what :func:`split_state` saved) into ``module``: everything for a plain
    model; for a model with adapters, every trainable parameter (the base stays)."""
    if not has_adapters(module):
        module.load_state_dict(state)
        return
    result = module.load_state_dict(state, strict=False)
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    missing = sorted(set(result.missing_keys) & trainable)
    if missing or result.unexpected_keys:
        raise KeyError(f"{where}: the adapter checkpoint does not fit this model (missing {missing[:3]},"
                       f" unexpected {sorted(result.unexpected_keys)[:3]})")


def _modules(models) -> List[Tuple[str, torch.nn.Module]]:
    """``(role, module)`` of every model chunk a checkpoint covers: several roles' chunks
    come from their ``checkpoint_modules()`` (:mod:`aligner.training.roles`); a plain
    model's role is ``""``."""
    out = []
    for m in _as_list(models):
        if hasattr(m, "checkpoint_modules"):
            out += m.checkpoint_modules()
        else:
            out.append(("", _unwrap(m)))
    return out


def _model_state(models) -> dict:
    models = _as_list(models)
    if len(models) == 1:
        m = models[0]
        return {"model": m.sharded_state_dict() if hasattr(m, "checkpoint_modules") else split_state(_unwrap(m))[0]}
    return {f"model{i}": split_state(_unwrap(m))[0] for i, m in enumerate(models)}


_MASK = (1 << 64) - 1


def _mixed_sum(t: torch.Tensor) -> int:
    """Sum over the elements of ``t`` of a 64-bit mix of each value's bits, modulo 2^64:
    exact and independent of the order of the elements (so of the TP / PP sharding)."""
    flat = t.detach().reshape(-1)
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    total = 0
    for start in range(0, flat.numel(), 1 << 22):  # bounded temporaries
        x = flat[start:start + (1 << 22)].contiguous().view(bits).to(torch.int64)
        x = x * -7046029254386353131  # splitmix64's multipliers (int64 products wrap)
        x = x ^ (x >> 31)
        x = x * -4658895280553007687
        x = x ^ (x >> 29)
        total = (total + int(x.sum())) & _MASK
    return total


def base_fingerprint(models) -> Optional[str]:
    """A fingerprint of the frozen base under the adapters of ``models`` (None: no adapters).

    It covers every tensor an adapter checkpoint leaves out (:func:`split_state`): per
    sharded tensor key (layout-independent: megatron-core's global names), the dtype, the
    number of elements and an exact sum of a 64-bit mix of every value's bits; the keys,
    counts and sums of all ranks are merged and hashed (SHA-256, 16 hex digits). Any change
    of a base value, shape, name or dtype changes it (but for a collision of 2^-64); a
    permutation of the values inside one tensor does not. One read of the base per call.
    Collective: every rank calls it."""
    parts = _modules(models)
    if not any(has_adapters(m) for _, m in parts):
        return None
    local: dict = {}
    for role, module in parts:
        for entry in split_state(module)[1].values():
            data = getattr(entry, "data", None)
            if not torch.is_tensor(data) or not is_main_replica(entry.replica_id):
                continue  # extra state; or a replica another rank counts
            key = f"{role}/{entry.key}/{data.dtype}"
            count, total = local.get(key, (0, 0))
            local[key] = (count + data.numel(), (total + _mixed_sum(data)) & _MASK)
    gathered = [local]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
    merged: dict = {}
    for rank_entries in gathered:
        for key, (count, total) in rank_entries.items():
            c, t = merged.get(key, (0, 0))
            merged[key] = (c + count, (t + total) & _MASK)
    text = json.dumps(sorted((k, c, t) for k, (c, t) in merged.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
    extra = dict(extra or {}, step=int(step), world_size=world)
    fingerprint = base_fingerprint(models)
    if fingerprint is not None:  # an adapter checkpoint: the base it belongs to
        extra["base_fingerprint"] = fingerprint
    # checked before anything is written, on every rank (no rank fails alone mid-save)
    extra_json = _json_or_error("extra", extra)
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
        raise CheckpointError(f"{marker}: expected JSON {{\"step\": N, \"dir\": \"step_...\"}} ({exc})") from None
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
    _check_base(path, extra.get("base_fingerprint"), base_fingerprint(models))
    state = _model_state(models)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True)
    loaded = dist_checkpointing.load(state, str(path))
    if len(models) == 1:
        m = models[0]
        if hasattr(m, "checkpoint_modules"):
            m.load_state_dict(loaded["model"])
        else:
            load_module_state(_unwrap(m), loaded["model"], path)
    else:
        for i, m in enumerate(models):
            load_module_state(_unwrap(m), loaded[f"model{i}"], path)
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


def _check_base(path: Path, saved: Optional[str], current: Optional[str]) -> None:
    """Refuse, before any tensor is read, adapters onto another base (or a full model
    into an adapter run, and the reverse): a CheckpointError, one line on the command line."""
    if saved == current:
        return
    if saved is None:
        raise CheckpointError(f"{path}: a full-model checkpoint; this model has LoRA adapters (base fingerprint"
                         f" {current}): resume it without lora.enabled, or start in a new out_dir")
    if current is None:
        raise CheckpointError(f"{path}: holds LoRA adapters only (base fingerprint {saved}), not a whole model; load it"
                         " onto its base with lora.enabled (the run's hf/ and hf_peft/ exports hold the merged"
                         " model and the adapters)")
    raise CheckpointError(f"{path}: its adapters belong to the base with fingerprint {saved}; this run's base has"
                     f" fingerprint {current}: resume on the base it was trained on (init.hf) or start in a new"
                     " out_dir")


def list_checkpoints(root) -> List[Path]:
    """Complete checkpoint directories under ``root``, oldest first."""
    root = Path(root)
    return sorted(p for p in root.glob("step_*")
                  if p.is_dir() and not _is_partial(p) and (p / "extra.json").is_file())
