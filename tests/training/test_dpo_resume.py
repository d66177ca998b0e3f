"""DPO killed with SIGKILL and run again resumes against the same reference (the initial
policy) and logs, step for step, what the uninterrupted run logs (1e-6), at DP=2; the
reference-free ORPO and SimPO (no reference table to recompute) likewise at DP=1, and KTO
(its reference table and every step's mismatched reference log-probs recomputed, the
reference point of the steps after the resume) at DP=1.
The run crosses epochs (26 pairs, global batch 8), so reshuffled pairs and epoch 0's unused
tail are trained after the resume too. (The resident reference after a resume:
tests/training/test_dpo_reference.py.)"""
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests import pyproc

STEPS, SAVE = 8, 3
ROOT = Path(__file__).parents[2]
TIMING = ("step_time", "tokens_per_s")


def _start(out, ranks, reference, sleep, stderr=None):
    from aligner.parallel.state import free_port

    cmd = [sys.executable, "-W", "ignore", "-m", "tests.training.fit_driver", str(out), str(STEPS), str(SAVE),
           str(sleep), reference if reference.startswith("kto:") else f"dpo:{reference}"]
    port = str(free_port())
    procs = []
    for rank in range(ranks):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(pyproc.start(cmd, cwd=ROOT, env=env, stderr=stderr and f"{stderr}.{rank}"))
    return procs


def _wait(procs, stderr, timeout=400):
    for rank, p in enumerate(procs):
        p.wait(timeout=timeout)
        assert p.returncode == 0, Path(f"{stderr}.{rank}").read_text(errors="replace")[-3000:]


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _whole_and_killed(base, ranks, reference):
    whole, killed = base / "whole", base / "killed"
    _wait(_start(whole, ranks, reference, 0.0, base / "whole.err"), base / "whole.err")
    procs = _start(killed, ranks, reference, 0.1)
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not latest.exists():
        assert all(p.poll() is None for p in procs), "the run ended before its first checkpoint"
        time.sleep(0.05)
    time.sleep(0.3)  # into the steps after that checkpoint
    for p in procs:  # every rank at once, as a lost node
        os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait(timeout=30)
        p.kill()  # anything a rank started that outlived it
    killed_at = json.loads(latest.read_text())["step"]
    assert not (killed / "result.json").exists(), "the run finished before it was killed"
    _wait(_start(killed, ranks, reference, 0.0, base / "resumed.err"), base / "resumed.err")
    return whole, killed, killed_at


# DPO's precomputed reference at DP=1 is covered by DP=2 (the same resume, plus the table's reduction)
@pytest.mark.parametrize("ranks,reference", [(2, "precompute"), (1, "precompute:orpo"), (1, "precompute:simpo"),
                                             (1, "kto:precompute")], ids=["dp2", "orpo_tp1", "simpo_tp1", "kto_tp1"])
def test_dpo_resumed_after_sigkill_logs_what_the_whole_run_logs(tmp_path, ranks, reference):
    whole, killed, killed_at = _whole_and_killed(tmp_path, ranks, reference)
    assert SAVE <= killed_at < STEPS
    a, b = _metrics(whole), _metrics(killed)
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    assert [r["step"] for r in a if r["split"] == "train"] == list(range(1, STEPS + 1))
    resumed = [(ra, rb) for ra, rb in zip(a, b) if ra["step"] > killed_at]
    assert resumed
    for ra, rb in zip(a, b):
        keys = set(ra) - set(TIMING)
        assert keys == set(rb) - set(TIMING), (ra["step"], ra["split"])
        for key in sorted(keys - {"step", "split"}):
            assert abs(ra[key] - rb[key]) <= 1e-6, (ra["step"], ra["split"], key, ra[key], rb[key])
    # the run learns: the implicit reward margin grows (DPO, KTO: away from exactly 0 at step 1)
    train = [r for r in a if r["split"] == "train"]
    margins = [r["rewards/chosen"] - r["rewards/rejected"] for r in train]
    if reference in ("precompute", "kto:precompute"):
        assert margins[0] == 0.0
    assert margins[-1] > margins[0] + 0.05
    if reference.startswith("kto:"):  # the reference point is live after the resume
        assert any(r["kl"] > 0 for r in train if r["step"] > killed_at), [r["kl"] for r in train]
    ra, rb = (json.loads((p / "result.json").read_text()) for p in (whole, killed))
    assert ra["val"] == rb["val"]


def test_a_finished_kto_run_is_extended_and_a_changed_reference_is_one_user_error(tmp_path):
    """trainer.max_steps may grow on a resume: KTO's precomputed reference then covers the new
    steps' mismatched rows, and the checkpoint's are compared over the steps both runs have;
    other initial weights are still refused, as a user error (one line on the command line)."""
    from aligner.algorithms.kto import KTOAlgorithm
    from aligner.runtime import UserError

    run = tmp_path / "kto"
    cmd = [sys.executable, "-W", "ignore", "-m", "tests.training.fit_driver", str(run), "STEPS", "2", "0",
           "kto:precompute"]
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1")
    for steps in (4, 6):
        from aligner.parallel.state import free_port

        env["MASTER_PORT"] = str(free_port())
        p = pyproc.start([str(steps) if a == "STEPS" else a for a in cmd], cwd=ROOT, env=env,
                         stderr=tmp_path / f"run{steps}.err")
        p.wait(timeout=400)
        err = (tmp_path / f"run{steps}.err").read_text(errors="replace")
        assert p.returncode == 0, err[-3000:]
        assert (f"[kto] reference: the log-probs of 26 training and 6 validation samples and the mismatched"
                f" rows of {steps} steps, from the initial weights") in err, err[-3000:]
        assert "[kto] reference: done in" in err
    assert "resumed from step 4" in err
    train = [r for r in _metrics(run) if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    state = json.loads((run / "checkpoints" / "step_0000006" / "extra.json").read_text())["algorithm"]
    table = state["reference_table"]["training"]
    per_step = table["abs_kl_logps_per_step"]
    assert len(per_step) == 6 and abs(sum(per_step) - table["abs_kl_logps"]) < 1e-6 * table["abs_kl_logps"]

    def resumed_with(steps, scale=1.0):
        algo = KTOAlgorithm(0)
        mine = dict(table, abs_kl_logps_per_step=[v * scale for v in per_step[:steps]])
        algo._summary = {"training": mine}  # what setup() computed in the new process
        algo.load_state_dict(json.loads(json.dumps(state)))

    resumed_with(6)
    resumed_with(3)  # shortened: compared over its 3 steps
    resumed_with(6, scale=1 + 1e-5)  # layout round-off
    with pytest.raises(UserError, match=r"abs_kl_logps of step 1 .* initial weights"):
        resumed_with(3, scale=1.01)
    # a checkpoint written without the per-step sums: compared whole, the run length named as a cause
    old = json.loads(json.dumps(state))
    del old["reference_table"]["training"]["abs_kl_logps_per_step"]
    algo = KTOAlgorithm(0)
    algo._summary = {"training": dict(table, abs_kl_logps=sum(per_step[:4]), abs_kl_logps_per_step=per_step[:4])}
    with pytest.raises(UserError, match=r"or trainer.max_steps did \(a checkpoint without"):
        algo.load_state_dict(old)
