"""SIGKILL during a PPO run, the same command again: it resumes from the last complete
checkpoint (policy and critic weights and optimizer states, schedules, RNG, step; the
reference rebuilt from the initial policy) and ends with exactly the metrics of an
uninterrupted run. The final policy and critic export as HF models."""
import json
import sys

import pytest

from tests.kill_resume import metrics as _metrics, whole_killed_resumed

STEPS, SAVE = 6, 2


def _cmd(assets, out, sleep=0.0):
    return [sys.executable, "-W", "ignore", "-m", "tests.algorithms.online_driver", "ppo", str(assets), str(out),
            str(STEPS), str(SAVE), str(sleep)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.algorithms.ppo_setup import make_assets

    base = tmp_path_factory.mktemp("ppo_resume")
    assets = base / "assets.json"
    assets.write_text(json.dumps(make_assets(base / "assets")))
    whole, killed, killed_at, _ = whole_killed_resumed(lambda out, sleep: _cmd(assets, out, sleep), base, SAVE,
                                                       slow=1.0, settle=1.5, timeout=600)
    return whole, killed, killed_at


def test_resumed_run_ends_with_the_same_metrics(runs):
    whole, killed, killed_at = runs
    assert SAVE <= killed_at < STEPS
    a, b = _metrics(whole), _metrics(killed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        for key in ra:
            if not key.startswith("time/") and key not in ("step_time", "timestamp", "wall_time"):
                assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])


def test_checkpoint_holds_both_roles_and_exports(runs):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    whole, killed, _ = runs
    root = killed / "checkpoints"
    latest = json.loads((root / "latest").read_text())
    assert latest["step"] == STEPS and not list(root.glob("*.tmp-*"))
    policy = AutoModelForCausalLM.from_pretrained(str(killed / "hf"))
    critic = AutoModelForSequenceClassification.from_pretrained(str(killed / "hf_critic"))
    ids = torch.tensor([[4, 9, 12, 3]])
    assert critic(ids).logits.shape == (1, 1) and torch.isfinite(policy(ids).logits).all()
    ref_policy = AutoModelForCausalLM.from_pretrained(str(whole / "hf"))
    for (n, p), (_, q) in zip(policy.named_parameters(), ref_policy.named_parameters()):
        assert torch.equal(p, q), n
