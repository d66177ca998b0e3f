"""``python`` command lines for the tests, started from the fork server that already holds
torch and megatron-core (:func:`aligner.parallel.spawn.start_python`): each command runs
as under a fresh interpreter (its own process, ``__main__``, arguments, environment,
working directory, exit status) without paying the interpreter's start and imports, about
7 s of CPU per command here. Commands take the ``subprocess`` form ``[sys.executable,
...]``. The installed console script and a fresh interpreter keep their own tests
(test_cli.py, test_packaging.py, test_runtime.py, launch/)."""
from __future__ import annotations

import subprocess
import sys
from typing import List, Optional

from aligner.parallel.spawn import PythonProcess, run_python, start_python


def _argv(cmd: List[str]) -> List[str]:
    if not cmd or cmd[0] != sys.executable:
        raise ValueError(f"expected [sys.executable, ...], got {cmd!r}")
    return [str(c) for c in cmd[1:]]


def run(cmd: List[str], *, cwd=None, env=None, timeout: Optional[float] = None,
        check: bool = False) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, ...)``, from the fork server."""
    out = run_python(_argv(cmd), cwd=cwd, env=env, timeout=timeout)
    out.args = list(cmd)
    if check and out.returncode != 0:
        raise subprocess.CalledProcessError(out.returncode, cmd, out.stdout, out.stderr)
    return out


def start(cmd: List[str], *, cwd=None, env=None, stdout=None, stderr=None) -> PythonProcess:
    """``subprocess.Popen(cmd, ...)``, from the fork server; ``stdout`` / ``stderr`` name
    files the command's output is appended to (default: discarded)."""
    return start_python(_argv(cmd), cwd=cwd, env=env, stdout=stdout, stderr=stderr)
