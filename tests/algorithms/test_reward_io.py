"""Reward-model I/O: one rendering of reward rows for training, validation, ``aligner rm
score`` and ``aligner eval rewardbench``; exported RMs name their outputs and record their
template and reward weights; scoring reads them back and refuses options that do not
match the head.

A tiny Bradley-Terry RM is trained from scratch on the embedded world (a SentencePiece
tokenizer without a chat template) at ``data.template=auto`` and ``extra_id``, validated
on the world's RewardBench-format pairs; the same pairs are then scored by the commands.
References: the training loop's own validation metrics, transformers'
``AutoModelForSequenceClassification`` on the exported folder, and hand-written weights.
"""
import json
import shutil

import pytest
import torch

from aligner.parallel.spawn import spawn_local

SMALL = dict(n_sft=40, n_sft_val=8, n_regression=12, n_pairs=48, n_pairs_val=8, n_heldout=4, n_rewardbench=12)
NAMES = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]
HELPSTEER2_70B = {"helpfulness": 0.65, "correctness": 0.8, "coherence": 0.45, "complexity": 0.55, "verbosity": -0.4}


def train_and_score(root, world):
    """In one process: train a BT RM per template, then score its validation pairs with the
    commands (functions and ``main``s, stderr captured)."""
    import contextlib
    import io

    from aligner.cli.eval import main as eval_main
    from aligner.cli.eval import rewardbench
    from aligner.cli.rm import main as rm_main
    from aligner.cli.rm import score_samples
    from aligner.cli.train import compose
    from aligner.data import load_tokenizer

    vocab = load_tokenizer(world["tokenizer"]).vocab_size
    out = {}
    for template in ("auto", "extra_id"):
        run = f"{root}/bt_{template}"
        trainer_cls, cfg = compose("rm_bt", [
            "init.hf=null", f"model.vocab_size={vocab}", "model.num_layers=2", f"data.tokenizer={world['tokenizer']}",
            f"data.train={world['pairs_train']}", f"data.validation={world['rewardbench']}",
            f"data.template={template}", f"trainer.out_dir={run}", "trainer.max_steps=3",
            "trainer.global_batch_size=8", "trainer.micro_batch_size=4", "trainer.progress=false",
            "trainer.tensorboard=false", "trainer.seed=5", "optim.lr=1e-3", "optim.warmup_steps=0",
        ])
        result = trainer_cls(cfg).fit()
        report = rewardbench(f"{run}/hf", world["rewardbench"])
        _, scored = score_samples(f"{run}/hf", world["rewardbench"])
        out[template] = {"val": result["val"], "report": report,
                         "chosen": [e["reward"]["chosen"] for e in scored],
                         "rejected": [e["reward"]["rejected"] for e in scored]}
    hf = f"{root}/bt_auto/hf"
    calls = {
        "score_pairs": ["score", hf, world["rewardbench"], f"{root}/scored_pairs.jsonl"],
        "score_regression": ["score", hf, world["regression_val"], f"{root}/scored_regression.jsonl"],
        "score_default_weights": ["score", f"{root}/no_weights", world["regression_val"],
                                  f"{root}/scored_default.jsonl"],
        "bad_attribute": ["score", hf, world["rewardbench"], f"{root}/x1.jsonl", "--reward-attribute", "helpfulnes"],
        "bad_names_count": ["score", hf, world["rewardbench"], f"{root}/x2.jsonl", "--attributes", "a", "b"],
        "bad_names": ["score", hf, world["rewardbench"], f"{root}/x3.jsonl", "--attributes",
                      "correctness", "helpfulness", "coherence", "complexity", "verbosity"],
        "bad_weights": ["score", hf, world["rewardbench"], f"{root}/x4.jsonl", "--attribute-weights", "1", "0"],
    }
    # a folder whose training recorded names but no weights: HelpSteer2's apply
    shutil.copytree(hf, f"{root}/no_weights")
    meta = json.loads(open(f"{root}/no_weights/aligner_config.json").read())
    del meta["attribute_weights"]
    with open(f"{root}/no_weights/aligner_config.json", "w") as f:
        json.dump(meta, f)
    for name, argv in calls.items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = rm_main(argv)
        out[name] = (code, err.getvalue())
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = eval_main(["rewardbench", hf, world["rewardbench"], "--attribute-weights", "1", "2"])
    out["eval_bad_weights"] = (code, err.getvalue())
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from aligner.data.world import synthesize

    root = tmp_path_factory.mktemp("reward_io")
    return root, {k: str(v) for k, v in synthesize(root / "world", seed=2, **SMALL).items()}


@pytest.fixture(scope="module")
def runs(world):
    root, files = world
    return root, files, spawn_local(train_and_score, 1, str(root), files, timeout=900)[0]


@pytest.mark.parametrize("template", ["auto", "extra_id"])
def test_training_validation_equals_eval_rewardbench(runs, template):
    _, _, out = runs
    val, report = out[template]["val"], out[template]["report"]
    subsets = report["subsets"]
    assert set(subsets) == {"world-easy", "world-hard"} and all(s["n"] == 12 for s in subsets.values())
    total = sum(s["correct"] for s in subsets.values()) / 24
    assert val["accuracy"] == pytest.approx(total, abs=1e-12)
    for name, s in subsets.items():
        assert val[f"accuracy/{name}"] == pytest.approx(s["accuracy"], abs=1e-12)
    # the same scores, not only the same ranking: mean chosen / rejected reward of the pairs
    chosen, rejected = out[template]["chosen"], out[template]["rejected"]
    assert val["reward_chosen"] == pytest.approx(sum(chosen) / 24, abs=1e-5)
    assert val["reward_rejected"] == pytest.approx(sum(rejected) / 24, abs=1e-5)
    assert report["reward"]["template"] == "extra_id"  # auto means extra_id for reward rows
    assert report["reward"]["weights"] == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_auto_and_extra_id_train_the_same_model(runs):
    _, _, out = runs
    assert out["auto"]["chosen"] == out["extra_id"]["chosen"]


def test_export_names_outputs_and_records_template_and_weights(runs):
    from transformers import AutoModelForSequenceClassification

    root, _, _ = runs
    hf = root / "bt_auto" / "hf"
    config = json.loads((hf / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(NAMES)}
    assert config["label2id"] == {n: i for i, n in enumerate(NAMES)}
    meta = json.loads((hf / "aligner_config.json").read_text())
    assert meta == {"template": "extra_id", "labels": NAMES,
                    "attribute_weights": {"helpfulness": 1.0, "correctness": 0.0, "coherence": 0.0,
                                          "complexity": 0.0, "verbosity": 0.0}}
    model = AutoModelForSequenceClassification.from_pretrained(hf)
    assert model.config.id2label == dict(enumerate(NAMES))


def test_rm_score_keeps_rows_and_adds_named_scores_and_reward(runs):
    from transformers import AutoModelForSequenceClassification

    from aligner.data import load_tokenizer
    from aligner.data.datasets import render_reward
    from aligner.data.formats import parse_row

    root, world, out = runs
    assert out["score_pairs"][0] == 0 and out["score_regression"][0] == 0
    inputs = [json.loads(line) for line in open(world["rewardbench"])]
    rows = [json.loads(line) for line in open(root / "scored_pairs.jsonl")]
    assert len(rows) == len(inputs) == 24
    hf = root / "bt_auto" / "hf"
    model = AutoModelForSequenceClassification.from_pretrained(hf).eval()
    tok = load_tokenizer(str(hf))
    for src, row in zip(inputs, rows):
        assert {k: row[k] for k in src} == src  # every input field kept
        assert set(row["scores"]) == {"chosen", "rejected"} and set(row["reward"]) == {"chosen", "rejected"}
        rec = parse_row(src, "rewardbench")
        for side in ("chosen", "rejected"):
            assert list(row["scores"][side]) == NAMES
            assert row["reward"][side] == row["scores"][side]["helpfulness"]  # BT trained the helpfulness output
            tokens = render_reward(tok, "extra_id", rec.prompt, getattr(rec, side))[0]
            with torch.no_grad():
                ref = model(torch.tensor([tokens])).logits[0].tolist()
            assert list(row["scores"][side].values()) == pytest.approx(ref, abs=1e-5)
    regression = [json.loads(line) for line in open(root / "scored_regression.jsonl")]
    assert len(regression) == sum(1 for _ in open(world["regression_val"]))
    assert all(r["reward"] == r["scores"]["helpfulness"] for r in regression)
    assert all(isinstance(r["helpfulness"], int) for r in regression)  # the input's own ratings kept


def test_rm_score_defaults_to_helpsteer2_weights_for_a_five_attribute_head(runs):
    root, _, out = runs
    assert out["score_default_weights"][0] == 0
    for r in (json.loads(line) for line in open(root / "scored_default.jsonl")):
        assert r["reward"] == pytest.approx(sum(w * r["scores"][a] for a, w in HELPSTEER2_70B.items()), abs=1e-9)


def test_scoring_refuses_names_and_weights_that_do_not_match_the_head(runs):
    root, _, out = runs
    expect = {
        "bad_attribute": "--reward-attribute 'helpfulnes' is not an output of the head",
        "bad_names_count": "--attributes names 2 outputs ['a', 'b']; the head of",
        "bad_names": "differ from the head's outputs ['helpfulness', 'correctness', 'coherence', 'complexity',"
                     " 'verbosity']",
        "bad_weights": "--attribute-weights has 2 numbers; the head of",
        "eval_bad_weights": "--attribute-weights has 2 numbers; the head of",
    }
    for name, text in expect.items():
        code, err = out[name]
        lines = [line for line in err.splitlines() if "error:" in line]
        assert code == 2 and len(lines) == 1 and text in lines[0], (name, err)
        assert "has 5 outputs" in lines[0] or "helpfulness" in lines[0], (name, err)
    assert not any((root / f"x{i}.jsonl").exists() for i in range(1, 5))


def test_reward_rendering_is_shared_and_auto_means_extra_id_for_reward_rows(world):
    from aligner.data import load_dataset, load_tokenizer
    from aligner.data.datasets import render_extra_id, resolve_template
    from aligner.data.formats import parse_row

    _, world = world
    tok = load_tokenizer(world["tokenizer"])
    assert resolve_template(tok, "auto", reward_model=True) == "extra_id"
    row = json.loads(open(world["rewardbench"]).readline())
    rec = parse_row(row, "rewardbench")
    reward_chosen = render_extra_id(tok, rec.prompt, rec.chosen, end="extra_id")[0]
    policy_chosen = render_extra_id(tok, rec.prompt, rec.chosen, end="eos")[0]
    assert reward_chosen[-1] == tok.token_to_id("<extra_id_2>") and policy_chosen[-1] == tok.eos_id
    for template in ("auto", "extra_id"):
        for kind, options in (("pairs", {"reward_model": True}), ("any_scored", {})):
            sample = load_dataset(world["rewardbench"], kind=kind, tokenizer=tok, template=template, **options)[0]
            assert sample["chosen"].tolist() == reward_chosen, (template, kind)
    # a policy's (DPO's) pairs under auto end with EOS, as its SFT data and generation do
    sample = load_dataset(world["rewardbench"], kind="pairs", tokenizer=tok, template="auto")[0]
    assert sample["chosen"].tolist() == policy_chosen
