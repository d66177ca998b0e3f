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

``start_python(argv)`` / ``run_python(argv)`` run a ``python`` command line (a script,
``-m module`` or ``-c code``) the same way: in its own process, forked from that server,
as a fresh interpreter would run it — for commands started many times over (the tests'
command-line, kill-and-resume and quickstart runs).
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

from aligner.parallel.state import destroy, free_port

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


def _enter(environ, cwd):
    """First steps of a process forked from the server: it leads its own process group, so
    that whatever it starts (a checkpoint writer's manager, a subprocess) is killed with it
    instead of outliving it, and takes the caller's environment and folder at the call (not
    the fork server's)."""
    os.setpgid(0, 0)
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)


def _worker(rank, world_size, port, fn, args, kwargs, results, threads, environ, cwd):
    _enter(environ, cwd)
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
            destroy()
        except Exception:
            pass


def _kill_group(pid: int) -> None:
    """SIGKILL the process group a rank leads (the rank and anything it started)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _threads_per_rank(world_size: int) -> int:
    """The machine's cores shared out over the ranks, and no more than ``OMP_NUM_THREADS``
    where that is set: oversubscribed cores cost far more than idle ones (OpenMP threads
    spin while they wait for each other)."""
    threads = max(1, (os.cpu_count() or 1) // world_size)
    limit = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, min(threads, int(limit))) if limit.isdigit() else threads


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
    threads = threads_per_rank or _threads_per_rank(world_size)
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


# ------------------------------------------------------------------------------ python commands
def _split_options(argv):
    """``(warning actions, unbuffered, the rest)`` of a python command line's leading
    ``-W ACTION`` / ``-u`` options."""
    warn, unbuffered, rest = [], False, list(argv)
    while rest[:1] == ["-u"] or (rest[:1] == ["-W"] and len(rest) > 1):
        if rest[0] == "-u":
            unbuffered, rest = True, rest[1:]
        else:
            warn, rest = warn + [rest[1]], rest[2:]
    return warn, unbuffered, rest


def _run_python(argv, environ, cwd, stdout_path, stderr_path):
    """Body of a process started by :func:`start_python`: what ``python ARGV`` would do in
    ``cwd`` with ``environ``, on the fork server's already imported modules."""
    import atexit
    import io
    import runpy
    import sys
    import warnings

    _enter(environ, cwd)
    warn, unbuffered, argv = _split_options(argv)
    unbuffered = unbuffered or bool(environ.get("PYTHONUNBUFFERED"))
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        target = os.open(path or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(target, fd)
        os.close(target)
    # fresh text streams on the redirected descriptors (the fork server's buffers stay behind)
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                                   write_through=unbuffered)
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                                   errors="backslashreplace", write_through=True)
    sys.warnoptions.extend(warn)
    warnings._processoptions(warn)
    if "OMP_NUM_THREADS" in environ:
        import torch

        torch.set_num_threads(int(environ["OMP_NUM_THREADS"]))
    code = 0
    try:
        if argv[0] == "-c":
            import types

            sys.argv = ["-c"] + argv[2:]
            sys.path.insert(0, "")
            main = sys.modules["__main__"] = types.ModuleType("__main__")
            exec(compile(argv[1], "<string>", "exec"), main.__dict__)
        elif argv[0] == "-m":
            sys.argv = [argv[1]] + argv[2:]  # runpy puts the module's path in argv[0]
            sys.path.insert(0, cwd)
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            script = os.path.abspath(argv[0])
            sys.argv = list(argv)
            sys.path.insert(0, os.path.dirname(script))
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()  # a process started by multiprocessing ends without them
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


class PythonProcess:
    """A ``python ARGV`` command started by :func:`start_python`; the part of
    :class:`subprocess.Popen` tests and scripts use (``pid``, ``poll``, ``wait``, ``kill``,
    ``returncode``: negative for a signal, as for ``Popen``)."""

    def __init__(self, process):
        self._process = process
        self.pid = process.pid

    @property
    def returncode(self):
        return self._process.exitcode

    def poll(self):
        return self._process.exitcode

    def wait(self, timeout=None):
        self._process.join(timeout)
        if self._process.exitcode is None:
            import subprocess

            raise subprocess.TimeoutExpired(f"python (pid {self.pid})", timeout)
        return self._process.exitcode

    def kill(self):
        _kill_group(self.pid)


def start_python(argv, *, cwd=None, env=None, stdout=None, stderr=None) -> PythonProcess:
    """Start ``python ARGV`` (``["-m", module, args...]``, ``["-c", code, args...]`` or
    ``[script, args...]``, after any ``-W ACTION`` / ``-u`` options) as a
    process forked from the fork server (torch and megatron-core already imported), in
    ``cwd`` with ``env`` (default: this process's); its standard output and error are
    appended to the files ``stdout`` / ``stderr`` (default: discarded). The command runs as
    under ``python`` (``__main__``, ``sys.argv``, ``sys.path[0]``, exit status, atexit
    handlers) but without an interpreter start and imports of its own: about 7 s of CPU
    less per command on a CPU machine. It leads its own process group; ``kill()`` ends the
    group."""
    argv = list(argv)
    rest = _split_options(argv)[2]
    option = rest[0] if rest and rest[0].startswith("-") else None
    if not rest or option not in (None, "-m", "-c") or (option and len(rest) < 2):
        raise ValueError(f"start_python: expected [-W ACTION | -u ...] then ['-m', module, ...], ['-c', code, ...]"
                         f" or [script, ...]; got {argv!r}")
    ctx = _context()
    process = ctx.Process(target=_run_python, daemon=False,
                          args=(argv, dict(os.environ if env is None else env), os.path.abspath(cwd or os.getcwd()),
                                None if stdout is None else os.fspath(stdout),
                                None if stderr is None else os.fspath(stderr)))
    process.start()
    return PythonProcess(process)


def run_python(argv, *, cwd=None, env=None, timeout=None):
    """:func:`start_python` to the end: a :class:`subprocess.CompletedProcess` with the
    command's exit status and its standard output and error as text. A command still
    running after ``timeout`` seconds is killed (with its process group) and
    :class:`subprocess.TimeoutExpired` raised."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="aligner-python-") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = start_python(argv, cwd=cwd, env=env, stdout=out, stderr=err)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise
        finally:
            _kill_group(proc.pid)  # whatever the command left running in its group
        texts = []
        for path in (out, err):
            with open(path, encoding="utf-8", errors="replace") if os.path.exists(path) else open(os.devnull) as f:
                texts.append(f.read())
        return subprocess.CompletedProcess(["python", *argv], proc.returncode, *texts)
