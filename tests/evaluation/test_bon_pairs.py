"""``aligner rm bon`` and ``aligner data pairs`` on a tiny policy with a reward function:
best-of-n rows against the samples they come from, pairs against the same samples, and the
pairs file read back as DPO / RPO / margin-DPO data."""
import json
import math

import pytest

from tests.algorithms.ppo_setup import make_assets, word_reward

REWARD = "tests.algorithms.ppo_setup:word_reward"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("bon_assets"))


@pytest.fixture(scope="module")
def bon(assets, tmp_path_factory):
    from aligner.cli.rm import main
    from aligner.parallel import destroy

    out = tmp_path_factory.mktemp("bon")
    assert main(["bon", assets["policy"], assets["prompts"], "--proxy", REWARD, "--gold", REWARD, "--n", "6",
                 "--num-prompts", "10", "--max-new-tokens", "6", "--seed", "5", "--template", "extra_id",
                 "--out", str(out)]) == 0
    destroy()
    return json.loads((out / "bon.json").read_text()), [json.loads(x) for x in (out / "samples.jsonl").open()]


def test_best_of_n_rows_follow_from_the_samples(bon, assets):
    result, samples = bon
    table = {r["n"]: r for r in result["table"]}
    assert sorted(table) == [1, 2, 4, 6]
    assert len(samples) == 10 and all(len(s["responses"]) == 6 for s in samples)
    prompts = [json.loads(x) for x in open(assets["prompts"])][:10]
    for s, row in zip(samples, prompts):  # the stored scores are the reward of the stored responses
        assert s["gold"] == word_reward(None, s["responses"], [row] * 6)
    every = [g for s in samples for g in s["gold"]]
    assert math.isclose(table[1]["gold"], sum(every) / len(every), rel_tol=1e-12)
    assert math.isclose(table[1]["proxy"], table[1]["gold"], rel_tol=1e-12)  # proxy = gold here
    assert math.isclose(table[6]["proxy"], sum(max(s["proxy"]) for s in samples) / 10, rel_tol=1e-12)
    for n, r in table.items():
        assert math.isclose(r["kl_bon"], math.log(n) - (n - 1) / n, abs_tol=1e-15)
        assert math.isclose(r["d_bon"], math.sqrt(r["kl_bon"]))
    # picking by the gold itself can only help: non-decreasing in n
    golds = [table[n]["gold"] for n in sorted(table)]
    assert all(b >= a - 1e-12 for a, b in zip(golds, golds[1:]))


def test_pairs_are_best_against_worst_of_the_same_samples(bon, assets, tmp_path):
    from aligner.cli.data import main
    from aligner.data import load_dataset, load_tokenizer
    from aligner.parallel import destroy

    _, samples = bon
    out = tmp_path / "pairs.jsonl"
    assert main(["pairs", assets["policy"], assets["prompts"], str(out), "--reward", REWARD, "--n", "6",
                 "--num-prompts", "10", "--max-new-tokens", "6", "--seed", "5", "--template", "extra_id"]) == 0
    destroy()
    rows = [json.loads(x) for x in out.open()]
    for s in samples:  # empty responses take no part in pairs
        s["proxy"] = [x for x, r in zip(s["proxy"], s["responses"]) if r.strip()]
        s["responses"] = [r for r in s["responses"] if r.strip()]
    expected = [s for s in samples if s["proxy"] and max(s["proxy"]) > min(s["proxy"])]
    assert len(rows) == len(expected) > 0
    prompts = {json.loads(x)["prompt"]: json.loads(x) for x in open(assets["prompts"])}
    for row, s in zip(rows, expected):
        assert row["chosen_reward"] == max(s["proxy"]) and row["rejected_reward"] == min(s["proxy"])
        assert row["chosen_reward"] > row["rejected_reward"]
        assert row["margin"] == row["chosen_reward"] - row["rejected_reward"]
        assert row["chosen"] in s["responses"] and row["rejected"] in s["responses"]
        source = prompts[row["prompt"]]
        assert row["target"] == source["target"] and row["system"] == source["system"]
        assert word_reward(None, [row["chosen"], row["rejected"]], [source] * 2) == [row["chosen_reward"],
                                                                                   row["rejected_reward"]]
    # read back as DPO data: the margin and the reward gap reach the samples
    pairs = load_dataset(str(out), kind="pairs", tokenizer=load_tokenizer(assets["tokenizer"]), template="extra_id",
                         max_length=64)
    assert [p["margin"] for p in pairs] == [r["margin"] for r in rows]
    assert [p["reward_gap"] for p in pairs] == pytest.approx([r["margin"] for r in rows])


def test_all_pairs_above_a_gap(assets, tmp_path):
    from aligner.cli.data import main
    from aligner.parallel import destroy

    out = tmp_path / "all.jsonl"
    assert main(["pairs", assets["policy"], assets["prompts"], str(out), "--reward", REWARD, "--n", "4",
                 "--num-prompts", "6", "--max-new-tokens", "6", "--all-pairs", "--min-gap", "0.5"]) == 0
    destroy()
    rows = [json.loads(x) for x in out.open()]
    assert rows and all(r["margin"] >= 0.5 and r["chosen_reward"] - r["rejected_reward"] == r["margin"]
                        for r in rows)
    per_prompt = {}
    for r in rows:
        per_prompt.setdefault(r["prompt"], []).append(r)
    assert any(len(v) > 1 for v in per_prompt.values())  # more than best-vs-worst


def test_select_pairs():
    from aligner.cli.pairs import select_pairs

    assert select_pairs([1.0, 3.0, 2.0, 3.0], False, None) == [(1, 0)]
    assert select_pairs([2.0, 2.0], False, None) == []
    assert select_pairs([1.0, 3.0, 2.0], True, 1.0) == [(1, 0), (1, 2), (2, 0)]
    assert select_pairs([1.0, 1.5], False, 1.0) == []


@pytest.mark.parametrize("argv,line", [
    (["rm", "bon", "POLICY", "PROMPTS", "--proxy", REWARD, "--n", "0", "--out", "OUT"],
     "aligner rm: error: --n 0: expected an integer >= 1"),
    (["rm", "bon", "POLICY", "PROMPTS", "--proxy", REWARD, "--num-prompts", "0", "--out", "OUT"],
     "aligner rm: error: --num-prompts 0: expected an integer >= 1"),
    (["rm", "bon", "POLICY", "PROMPTS", "--proxy", REWARD, "--gold", "world:helpfulnes", "--out", "OUT"],
     "aligner rm: error: --gold 'world:helpfulnes': 'helpfulnes' is not an attribute of the world's scorer; expected"
     " world or world:ATTRIBUTE with ATTRIBUTE one of helpfulness, correctness, coherence, complexity, verbosity"),
    (["rm", "bon", "POLICY", "PROMPTS", "--proxy", REWARD, "--out", "OUT"],  # --gold world on prompts of no world
     "aligner rm: error: PROMPTS:1: not a prompt of the embedded world (no task fields 'family', 'answer', 'args'),"
     " which --gold world needs to score its responses"),
    (["data", "pairs", "POLICY", "PROMPTS", "OUT", "--reward", REWARD, "--n", "1"],
     "aligner data: error: --n 1: expected an integer >= 2 (a pair needs two samples of a prompt)"),
    (["data", "pairs", "POLICY", "PROMPTS", "OUT", "--reward", REWARD, "--min-gap", "nan"],
     "aligner data: error: --min-gap nan: expected a finite number >= 0.0"),
    (["data", "pairs", "POLICY", "PROMPTS", "OUT", "--reward", "tests.algorithms.ppo_setup:nosuch"],
     "aligner data: error: --reward 'tests.algorithms.ppo_setup:nosuch': module 'tests.algorithms.ppo_setup' has no"
     " 'nosuch'"),
])
def test_values_no_sampling_can_use_are_refused_before_any_model(assets, tmp_path, capsys, argv, line):
    from aligner.cli.main import main

    paths = {"POLICY": assets["policy"], "PROMPTS": assets["prompts"], "OUT": str(tmp_path / "out")}
    assert main([paths.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == line.replace("PROMPTS", assets["prompts"]), err
    assert not (tmp_path / "out").exists()
