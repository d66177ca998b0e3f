"""Run a function in N local processes as one distributed job (tests, CPU experiments).

``spawn_local(fn, world_size, *args)`` starts ``world_size`` fresh interpreters with the
torchrun variables set (free port on 127.0.0.1), calls ``fn(*args, **kwargs)`` in each and
returns the list of per-rank results. A rank that raises, dies or outlives ``timeout``
fails the whole call with :class:`SpawnError` (the rank, its traceback or exit code) and
every remaining rank is killed: a broken rank never blocks the caller. Each rank leads a
process group, killed when the call returns, so nothing a rank started outlives it (POSIX).
``fn`` and its arguments must be picklable (a module-level function).

Ranks are forked from a multiprocessing fork server that has imported torch, megatron-core
and ``aligner.models`` once (about 7 s of CPU per interpreter on a CPU machine): a job
then starts in a fraction of a second instead of every rank importing them again. Each
rank still runs with the caller's environment and working directory as they are at the
call (the fork server's are those of its start). ``ALIGNER_SPAWN_METHOD=spawn`` starts
fresh interpreters instead (the same results, slower).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import signal
import time
import traceback
from typing import Any, Callable

from aligner.parallel.state import free_port

# what the fork server imports before it forks any rank
PRELOAD = ("torch", "megatron.core", "aligner.models")
_contexts: dict = {}


def _context():
    """The multiprocessing context ranks start from: a fork server with :data:`PRELOAD`
    imported (POSIX), or fresh interpreters (``ALIGNER_SPAWN_METHOD=spawn``, or where there
    is no fork server)."""
    method = os.environ.get("ALIGNER_SPAWN_METHOD", "forkserver")
    if method not in ("forkserver", "spawn"):
        raise ValueError(f"ALIGNER_SPAWN_METHOD={method!r}: expected 'forkserver' or 'spawn'")
    if method == "forkserver" and "forkserver" not in mp.get_all_start_methods():
        method = "spawn"
    if method not in _contexts:
        ctx = mp.get_context(method)
        if method == "forkserver":
            ctx.set_forkserver_preload(list(PRELOAD))
        _contexts[method] = ctx
    return _contexts[method]


class SpawnError(RuntimeError):
    """A rank of a local job failed, died or hung."""


def _worker(rank, world_size, port, fn, args, kwargs, results, threads, environ, cwd):
    # Each rank leads its own process group, so that whatever it starts (a checkpoint
    # writer's manager, a subprocess) is killed with it instead of outliving the job.
    os.setpgid(0, 0)
    # the caller's environment and folder at the call, not the fork server's
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch

    torch.set_num_threads(threads)
    try:
        out = fn(*args, **kwargs)
        # plain pickle: tensors travel as bytes, not as shared-memory handles that die with the rank
        results.put((rank, True, pickle.dumps(out)))
    except BaseException as exc:  # report every failure, including SystemExit
        results.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise SystemExit(1)
    finally:
        try:
            from aligner.parallel.state import destroy

            destroy()
        except Exception:
            pass


def _kill_group(pid: int) -> None:
    """SIGKILL the process group a rank leads (the rank and anything it started)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def spawn_local(
    fn: Callable[..., Any],
    world_size: int,
    *args,
    timeout: float = 300.0,
    threads_per_rank: int | None = None,
    **kwargs,
) -> list:
    """Run ``fn`` on ``world_size`` local ranks; returns ``[result_rank0, result_rank1, ...]``."""
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, fn, args, kwargs, results, threads, dict(os.environ), os.getcwd()),
            daemon=False,  # ranks may start children (dist_checkpointing does)
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue_mod.Empty:
                for rank, p in enumerate(procs):
                    if rank not in outputs and p.exitcode is not None:
                        # give a rank that raised (or returned) a moment to deliver its message
                        try:
                            r2, ok2, payload2 = results.get(timeout=2.0)
                        except queue_mod.Empty:
                            raise SpawnError(
                                f"rank {rank} of {world_size} died with exit code {p.exitcode}"
                            ) from None
                        if not ok2:
                            raise SpawnError(f"rank {r2} of {world_size} failed: {payload2}")
                        outputs[r2] = pickle.loads(payload2)
                if time.monotonic() > deadline:
                    missing = [r for r in range(world_size) if r not in outputs]
                    raise SpawnError(
                        f"ranks {missing} of {world_size} did not finish within {timeout:.0f} s"
                    )
                continue
            if not ok:
                raise SpawnError(f"rank {rank} of {world_size} failed: {payload}")
            outputs[rank] = pickle.loads(payload)
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.pid is not None:
                _kill_group(p.pid)
            if p.is_alive():  # killed before it made its process group
                p.kill()
        for p in procs:
            p.join(timeout=5)
        results.close()
    return [outputs[r] for r in range(world_size)]
