"""SIGKILL during an RLOO run (one update per rollout: the old log-probs come from the
update's own forward, docs/online_core.md), the same command again: it resumes from the last complete
checkpoint (policy weights and optimizer state, schedule, RNG, step; the reference rebuilt
from the initial policy; the step's prompts and sampling seeds functions of the step) and
ends with exactly the metrics and weights of an uninterrupted run, and the same rollout
logs (every second step, a step's rows once, in the files and in TensorBoard's text tab).
Likewise GRPO with GSPO's sequence-level ratio and with CISPO's clipped importance-sampling
weights (2 epochs x 2 mini-batches: the second update is off-policy, where the two differ
from the reinforce loss), and GRPO on a tiny Qwen3-MoE policy with the router's auxiliary
losses and routing replay (its ``moe/`` metrics and log-prob mismatch included)."""
import json
import sys

import pytest

from tests.kill_resume import metrics as _metrics, whole_killed_resumed

STEPS, SAVE = 6, 2


def _cmd(algorithm, assets, out, sleep=0.0):
    return [sys.executable, "-W", "ignore", "-m", "tests.algorithms.online_driver", algorithm, str(assets), str(out),
            str(STEPS), str(SAVE), str(sleep)]


@pytest.fixture(scope="module", params=["pg", "pg:gspo", "pg:cispo", "grpo_moe"],
                ids=["rloo", "gspo", "cispo", "grpo_moe"])
def runs(request, tmp_path_factory):
    from tests.algorithms.ppo_setup import make_assets

    base = tmp_path_factory.mktemp("pg_resume")
    assets = base / "assets.json"
    assets.write_text(json.dumps(make_assets(base / "assets")))
    whole, killed, killed_at, _ = whole_killed_resumed(lambda out, sleep: _cmd(request.param, assets, out, sleep),
                                                       base, SAVE, slow=1.0, settle=1.5, timeout=600)
    return whole, killed, killed_at


def test_resumed_run_ends_with_the_same_metrics_and_weights(runs):
    import torch
    from transformers import AutoModelForCausalLM

    whole, killed, killed_at = runs
    assert SAVE <= killed_at < STEPS
    a, b = _metrics(whole), _metrics(killed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert a[-1]["kl_ref"] != 0.0
    if "loss/kl" in a[-1]:  # RLOO, KL as a loss term: the old log-probs are the update's own (no pass before it)
        assert a[-1]["loss/kl"] > 0  # step 1 updates the initial policy: its KL to the reference is 0
        assert all(r["policy/ratio"] == 1.0 and r["policy/approx_kl"] == 0.0 for r in a + b)
    else:  # KL in the reward
        assert "kl_penalty" in a[-1]
    if "moe/load_balancing_loss" in a[-1]:  # the MoE policy: replayed routing, float rounding only
        assert all(r["logprob_mismatch"] < 1e-6 and r["moe/z_loss"] > 0 for r in a + b)
    for ra, rb in zip(a, b):
        for key in ra:
            if not key.startswith("time/") and key not in ("step_time", "timestamp", "wall_time"):
                assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    resumed = AutoModelForCausalLM.from_pretrained(str(killed / "hf"))
    reference = AutoModelForCausalLM.from_pretrained(str(whole / "hf"))
    for (n, p), (_, q) in zip(resumed.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q), n


def test_rollout_logs_read_back_the_same_after_kill_and_resume(runs, capsys):
    from aligner.cli.rollouts import main as rollouts_main
    from aligner.training.rollout_log import logged_steps, read_rollouts

    whole, killed, _ = runs
    assert logged_steps(whole) == logged_steps(killed) == [2, 4, 6]
    by_step = {r["step"]: r for r in _metrics(whole)}
    for step in (2, 4, 6):
        rows = read_rollouts(killed, step)
        assert rows == read_rollouts(whole, step)
        # all 16 rows of the step, each once: sample (step - 1)·P·G + i
        assert [r["sample_index"] for r in rows] == [16 * (step - 1) + i for i in range(16)]
        m = by_step[step]
        assert abs(sum(r["reward"] for r in rows) / 16 - m["reward/mean"]) < 1e-9
        assert abs(sum(r["length"] for r in rows) / 16 - m["response_length/mean"]) < 1e-9
        assert abs(sum(r["eos"] for r in rows) / 16 - m["eos_rate"]) < 1e-9
        for r in rows:
            assert r["length"] <= 8 and isinstance(r["response"], str) and r["prompt"]
            assert r["logprob"] < 0 and r["ref_logprob"] < 0
        # RLOO: a group's advantages sum to 0
        for g in range(4):
            assert abs(sum(r["advantage"] for r in rows[4 * g:4 * g + 4])) < 1e-5
    assert rollouts_main(["show", str(killed), "--step", "4"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("step 4: 16 rollouts") and shown.count("\n| ") == 18  # header, rule, 16 rows
    assert rollouts_main(["show", str(killed), "--step", "3"]) == 2
    assert "no rollout log for step 3; logged steps: 2, 4, 6" in capsys.readouterr().err


def test_rollout_tables_in_tensorboard_after_kill_and_resume(runs):
    """The rollout log's rows as a TensorBoard text table at every logged step, each step
    once after the resume (the events after the checkpoint purged), read back with
    TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from aligner.training.rollout_log import read_rollouts

    whole, killed, _ = runs
    for run in (whole, killed):
        events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
        events.Reload()
        tables = events.Tensors("train/rollouts/text_summary")
        assert [t.step for t in tables] == [2, 4, 6]
        for t in tables:
            text = t.tensor_proto.string_val[0].decode()
            lines = text.splitlines()
            assert lines[0].startswith("| sample_index | prompt | response | reward | advantage | length | eos |")
            rows = read_rollouts(whole, t.step)
            assert len(lines) == 2 + len(rows) == 18
            for line, row in zip(lines[2:], rows):
                cells = [c.strip() for c in line.strip("|").split(" | ")]
                assert int(cells[0]) == row["sample_index"] and cells[2] == " ".join(row["response"].split())
                assert abs(float(cells[3]) - row["reward"]) <= 1e-3 * max(1.0, abs(row["reward"]))
                assert int(cells[5]) == row["length"] and cells[6] == str(row["eos"])
