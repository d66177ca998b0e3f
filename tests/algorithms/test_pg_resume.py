"""SIGKILL during an RLOO run, the same command again: it resumes from the last complete
checkpoint (policy weights and optimizer state, schedule, RNG, step; the reference rebuilt
from the initial policy; the step's prompts and sampling seeds functions of the step) and
ends with exactly the metrics and weights of an uninterrupted run. Likewise GRPO with
GSPO's sequence-level ratio (2 epochs x 2 mini-batches: the second update is off-policy)."""
import json
import sys

import pytest

from tests.kill_resume import metrics as _metrics, whole_killed_resumed

STEPS, SAVE = 6, 2


def _cmd(algorithm, assets, out, sleep=0.0):
    return [sys.executable, "-W", "ignore", "-m", "tests.algorithms.online_driver", algorithm, str(assets), str(out),
            str(STEPS), str(SAVE), str(sleep)]


@pytest.fixture(scope="module", params=["pg", "pg:gspo"], ids=["rloo", "gspo"])
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
    assert a[-1]["kl_ref"] != 0.0 and "kl_penalty" in a[-1]
    for ra, rb in zip(a, b):
        for key in ra:
            if not key.startswith("time/") and key not in ("step_time", "timestamp", "wall_time"):
                assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    resumed = AutoModelForCausalLM.from_pretrained(str(killed / "hf"))
    reference = AutoModelForCausalLM.from_pretrained(str(whole / "hf"))
    for (n, p), (_, q) in zip(resumed.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q), n
