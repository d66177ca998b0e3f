"""Reward sources refuse what they cannot score before any model is built: a folder
without a trained reward head (a causal LM), output names other than those its export
records, a reward function that does not resolve, the world's scorer on prompts that are
not the world's. A reward function that fails while training is one line, no traceback.
The exact-answer rule reads decimals, negative numbers and answers ending a sentence."""
import inspect
import json
import shutil
import sys

import pytest
import torch

from tests import pyproc
from tests.algorithms.ppo_setup import make_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("reward_assets")
    found = make_assets(base)
    # the 3-output reward model of the assets, its outputs named as an export names them
    named = base / "rm_named"
    shutil.copytree(found["rm"], named)
    config = json.loads((named / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b", "2": "c"}
    config["label2id"] = {"a": 0, "b": 1, "c": 2}
    (named / "config.json").write_text(json.dumps(config))
    return dict(found, rm_named=str(named))


@pytest.fixture
def one_process():
    from aligner.parallel import ParallelConfig, destroy, initialize

    initialize(ParallelConfig(seed=1))
    yield
    destroy()


def raising(prompts, responses, metadata):
    return {}["missing"]


def not_a_function(prompts):
    return []


CONSTANT = 3


# ---------------------------------------------------------------------------- 1: a reward head
def test_a_causal_lm_is_refused_wherever_a_reward_model_is_read(assets, tmp_path, capsys):
    from aligner.cli.main import main
    from aligner.rewards import ScoringError, build_reward, check_reward_source, reward_model_outputs

    policy = assets["policy"]
    head = f"{policy}: not a reward model: its checkpoint has no reward head ('score.weight'); config.json" \
           " describes a LlamaForCausalLM"
    with pytest.raises(ScoringError, match="^" + head.replace("(", r"\(").replace(")", r"\)") + "$"):
        build_reward("model", path=policy)
    with pytest.raises(ScoringError, match=rf"^pg.reward.path = '{policy}': not a reward model"):
        check_reward_source("pg.reward", "model", path=policy)
    assert reward_model_outputs(assets["rm"]) == (None, 3)  # a sequence-classification export passes

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "say hi", "response": "hi there", "helpfulness": 3}) + "\n")
    commands = {  # the prefix each prints its errors with -> the command line
        "rm score": ["rm", "score", policy, str(rows), str(tmp_path / "scored.jsonl")],
        "rm": ["rm", "bon", policy, assets["prompts"], "--proxy", policy, "--gold",
               "tests.rewards.test_sources:raising", "--out", str(tmp_path / "bon")],
        "data": ["data", "pairs", policy, assets["prompts"], str(tmp_path / "pairs.jsonl"), "--reward", policy],
        "generate": ["generate", "--model", policy, "--prompts", assets["prompts"], "--output",
                     str(tmp_path / "out.jsonl"), "--reward-model", policy],
    }
    for prefix, argv in commands.items():
        assert main(argv) == 2, argv
        lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(lines) == 1 and lines[0].startswith(f"aligner {prefix}: error: "), lines
        assert "not a reward model: its checkpoint has no reward head" in lines[0], lines
    assert not any(tmp_path.glob("scored*")) and not (tmp_path / "bon").exists()


# ---------------------------------------------------------------------------- 2: output names
def test_output_names_are_checked_against_those_the_export_records(assets, one_process):
    from transformers import AutoModelForSequenceClassification

    from aligner.data import load_tokenizer
    from aligner.rewards import RewardBatch, ScoringError, build_reward

    named = assets["rm_named"]
    with pytest.raises(ScoringError, match=r"^pg.reward.attributes = \['b', 'a', 'c'\] differ from the outputs"
                                           r" \['a', 'b', 'c'\] that .*rm_named/config.json records \(id2label\)$"):
        build_reward("model", path=named, attributes=["b", "a", "c"], reward_attribute="a", where="pg.reward")
    with pytest.raises(ScoringError, match=r"name 2 outputs; the reward model .* has 3"):
        build_reward("model", path=assets["rm"], attributes=["a", "b"], reward_attribute="a")

    # without names, or with the recorded ones, "a" is the first output: parity with transformers
    hf = AutoModelForSequenceClassification.from_pretrained(named).eval()
    batch = RewardBatch(["say hi", "say good"], ["hi there", "good good ok"], [{"system": "be nice"}] * 2)
    for attributes in (None, ["a", "b", "c"]):
        source = build_reward("model", path=named, tokenizer=load_tokenizer(assets["tokenizer"]),
                              attributes=attributes, reward_attribute="a")
        assert source.attributes == ["a", "b", "c"]
        rewards, outputs = source.score(batch)
        for i in range(len(batch)):
            with torch.no_grad():
                logits = hf(source.render(batch, i)[None]).logits[0].double()
            assert torch.allclose(outputs[i], logits, atol=1e-5)
            assert abs(float(rewards[i]) - float(logits[0])) < 1e-5


def test_a_reward_section_reads_the_names_the_model_records_by_default(assets, tmp_path):
    from aligner.algorithms.pg import PGTrainer
    from aligner.config import ConfigError
    from aligner.rewards import ScoringError
    from tests.algorithms.pg_setup import pg_config

    def section(**reward):
        return pg_config(assets, str(tmp_path), pg={"reward": dict({"kind": "model", "path": assets["rm_named"],
                                                                    "function": None}, **reward)})

    trainer = PGTrainer(section(reward_attribute="b"))  # attributes: null, the names a, b, c the model records
    assert trainer.cfg.pg.reward.attributes is None
    trainer.check_data_rows()
    with pytest.raises(ScoringError, match=r"^pg.reward.reward_attribute = 'helpfulness' is not one of the outputs"
                                           r" \['a', 'b', 'c'\] of the reward model"):
        PGTrainer(section()).check_data_rows()
    with pytest.raises(ScoringError, match=r"^pg.reward.attributes = \['c', 'b', 'a'\] differ from the outputs"):
        PGTrainer(section(attributes=["c", "b", "a"], reward_attribute="b")).check_data_rows()
    with pytest.raises(ConfigError, match=r"^pg.reward.attributes = \['a', 'a'\]: expected one or more distinct"):
        PGTrainer(section(attributes=["a", "a"], reward_attribute="a"))


# ---------------------------------------------------------------------------- 9: reward sources
@pytest.mark.parametrize("spec,message", [
    ("nosuchmod_xyz:f", "pg.reward.function = 'nosuchmod_xyz:f': cannot import module 'nosuchmod_xyz'"
                        " (No module named 'nosuchmod_xyz')"),
    ("tests.rewards.test_sources:nosuch", "pg.reward.function = 'tests.rewards.test_sources:nosuch': module"
                                          " 'tests.rewards.test_sources' has no 'nosuch'"),
    ("tests.rewards.test_sources", "pg.reward.function = 'tests.rewards.test_sources': expected"
                                   " 'package.module:function'"),
    ("tests.rewards.test_sources:CONSTANT", "pg.reward.function = 'tests.rewards.test_sources:CONSTANT': 'CONSTANT'"
                                            " is a int, not a function"),
    ("tests.rewards.test_sources:not_a_function", "pg.reward.function = 'tests.rewards.test_sources:not_a_function':"
                                                  " takes (prompts); a reward function is called with (prompts,"
                                                  " responses, metadata)"),
])
def test_a_reward_function_that_does_not_resolve_is_one_line(spec, message):
    from aligner.rewards import ScoringError, check_reward_source

    with pytest.raises(ScoringError) as err:
        check_reward_source("pg.reward", "function", function=spec)
    assert str(err.value) == message


def test_the_world_scorer_refuses_prompts_and_attributes_it_cannot_score(assets, tmp_path):
    from aligner.rewards import ScoringError, check_reward_source

    world = tmp_path / "world.jsonl"
    world.write_text(json.dumps({"prompt": "What is 2 plus 3?", "family": "add", "answer": "5", "args": [2, 3]})
                     + "\n" + json.dumps({"prompt": "Say hi.", "answer": "hi"}) + "\n")
    with pytest.raises(ScoringError, match=rf"^{world}:2: not a prompt of the embedded world \(no task fields"
                                           r" 'family', 'answer', 'args'\), which pg.reward.kind = world needs"):
        check_reward_source("pg.reward", "world", prompts=str(world))
    with pytest.raises(ScoringError, match=rf"^{assets['prompts']}:1: not a prompt .* which --gold world needs"):
        check_reward_source("--gold", "world", prompts=assets["prompts"])
    with pytest.raises(ScoringError, match=r"^pg.reward.reward_attribute = 'helpfulnes': not an attribute of the"
                                           r" world's scorer; expected one of helpfulness, correctness,"):
        check_reward_source("pg.reward", "world", reward_attribute="helpfulnes")
    world.write_text(world.read_text().splitlines()[0] + "\n")
    check_reward_source("pg.reward", "world", prompts=str(world))  # the world's prompts pass


def _pg_command(assets, out, *overrides):
    return [sys.executable, "-W", "ignore", "-m", "aligner.cli.main", "train", "pg", f"init.hf={assets['policy']}",
            f"data.train={assets['prompts']}", f"data.tokenizer={assets['tokenizer']}", "data.template=extra_id",
            "data.max_length=64", "trainer.max_steps=1", "trainer.global_batch_size=4", "trainer.micro_batch_size=4",
            f"trainer.out_dir={out}", "trainer.progress=false", "trainer.tensorboard=false", "trainer.export_hf=false",
            "pg.samples_per_prompt=2", "pg.generation.max_new_tokens=4", "pg.reward.kind=function", *overrides]


def test_a_reward_function_that_fails_in_training_is_one_line_without_traceback(assets, tmp_path):
    """The CLI before heavy work (a function that does not import), and in the first step
    (a function that raises): one ``error:`` line each, exit 2, no ``[rank0]:`` traceback."""
    early = pyproc.run(_pg_command(assets, tmp_path / "a", "pg.reward.function=nosuchmod_xyz:f"), timeout=300)
    assert early.returncode == 2
    assert early.stderr.splitlines() == ["aligner train: error: pg.reward.function = 'nosuchmod_xyz:f': cannot import"
                                         " module 'nosuchmod_xyz' (No module named 'nosuchmod_xyz')"]
    late = pyproc.run(_pg_command(assets, tmp_path / "b", "pg.reward.function=tests.rewards.test_sources:raising"),
                      timeout=300)
    assert late.returncode == 2, late.stderr[-3000:]
    errors = [line for line in late.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, late.stderr[-3000:]
    assert errors[0].startswith("aligner train: error: reward function tests.rewards.test_sources:raising raised at"
                                " step 0 on the batch of samples [0]..[7]: KeyError: 'missing' (at ")
    assert errors[0].endswith(f"tests/rewards/test_sources.py:{inspect.getsourcelines(raising)[1] + 1})")
    assert "Traceback" not in late.stderr and "[rank0]" not in late.stderr
    assert "hint: aligner --debug (or ALIGNER_DEBUG=1) shows the traceback" in late.stderr


# ---------------------------------------------------------------------------- 6: exact answers
@pytest.mark.parametrize("response,answer,exact,formatted", [
    ("The answer is 3.5.", "3.5", 1, 1),  # a decimal
    ("The answer is 3.", "3.5", 0, 1),
    ("The answer is -2.", "-2", 1, 1),  # a negative number
    ("The answer is -0.25. That is all.", "-0.25", 1, 1),  # a sentence after it
    ("The answer is 3.50.", "3.5", 1, 1),  # numbers compare by value
    ("The answer is 42", "42", 1, 1),  # the answer ends the response without a period
    ("The answer is 42!", "42", 1, 1),
    ("The answer is 42\nThanks for asking.", "42", 1, 1),  # the answer ends its line
    ("The answer is 2, 7, 9.", "2, 7, 9", 1, 1),
    ("The answer is elppa.", "elppa", 1, 1),
    ("The answer is 12. The answer is 11.", "12", 0, 1),  # the last stated answer counts
    ("The answer is 3.5 apples.", "3.5", 0, 1),
    ("The answer is 1e3.", "1000", 0, 1),  # not a plain number: compared as text
    ("The answer is", "12", 0, 0),  # cut before the answer
    ("The answer is .", "12", 0, 0),
    ("twelve", "12", 0, 0),
])
def test_exact_answers(response, answer, exact, formatted):
    from aligner.rewards import RewardBatch, build_reward

    batch = RewardBatch(["q"], [response], [{"answer": answer}], step=0, sample_indices=[0])
    rewards, attrs = build_reward("exact_answer", format_reward=0.5).score(batch)
    assert attrs.tolist() == [[exact, formatted]]
    assert rewards.tolist() == [exact + 0.5 * formatted]
