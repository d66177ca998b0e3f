"""SIGKILL during a PPO run, the same command again: it resumes from the last complete
checkpoint (policy and critic weights and optimizer states, schedules, RNG, step; the
reference rebuilt from the initial policy) and ends with exactly the metrics of an
uninterrupted run. The final policy and critic export as HF models. The same with LoRA
(``ppo:lora``, a shorter run): policy adapters, and the critic a second adapter set on the
policy's base; its checkpoint holds adapters, the value head and their optimizer state
only, and the policy exports merged and as a PEFT folder."""
import json
import sys

import pytest

from tests.kill_resume import metrics as _metrics, whole_killed_resumed

SAVE = 2
STEPS = {"ppo": 6, "ppo:lora": 4}


def _cmd(variant, assets, out, sleep=0.0):
    return [sys.executable, "-W", "ignore", "-m", "tests.algorithms.online_driver", variant, str(assets), str(out),
            str(STEPS[variant]), str(SAVE), str(sleep)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tests.algorithms.ppo_setup import make_assets

    base = tmp_path_factory.mktemp("ppo_resume_assets")
    path = base / "assets.json"
    path.write_text(json.dumps(make_assets(base / "assets")))
    return path


@pytest.fixture(scope="module", params=["ppo", "ppo:lora"])
def runs(request, assets, tmp_path_factory):
    variant = request.param
    base = tmp_path_factory.mktemp("ppo_resume")
    whole, killed, killed_at, _ = whole_killed_resumed(lambda out, sleep: _cmd(variant, assets, out, sleep), base,
                                                       SAVE, slow=1.0, settle=1.5, timeout=600)
    return whole, killed, killed_at, variant


def test_resumed_run_ends_with_the_same_metrics(runs):
    whole, killed, killed_at, variant = runs
    steps = STEPS[variant]
    assert SAVE <= killed_at < steps
    a, b = _metrics(whole), _metrics(killed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b):
        for key in ra:
            if not key.startswith("time/") and key not in ("step_time", "timestamp", "wall_time"):
                assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])


def test_checkpoint_holds_both_roles_and_exports(runs):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    whole, killed, _, variant = runs
    root = killed / "checkpoints"
    latest = json.loads((root / "latest").read_text())
    assert latest["step"] == STEPS[variant] and not list(root.glob("*.tmp-*"))
    if variant == "ppo:lora":
        from megatron.core import dist_checkpointing

        keys = sorted(dist_checkpointing.load_tensors_metadata(str(root / latest["dir"])))
        model = [k for k in keys if not k.startswith("optimizer.")]
        assert {k.split(".")[0] for k in model} == {"policy", "critic"}
        assert all(".lora_" in k or k == "critic.head.weight" for k in model), model
        assert all(".lora_" in k or "head.weight" in k for k in keys), keys
        assert json.loads((root / latest["dir"] / "extra.json").read_text())["base_fingerprint"]
        assert (killed / "hf_peft" / "adapter_model.safetensors").is_file()
    policy = AutoModelForCausalLM.from_pretrained(str(killed / "hf"))
    critic = AutoModelForSequenceClassification.from_pretrained(str(killed / "hf_critic"))
    ids = torch.tensor([[4, 9, 12, 3]])
    assert critic(ids).logits.shape == (1, 1) and torch.isfinite(policy(ids).logits).all()
    ref_policy = AutoModelForCausalLM.from_pretrained(str(whole / "hf"))
    for (n, p), (_, q) in zip(policy.named_parameters(), ref_policy.named_parameters()):
        assert torch.equal(p, q), n
