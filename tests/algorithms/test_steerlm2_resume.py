"""SIGKILL during a SteerLM 2.0 sampling run, in the middle of its second iteration; the same
command again resumes from the last complete checkpoint, reads that iteration's samples
back from the run folder (the file is not written again) and ends with exactly the
metrics of an uninterrupted run."""
import json
import sys

import pytest

from tests.kill_resume import metrics as _metrics, whole_killed_resumed

STEPS, STEPS_PER_ITERATION = 8, 4


def _cmd(assets, out, sleep=0.0):
    return [sys.executable, "-W", "ignore", "-m", "tests.algorithms.online_driver", "steerlm2", str(assets), str(out),
            str(STEPS), "1", str(sleep)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.algorithms.steerlm2_setup import make_assets

    base = tmp_path_factory.mktemp("steerlm2_resume")
    assets = base / "assets.json"
    assets.write_text(json.dumps(make_assets(base / "assets")))

    def _samples(killed):
        path = killed / "steerlm2_samples" / "iteration_1.jsonl"
        return path.stat().st_mtime_ns, path.read_bytes()

    whole, killed, killed_at, before = whole_killed_resumed(lambda out, sleep: _cmd(assets, out, sleep), base,
                                                            STEPS_PER_ITERATION + 1, slow=1.0, settle=0.0,
                                                            timeout=900, between=_samples)
    return whole, killed, killed_at, before, _samples(killed)


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
