"""SteerLM's command-line pieces on tiny HF models (docs/steerlm.md):

- ``aligner rm label`` writes, on every Assistant turn, the attribute string of the
  reward model's predictions (transformers' outputs of the same rendering, rounded half
  up and clipped to 0..4); the output is a ``steerlm`` file whose labels SFT renders after
  the assistant header; bad rows and files of another format name file, line and field;
- ``aligner generate --attributes`` (and a prompt row's own ``label``) renders exactly the
  prompt part of the training rendering of a labelled row.
"""
import contextlib
import io
import json
import math

import pytest
import torch

from aligner.parallel.spawn import spawn_local

ATTRS = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _run_mains(*argvs):
    """Several CLI runs in one process: (exit code, stderr) each."""
    from aligner.cli.generate import main as generate
    from aligner.cli.rm import main as rm

    out = []
    for argv in argvs:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = rm(argv[1:]) if argv[0] == "rm" else generate(argv[1:])
        out.append((code, err.getvalue()))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.algorithms.steerlm2_setup import make_assets

    root = tmp_path_factory.mktemp("steerlm_cli")
    assets = make_assets(root / "assets")
    sft = _write(root / "sft.jsonl", [
        {"system": "be nice", "conversations": [{"from": "User", "value": "say hi"},
                                               {"from": "Assistant", "value": "hi there friend"}], "id": 1},
        {"conversations": [{"from": "User", "value": "what is 2"}, {"from": "Assistant", "value": "4 is the answer"},
                           {"from": "User", "value": "say bye"}, {"from": "Assistant", "value": "bye"}], "id": 2},
    ])
    bad = _write(root / "bad.jsonl", [
        {"conversations": [{"from": "User", "value": "say hi"}, {"from": "Assistant", "value": "hi"}]},
        {"conversations": [{"from": "User", "value": "say hi"}, {"from": "Bot", "value": "hi"}]},
    ])
    openai = _write(root / "openai.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": "hi"}]}])
    prompts = _write(root / "prompts.jsonl", [
        {"system": "be nice", "prompt": "say hi there"},
        {"prompt": "say good bye", "label": "helpfulness:2,correctness:4,coherence:4,complexity:1,verbosity:3"},
    ])
    gen = ["gen", "--model", assets["steerlm"], "--prompts", prompts, "--template", "extra_id", "--greedy",
           "--max-new-tokens", "4"]
    results = spawn_local(_run_mains, 1,
                          ["rm", "label", assets["rm"], sft, str(root / "labelled.jsonl")],
                          ["rm", "label", assets["rm"], bad, str(root / "never.jsonl")],
                          ["rm", "label", assets["rm"], openai, str(root / "never.jsonl")],
                          gen + ["--attributes", "helpfulness=4,verbosity=1", "--output", str(root / "steered.jsonl")],
                          gen[:5] + ["--template", "raw", "--attributes", "verbosity=1", "--output",
                                     str(root / "never.jsonl")],
                          gen + ["--attributes", "verbosity=7", "--output", str(root / "never.jsonl")],
                          gen + ["--attributes", "verbosty=0", "--output", str(root / "never.jsonl")],
                          gen + ["--attributes", "humor=3", "--attribute-defaults", "", "--output",
                                 str(root / "humor.jsonl")],
                          timeout=600)[0]
    return root, assets, results


def test_label_writes_the_reward_models_rounded_attributes(setup):
    from transformers import AutoModelForSequenceClassification

    from aligner.data import load_dataset, load_tokenizer
    from aligner.data.datasets import render_extra_id
    from aligner.data.formats import Conversation, Turn, detect_format

    root, assets, results = setup
    assert results[0][0] == 0, results[0][1]
    rows = [json.loads(line) for line in (root / "labelled.jsonl").read_text().splitlines()]
    source = [json.loads(line) for line in (root / "sft.jsonl").read_text().splitlines()]
    tok = load_tokenizer(assets["tokenizer"])
    rm = AutoModelForSequenceClassification.from_pretrained(assets["rm"]).eval()
    seen = set()
    for row, src in zip(rows, source):
        assert detect_format(row) == "steerlm" and row["id"] == src["id"] and row.get("system") == src.get("system")
        turns = [Turn(c["from"].lower(), c["value"]) for c in src["conversations"]]
        for i, c in enumerate(row["conversations"]):
            assert c["value"] == src["conversations"][i]["value"]
            if c["from"] != "Assistant":
                assert "label" not in c
                continue
            ids, _ = render_extra_id(tok, Conversation(turns[:i], src.get("system")), c["value"], end="extra_id")
            with torch.no_grad():
                pred = rm(torch.tensor([ids])).logits[0].tolist()
            levels = [min(4, max(0, math.floor(v + 0.5))) for v in pred]
            assert c["label"] == ",".join(f"{a}:{v}" for a, v in zip(ATTRS, levels)), (pred, c["label"])
            seen.update(levels)
    assert len(seen) >= 3, "the test reward model should spread its predictions"
    # SFT on the labelled file: the label after the assistant header, context (no loss)
    samples = load_dataset(root / "labelled.jsonl", kind="sft", tokenizer=tok, template="extra_id")
    first = rows[0]["conversations"][1]["label"]
    label_ids = tok.encode(f"<extra_id_2>{first}\n")
    toks = samples[0]["tokens"].tolist()
    at = next(k for k in range(len(toks)) if toks[k:k + len(label_ids)] == label_ids)
    assert samples[0]["loss_mask"][at:at + len(label_ids)].sum() == 0


def test_label_errors_name_file_line_and_field(setup):
    root, _, results = setup
    code, err = results[1]
    assert code == 2 and "bad.jsonl:2: conversations[1].from must be 'User' or 'Assistant'" in err, err
    code, err = results[2]
    assert code == 2 and "openai.jsonl:1: format 'openai' cannot be used here" in err, err
    assert not (root / "never.jsonl").exists()


def test_generate_attributes_render_the_training_prompt_part(setup):
    from aligner.data import load_dataset, load_tokenizer
    from aligner.data.formats import steerlm_label

    root, assets, results = setup
    assert results[3][0] == 0, results[3][1]
    rows = [json.loads(line) for line in (root / "steered.jsonl").read_text().splitlines()]
    requested = steerlm_label("helpfulness=4,verbosity=1")
    assert requested == "helpfulness:4,correctness:4,coherence:4,complexity:2,verbosity:1"
    own = "helpfulness:2,correctness:4,coherence:4,complexity:1,verbosity:3"
    assert [r["label"] for r in rows] == [requested, own]
    tok = load_tokenizer(assets["tokenizer"])
    training = _write(root / "train_rows.jsonl", [
        {"system": "be nice", "conversations": [{"from": "User", "value": "say hi there"},
                                               {"from": "Assistant", "value": "hi", "label": requested}]},
        {"conversations": [{"from": "User", "value": "say good bye"},
                           {"from": "Assistant", "value": "bye", "label": own}]},
    ])
    for row, sample in zip(rows, load_dataset(training, kind="sft", tokenizer=tok, template="extra_id")):
        mask = sample["loss_mask"].tolist()
        prompt_part = sample["tokens"][:mask.index(1.0)].tolist()
        assert row["prompt_tokens"] == prompt_part
        assert tok.decode(prompt_part).split()[-2:] == ["<extra_id_2>", row["label"]]  # word-level decoding
    # refused: an attribute turn the raw template cannot render, a level outside 0..4
    code, err = results[4]
    assert code == 2 and "--attributes needs a rendered prompt" in err, err
    code, err = results[5]
    assert code == 2 and "'verbosity=7': the value must be in 0..4" in err, err
    # a misspelt attribute: one line, nothing written; other attributes with no defaults
    code, err = results[6]
    assert code == 2 and "Traceback" not in err, err
    assert ("aligner generate: error: attribute request 'verbosty=0': 'verbosty' is not one of the attributes"
            " helpfulness, correctness, coherence, complexity, verbosity (to condition on other attributes, give no"
            " defaults and name every attribute)") in err.splitlines(), err
    assert not (root / "never.jsonl").exists()
    assert results[7][0] == 0, results[7][1]
    rows = [json.loads(line) for line in (root / "humor.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["humor:3", own]


def test_steerlm_label_requests():
    from aligner.data.formats import steerlm_label

    assert steerlm_label("verbosity:0, complexity=4") == \
        "helpfulness:4,correctness:4,coherence:4,complexity:4,verbosity:0"
    assert steerlm_label("humor=3,helpfulness=1", defaults="") == "helpfulness:1,humor:3"
    assert steerlm_label("humor=3", defaults="helpfulness:2,humor:1") == "helpfulness:2,humor:3"
    for bad in ("helpfulness", "helpfulness=high", "=3", ""):
        with pytest.raises(ValueError, match="attribute request"):
            steerlm_label(bad)
    # a misspelt attribute is refused, not rendered beside the default it meant to change
    with pytest.raises(ValueError, match="'verbosty' is not one of the attributes helpfulness, correctness,"
                                         " coherence, complexity, verbosity"):
        steerlm_label("verbosty=0")
    # an attribute named twice is refused, not silently the last value
    with pytest.raises(ValueError, match="^attribute request 'helpfulness=4,helpfulness=0': 'helpfulness' is named"
                                         " twice$"):
        steerlm_label("helpfulness=4,helpfulness=0")


def test_steerlm2_config_errors_name_the_key():
    from aligner.algorithms.steerlm import SteerLM2Trainer
    from aligner.training.config import ConfigError
    from tests.algorithms.steerlm2_setup import steerlm2_config

    assets = {k: f"/nowhere/{k}" for k in ("steerlm", "prompts", "tokenizer", "sft", "rm")}
    for section, match in (({"targets": ["helpfulness:4,verbosity:9"]}, r"steerlm2.targets\[0\] = .*values 0..4"),
                           ({"samples_per_prompt": 1}, "steerlm2.samples_per_prompt = 1: the weights are a softmax"),
                           ({"iterations": 0}, "steerlm2.iterations = 0: expected >= 1")):
        with pytest.raises(ConfigError, match=match):
            SteerLM2Trainer(steerlm2_config(assets, "/nowhere/out", steerlm2=section))
    with pytest.raises(ConfigError, match="trainer.max_epochs = 3: SteerLM 2.0 runs"):
        SteerLM2Trainer(steerlm2_config(assets, "/nowhere/out", trainer={"max_epochs": 3}))
    trainer = SteerLM2Trainer(steerlm2_config(assets, "/nowhere/out", steerlm2={"iterations": 3, "epochs": 2}))
    assert trainer.cfg.trainer.max_epochs == 6


def test_steerlm2_targets_name_outputs_of_the_reward_model(setup):
    from aligner.algorithms.steerlm import SteerLM2Trainer
    from aligner.training.config import ConfigError
    from tests.algorithms.steerlm2_setup import steerlm2_config

    root, assets, _ = setup
    cfg = steerlm2_config(assets, str(root / "never"), steerlm2={"targets": ["humor:4"]})
    with pytest.raises(ConfigError, match=r"^steerlm2.targets\[0\] = 'humor:4': humor is not an output of"
                                          r" steerlm2.reward_model \(helpfulness, correctness, coherence,"):
        SteerLM2Trainer(cfg).check_data_rows()
    SteerLM2Trainer(steerlm2_config(assets, str(root / "never"))).check_data_rows()
