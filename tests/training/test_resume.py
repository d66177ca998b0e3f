"""Kill -9 during training, rerun the same command: it resumes from the last complete
checkpoint and ends with exactly the metrics of an uninterrupted run. Also: the SFT
validation loss falls, and the final model is exported in HF format."""
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests import pyproc

STEPS, SAVE = 40, 10


def _cmd(out, sleep=0.0):
    return [sys.executable, "-W", "ignore", "-m", "tests.training.fit_driver", str(out), str(STEPS), str(SAVE), str(sleep)]


def _run(out, sleep=0.0):
    proc = pyproc.run(_cmd(out, sleep), cwd=Path(__file__).parents[2], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    whole, killed = base / "whole", base / "killed"
    _run(whole)
    # the same command, killed with SIGKILL once a checkpoint beyond the first exists
    proc = pyproc.start(_cmd(killed, 0.15), cwd=Path(__file__).parents[2])
    deadline = time.monotonic() + 240
    latest = killed / "checkpoints" / "latest"
    while time.monotonic() < deadline:
        if latest.exists() and json.loads(latest.read_text())["step"] >= 2 * SAVE:
            break
        time.sleep(0.05)
    time.sleep(0.4)  # into the steps after that checkpoint
    os.kill(proc.pid, signal.SIGKILL)  # the run's process only, not what it started
    proc.wait(timeout=30)
    killed_at = json.loads(latest.read_text())["step"]
    assert not (killed / "result.json").exists(), "the run finished before it was killed"
    left = _processes_in_group(proc.pid)
    proc.kill()  # whatever is left, so that it does not outlive the test
    _run(killed, 0.0)
    return whole, killed, killed_at, left


def _processes_in_group(pgid, wait=10.0):
    """Live processes of the process group the run led (the run started as a group leader,
    so what it started is in its group), once those that are ending have had ``wait``
    seconds to do so."""
    deadline = time.monotonic() + wait
    while True:
        found = []
        for proc in Path("/proc").iterdir():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append(f"{proc.name}: {cmd}")
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_a_killed_run_leaves_no_process_behind(runs):
    """The checkpoint writer's helper process dies with the run it serves."""
    assert runs[3] == []


def test_resumed_run_ends_with_the_same_metrics(runs):
    whole, killed, killed_at, _ = runs
    assert SAVE <= killed_at < STEPS
    a, b = _metrics(whole), _metrics(killed)
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm", "lr"):
            if key in ra:
                assert ra[key] == rb[key], (ra["step"], ra["split"], key)
    ra, rb = (json.loads((p / "result.json").read_text()) for p in (whole, killed))
    assert ra["val"] == rb["val"] and ra["train"]["loss"] == rb["train"]["loss"]


def test_no_partial_checkpoint_is_latest(runs):
    _, killed, _, _ = runs
    root = killed / "checkpoints"
    latest = json.loads((root / "latest").read_text())
    assert latest["step"] == STEPS and (root / latest["dir"] / "extra.json").is_file()
    assert not list(root.glob("*.tmp"))
    assert len([p for p in root.glob("step_*")]) == 2  # keep_last = 2


def test_validation_loss_falls_and_hf_export_loads(runs):
    import torch
    from transformers import AutoModelForCausalLM

    whole, _, _, _ = runs
    val = [r["loss"] for r in _metrics(whole) if r["split"] == "val"]
    assert val[-1] < val[0] - 0.5, val
    model = AutoModelForCausalLM.from_pretrained(str(whole / "hf"))
    assert sum(p.numel() for p in model.parameters()) > 0
    assert torch.isfinite(model(torch.tensor([[1, 5, 6, 2]])).logits).all()
