"""SIGKILL during SPIN (inside its second iteration) and during on-policy distillation (GKD,
after a checkpoint, its other steps on the teacher's own responses); the same command again
resumes from the last complete checkpoint — SPIN reading the iteration's generations, GKD
the teacher's responses back from the run folder (the files are not written again) — and
ends with exactly the metrics of an uninterrupted run."""
import json
import sys

import pytest

from tests.algorithms.conftest import COMPLETION_ROWS, write_jsonl
from tests.kill_resume import assert_same_metrics, whole_killed_resumed

STEPS = 4  # SPIN: 2 iterations x 2 steps; GKD: 4 steps of global batch 2


def _cmd(algorithm, assets, out, sleep=0.0):
    return [sys.executable, "-W", "ignore", "-m", "tests.algorithms.online_driver", algorithm, str(assets), str(out),
            str(STEPS), "1", str(sleep)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_hf, teacher_hf):
    base = tmp_path_factory.mktemp("spin_gkd_resume")
    path = base / "assets.json"
    path.write_text(json.dumps({"student": str(tiny_hf["dir"]), "teacher": teacher_hf,
                                "train": write_jsonl(base / "rows.jsonl", COMPLETION_ROWS)}))
    return base, path


def test_spin_resumed_mid_iteration_ends_with_the_same_metrics(assets):
    base, path = assets

    def samples(killed):
        file = killed / "spin_samples" / "iteration_1.jsonl"
        return file.stat().st_mtime_ns, file.read_bytes()

    whole, killed, killed_at, before = whole_killed_resumed(lambda out, sleep: _cmd("spin", path, out, sleep),
                                                            base / "spin", 3, slow=1.0, timeout=600, between=samples)
    assert killed_at == 3, killed_at  # inside the second iteration (steps 3 and 4)
    assert before == samples(killed), "the resumed run must read the iteration's generations, not sample again"
    a = assert_same_metrics(whole, killed, STEPS)
    assert [r["iteration"] for r in a] == [0.0, 0.0, 1.0, 1.0]
    for k in (0, 1):
        name = f"spin_samples/iteration_{k}.jsonl"
        assert (whole / name).read_bytes() == (killed / name).read_bytes(), name


def test_gkd_resumed_ends_with_the_same_metrics(assets):
    base, path = assets

    def responses(killed):
        file = killed / "teacher_responses.jsonl"
        return file.stat().st_mtime_ns, file.read_bytes()

    whole, killed, killed_at, before = whole_killed_resumed(lambda out, sleep: _cmd("gkd", path, out, sleep),
                                                            base / "gkd", 2, slow=1.0, timeout=600, between=responses)
    assert 2 <= killed_at < STEPS, killed_at
    assert before == responses(killed), "the resumed run must read the teacher's responses, not generate them again"
    assert (whole / "teacher_responses.jsonl").read_bytes() == before[1]
    a = assert_same_metrics(whole, killed, STEPS)
    assert {r["on_policy"] for r in a} == {0.0, 1.0}, "the run must mix on- and off-policy steps"
    assert all(r["teacher/response_tokens"] > 0 for r in a)
