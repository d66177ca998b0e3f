"""SIGKILL during a SteerLM 2.0 sampling run, in the middle of its second iteration; the same
command again resumes from the last complete checkpoint, reads that iteration's samples
back from the run folder (the file is not written again) and ends with exactly the
metrics of an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

STEPS, STEPS_PER_ITERATION = 8, 4
ROOT = Path(__file__).parents[2]


def _cmd(assets, out, sleep=0.0):
    return [sys.executable, "-W", "ignore", "-m", "tests.algorithms.steerlm2_driver", str(assets), str(out), "1",
            str(sleep)]


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.algorithms.steerlm2_setup import make_assets

    base = tmp_path_factory.mktemp("steerlm2_resume")
    assets = base / "assets.json"
    assets.write_text(json.dumps(make_assets(base / "assets")))
    whole, killed = base / "whole", base / "killed"
    subprocess.run(_cmd(assets, whole), check=True, cwd=ROOT, timeout=900, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)
    proc = subprocess.Popen(_cmd(assets, killed, 1.0), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 800
    target = STEPS_PER_ITERATION + 1  # one step into the second iteration
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.exists() and json.loads(latest.read_text())["step"] >= target:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = json.loads(latest.read_text())["step"]
    assert not (killed / "result.json").exists(), "the run finished before it was killed"
    samples = killed / "steerlm2_samples" / "iteration_1.jsonl"
    before = (samples.stat().st_mtime_ns, samples.read_bytes())
    subprocess.run(_cmd(assets, killed), check=True, cwd=ROOT, timeout=900, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)
    after = (samples.stat().st_mtime_ns, samples.read_bytes())
    return whole, killed, killed_at, before, after


def test_resumed_mid_iteration_ends_with_the_same_metrics(runs):
    whole, killed, killed_at, before, after = runs
    assert STEPS_PER_ITERATION < killed_at < STEPS, killed_at  # inside the second iteration
    assert before == after, "the resumed run must read the iteration's samples, not sample again"
    a, b = _metrics(whole), _metrics(killed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert [r["iteration"] for r in a] == [0.0] * 4 + [1.0] * 4
    for ra, rb in zip(a, b):
        for key in ra:
            if not key.startswith("time/") and key not in ("step_time", "timestamp", "wall_time"):
                assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    for k in (0, 1):
        name = f"steerlm2_samples/iteration_{k}.jsonl"
        assert (whole / name).read_bytes() == (killed / name).read_bytes(), name
