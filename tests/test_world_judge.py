"""The world examples' judge (examples/world_common.py) with several responses per prompt:
per prompt the mean of each score over its responses, the paired statistics over those
means (hand-computed values), and one response per prompt giving the one-response judge's
responses exactly (a tiny random HF Llama on a synthesized world, no training)."""
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from world_common import WorldJudge, judge_seed, paired, prompt_means, rate  # noqa: E402


def _row(helpfulness, exact):
    return {"helpfulness": helpfulness, "correctness": helpfulness, "exact": exact}


def test_prompt_means_and_paired_statistics_by_hand():
    # 4 prompts, 2 responses each, response-major: response 0 of prompts 0..3, then response 1
    base = [_row(1, False), _row(2, False), _row(0, False), _row(3, True),
            _row(3, True), _row(2, False), _row(4, True), _row(1, False)]
    new = [_row(3, True), _row(2, False), _row(4, True), _row(2, False),
           _row(3, True), _row(4, True), _row(4, True), _row(2, False)]
    b, n = prompt_means(base, 4), prompt_means(new, 4)
    assert [r["helpfulness"] for r in b] == [2.0, 2.0, 2.0, 2.0]
    assert [r["exact"] for r in b] == [0.5, 0.0, 0.5, 0.5]
    assert [r["helpfulness"] for r in n] == [3.0, 3.0, 4.0, 2.0]
    assert [r["exact"] for r in n] == [1.0, 0.5, 1.0, 0.0]
    # differences 1, 1, 2, 0: mean 1, sample variance 2/3, standard error sqrt(2/3 / 4)
    stats = paired([r["helpfulness"] for r in b], [r["helpfulness"] for r in n])
    assert stats["prompts"] == 4
    assert stats["mean"] == pytest.approx(1.0)
    assert stats["standard_error"] == pytest.approx(math.sqrt(1 / 6))
    assert stats["z"] == pytest.approx(math.sqrt(6))
    # the first responses alone: differences 2, 0, 4, -1 (mean 1.25)
    assert paired([r["helpfulness"] for r in base[:4]], [r["helpfulness"] for r in new[:4]])["mean"] == 1.25
    # rates: binomial for 0/1 outcomes; the spread of per-prompt fractions for several responses each
    assert rate([1.0, 0.0, 0.0, 1.0])["standard_error"] == pytest.approx(math.sqrt(0.5 * 0.5 / 4))
    fractions = rate([r["exact"] for r in b])  # 0.5, 0, 0.5, 0.5: p 3/8, squared deviations 3 x 1/64 + 9/64
    assert fractions["rate"] == 0.375 and fractions["standard_error"] == pytest.approx(math.sqrt(12 / 64) / 4)
    assert fractions["standard_error"] < math.sqrt(0.375 * 0.625 / 4)  # what the binomial formula would say
    # one response per prompt: the rows themselves
    assert prompt_means(base[:4], 4) == base[:4]
    with pytest.raises(ValueError, match="7 score rows for 4 prompts"):
        prompt_means(base[:7], 4)


def test_the_seeds_of_response_zero_are_the_engines_and_the_others_distinct():
    from aligner.rollout.engine import seed_for

    assert [judge_seed(3, i, 0) for i in range(5)] == [seed_for(3, i) for i in range(5)]
    seeds = {judge_seed(3, i, k) for i in range(50) for k in range(8)}
    assert len(seeds) == 400
    assert judge_seed(3, 2, 1) != judge_seed(4, 2, 1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from aligner.data import load_tokenizer
    from aligner.data.world import synthesize

    root = tmp_path_factory.mktemp("world_judge")
    files = synthesize(root / "qs" / "world", seed=0)
    tok = load_tokenizer(str(files["tokenizer"]))
    import torch

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id))
    model.save_pretrained(root / "model", safe_serialization=True)
    return root


def test_several_responses_per_prompt_and_one_reproduces_the_one_response_judge(world):
    from aligner.data.world import score_response
    from aligner.models import from_pretrained
    from aligner.rollout.engine import GenerationConfig, RolloutEngine

    prompts, new = 6, 12
    one = WorldJudge(world / "qs", world / "one", prompts=prompts, seed=5, max_new_tokens=new)
    rows1 = one.judge(world / "model", "m")
    # the one-response judge as it was: one engine call with the engine's own seeds
    models, cfg = from_pretrained(str(world / "model"))
    engine = RolloutEngine(models, cfg, tokenizer=one.tokenizer, max_batch=64)
    result = engine.generate([p["prompt_tokens"].tolist() for p in one.prompts],
                             GenerationConfig(max_new_tokens=new, temperature=1.0, seed=5,
                                              stop_token_ids=[one.tokenizer.eos_id]))
    legacy = [one.tokenizer.decode(result.response_tokens(i)) for i in range(prompts)]
    lines1 = [json.loads(x) for x in (world / "one" / "generations_m.jsonl").read_text().splitlines()]
    assert [x["response"] for x in lines1] == legacy
    assert [x["sample"] for x in lines1] == [0] * prompts
    assert rows1 == [score_response(p["meta"], r) for p, r in zip(one.prompts, legacy)]

    three = WorldJudge(world / "qs", world / "three", prompts=prompts, seed=5, max_new_tokens=new, samples=3)
    rows3 = three.judge(world / "model", "m")
    lines3 = [json.loads(x) for x in (world / "three" / "generations_m.jsonl").read_text().splitlines()]
    assert [x["sample"] for x in lines3] == [k for k in range(3) for _ in range(prompts)]
    assert [x["prompt"] for x in lines3] == [p["prompt"] for p in three.prompts] * 3
    # each response's scores are the scorer's, and each prompt's row their means
    for i, p in enumerate(three.prompts):
        mine = [x for x in lines3 if x["prompt"] == p["prompt"]]
        assert all(x["scores"] == score_response(p["meta"], x["response"]) for x in mine)
        for key in rows3[i]:
            assert rows3[i][key] == pytest.approx(sum(float(x["scores"][key]) for x in mine) / 3)
    # response 0 draws from the one-response judge's seeds; the others are other draws
    assert [x["response"] for x in lines3[:prompts]] == legacy
    assert [x["response"] for x in lines3[prompts:2 * prompts]] != legacy
    assert len(three.rows["m"]) == 3 * prompts
    # greedy decoding: one response per prompt
    greedy = three.judge(world / "model", "g", greedy=True)
    assert len(greedy) == prompts and len((world / "three" / "generations_g.jsonl").read_text().splitlines()) == prompts
    with pytest.raises(ValueError, match="samples = 0: expected an integer >= 1"):
        WorldJudge(world / "qs", world / "bad", samples=0)


def test_a_judgement_is_read_back_only_for_the_same_model_and_settings(world, capsys):
    import shutil

    prompts, new = 6, 12
    judge = WorldJudge(world / "qs", world / "reuse", prompts=prompts, seed=5, max_new_tokens=new, samples=2)
    rows = judge.judge(world / "model", "m", reuse=True)  # nothing to read back: sampled
    generations = world / "reuse" / "generations_m.jsonl"
    record = json.loads((world / "reuse" / "generations_m.json").read_text())
    assert record["samples"] == 2 and record["prompts"] == prompts and record["seed"] == 5 and not record["greedy"]
    stamp = generations.stat().st_mtime_ns
    assert "read back" not in capsys.readouterr().out

    again = WorldJudge(world / "qs", world / "reuse", prompts=prompts, seed=5, max_new_tokens=new, samples=2)
    assert again.judge(world / "model", "m", reuse=True) == rows
    assert "generations_m.jsonl), read back" in capsys.readouterr().out
    assert generations.stat().st_mtime_ns == stamp and len(again.rows["m"]) == 2 * prompts
    # without reuse, or with another judge, it samples again
    assert again.judge(world / "model", "m") == rows and generations.stat().st_mtime_ns != stamp
    one = WorldJudge(world / "qs", world / "reuse", prompts=prompts, seed=5, max_new_tokens=new)
    assert len(one.judge(world / "model", "m", reuse=True)) == prompts
    assert len(generations.read_text().splitlines()) == prompts  # one response each: judged again
    other_seed = WorldJudge(world / "qs", world / "reuse", prompts=prompts, seed=6, max_new_tokens=new)
    other_seed.judge(world / "model", "m", reuse=True)
    assert "read back" not in capsys.readouterr().out
    # the same settings with changed model files: judged again
    changed = world / "changed_model"
    shutil.copytree(world / "model", changed)
    other_seed.judge(changed, "c", reuse=True)
    (changed / "config.json").write_text((changed / "config.json").read_text() + "\n")
    other_seed.judge(changed, "c", reuse=True)
    other_seed.judge(changed, "c", reuse=True)
    assert capsys.readouterr().out.count("read back") == 1  # the third call only


def test_first_response_only_compares_response_zero(world):
    prompts = 6
    judge = WorldJudge(world / "qs", world / "first", prompts=prompts, seed=5, max_new_tokens=12, samples=3)
    judge.rows = {"a": [_row(h, False) for h in (1, 2, 3, 4, 5, 6, 9, 9, 9, 9, 9, 9, 0, 0, 0, 0, 0, 0)],
                  "b": [_row(h, False) for h in (2, 2, 5, 4, 5, 9, 0, 0, 0, 0, 0, 0, 9, 9, 9, 9, 9, 9)]}
    got = judge.first_response_only([("b_over_a", "a", "b"), ("missing", "a", "c")])
    # response 0 differences 1, 0, 2, 0, 0, 3: mean 1, squared deviations 0+1+1+1+1+4, sample variance 8/5
    assert list(got) == ["b_over_a"]
    assert got["b_over_a"]["mean"] == pytest.approx(1.0)
    assert got["b_over_a"]["standard_error"] == pytest.approx(math.sqrt(8 / 5 / 6))


def test_an_example_reuses_a_run_only_for_the_same_command(tmp_path):
    import argparse

    from world_common import add_judge_arguments, judge_from_args, record_run, trained_before

    run = tmp_path / "kto"
    command = ["trainer.max_steps=100", "trainer.seed=0", "kto.beta=0.1"]
    assert trained_before(run, "kto", command) is False  # nothing trained
    (run / "hf").mkdir(parents=True)
    with pytest.raises(ValueError) as err:  # trained, but by nobody who said how
        trained_before(run, "kto", command)
    assert "without example_run.json" in str(err.value) and "another --out" in str(err.value)
    record_run(run, "kto", command)
    assert trained_before(run, "kto", command) is True
    with pytest.raises(ValueError) as err:
        trained_before(run, "kto", ["trainer.max_steps=200", "trainer.seed=0", "kto.beta=0.1"])
    msg = str(err.value)
    assert "\n" not in msg and "-trainer.max_steps=100, +trainer.max_steps=200" in msg, msg
    with pytest.raises(ValueError, match="config kto -> dpo"):
        trained_before(run, "dpo", command)

    parser = argparse.ArgumentParser(prog="example")
    parser.add_argument("--seed", type=int, default=0)
    add_judge_arguments(parser)
    for bad, says in ((["--judge-samples", "0"], "--judge-samples 0: expected an integer >= 1"),
                      (["--prompts", "0"], "--prompts 0: expected an integer >= 1")):
        with pytest.raises(SystemExit) as exit_:
            judge_from_args(parser, parser.parse_args(bad), tmp_path, tmp_path)
        assert exit_.value.code == 2
