"""Kill-and-resume runs for the tests: a command run whole, the same command killed with
SIGKILL once its checkpoint of a given step is complete, and the same command once more
(which must resume from that checkpoint)."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Callable, List, Optional

from tests import pyproc

ROOT = Path(__file__).parents[1]


def metrics(out) -> List[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def run(cmd: List[str], timeout: float = 600) -> None:
    """Run ``cmd`` in the repository root; a failure shows the end of its stderr."""
    proc = pyproc.run(cmd, cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


def kill_after_checkpoint(cmd: List[str], out, step: int, settle: float = 0.0, timeout: float = 500) -> int:
    """Start ``cmd`` (a run writing to ``out``), SIGKILL it ``settle`` seconds after its
    checkpoint of step >= ``step`` is marked latest, and return the step of the latest
    checkpoint. Fails if the run ends on its own first."""
    proc = pyproc.start(cmd, cwd=ROOT)
    latest = Path(out) / "checkpoints" / "latest"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.exists() and json.loads(latest.read_text())["step"] >= step:
            break
        time.sleep(0.05)
    time.sleep(settle)  # into the steps after that checkpoint
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.kill()  # anything the run started that outlived it
    assert not (Path(out) / "result.json").exists(), "the run finished before it was killed"
    return json.loads(latest.read_text())["step"]


def whole_killed_resumed(cmd: Callable[[Path, float], List[str]], base, step: int, slow: float, settle: float = 0.0,
                         timeout: float = 600, between: Optional[Callable[[Path], object]] = None):
    """``cmd(out, sleep)`` run whole into ``base/whole``; killed after its checkpoint of
    ``step`` (run with ``sleep = slow``) and run again into ``base/killed``. Returns
    ``(whole, killed, killed_at, seen)``, ``seen`` being what ``between(killed)`` returned
    after the kill, before the second run (None without ``between``)."""
    whole, killed = Path(base) / "whole", Path(base) / "killed"
    run(cmd(whole, 0.0), timeout)
    killed_at = kill_after_checkpoint(cmd(killed, slow), killed, step, settle, timeout)
    seen = between(killed) if between else None
    run(cmd(killed, 0.0), timeout)
    return whole, killed, killed_at, seen


def assert_same_metrics(whole, killed, steps: int) -> List[dict]:
    """The killed-and-resumed run logged exactly the whole run's metrics at steps 1..``steps``
    (timings aside); the whole run's metrics."""
    a, b = metrics(whole), metrics(killed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b):
        for key in ra:
            if not key.startswith("time/") and key not in ("step_time", "timestamp", "wall_time"):
                assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    return a
