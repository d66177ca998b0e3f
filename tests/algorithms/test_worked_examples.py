"""The worked examples of docs/architecture.md ("How to add ..."), run as written: a
preference loss, an advantage estimator and a reward kind with their hand-computed
values and the config checks that accept them, and an algorithm module dropped into a
copy of the package, found by ``aligner train <name>`` and trained for a step from a
tiny Hugging Face model, its loss checked against transformers."""
import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def example(name: str) -> str:
    """The python block after ``<!-- worked example: name -->`` in the architecture page."""
    found = re.search(rf"<!-- worked example: {re.escape(name)} -->\n```python\n(.*?)```", DOC.read_text(), re.S)
    assert found, f"no worked example {name!r} in {DOC}"
    return found.group(1)


@contextmanager
def example_registered(name: str, registry: dict, key: str):
    """Run the example ``name``; what it registered (``registry[key]``) is removed afterwards,
    so the registries stay as the other tests know them. Yields the example's namespace."""
    namespace = {"__name__": f"worked_example_{key}"}
    try:
        exec(compile(example(name), f"{DOC}: {name}", "exec"), namespace)
        yield namespace
    finally:
        registry.pop(key, None)


def test_a_preference_loss_is_one_decorated_function():
    from aligner.algorithms.losses.preference import PREFERENCE_LOSSES

    with example_registered("preference loss", PREFERENCE_LOSSES, "hinge"):
        assert "hinge" in PREFERENCE_LOSSES


def test_an_advantage_estimator_is_one_decorated_function():
    from aligner.algorithms.losses.advantages import ADVANTAGE_ESTIMATORS

    with example_registered("advantage estimator", ADVANTAGE_ESTIMATORS, "max_baseline"):
        assert ADVANTAGE_ESTIMATORS["max_baseline"].needs_group


def test_a_reward_kind_is_one_decorated_function():
    from aligner.rewards.kinds import REWARD_KINDS

    with example_registered("reward kind", REWARD_KINDS, "length"):
        assert REWARD_KINDS["length"].requires == {}


def test_an_algorithm_is_one_module(tiny_hf, tmp_path):
    from transformers import AutoModelForCausalLM

    from aligner.data import load_dataset, load_tokenizer

    rows = [{"conversations": [{"from": "User", "value": "what is the sum of two and three"},
                               {"from": "Assistant", "value": "five"}]},
            {"conversations": [{"from": "User", "value": "tell me a story"},
                               {"from": "Assistant", "value": "once upon a time there was a cat"}]}]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # a copy of the package with the example as aligner/algorithms/sequence_sft.py and no other
    # change, run from a fresh interpreter (the fork server of the other runs holds the package)
    src = tmp_path / "src"
    shutil.copytree(DOC.parents[1] / "aligner", src / "aligner", ignore=shutil.ignore_patterns("__pycache__"))
    (src / "aligner" / "algorithms" / "sequence_sft.py").write_text(example("algorithm"))
    run = tmp_path / "run"
    assert not (DOC.parents[1] / "aligner" / "algorithms" / "sequence_sft.py").exists()
    env = {**os.environ, "PYTHONPATH": str(src), "ALIGNER_CONF_DIR": str(DOC.parents[1] / "conf"),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "aligner.cli.main", "train", "sequence_sft", f"init.hf={tiny_hf['dir']}",
         f"data.train={data}", "data.max_length=64", "trainer.max_steps=1", "trainer.global_batch_size=2",
         "trainer.micro_batch_size=1", f"trainer.out_dir={run}", "trainer.export_hf=false", "trainer.progress=false",
         "trainer.tensorboard=false"], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "algorithm: sequence_sft" in (run / "config.yaml").read_text().splitlines()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in metrics if row["split"] == "train"][-1]["loss"]
    # the same samples through transformers: the mean over responses of each one's mean NLL
    samples = load_dataset(str(data), kind="sft", tokenizer=load_tokenizer(str(tiny_hf["dir"])), max_length=64)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_hf["dir"]), torch_dtype=torch.float32).eval()
    per_response = []
    with torch.no_grad():
        for s in samples:
            logp = torch.log_softmax(model(s["tokens"][None]).logits[0, :-1].double(), -1)
            token_lp = logp.gather(-1, s["tokens"][1:, None])[:, 0]
            mask = s["loss_mask"][1:].double()
            per_response.append(float(-(token_lp * mask).sum() / mask.sum()))
    assert logged == pytest.approx(sum(per_response) / len(per_response), abs=1e-5)
