"""Pair rows through the data layer: the ``raw`` template token for token, the optional pair
fields on the sample (``margin``, ``reward_gap``), packing-aware sizing of pairs, number
checks with file:line, and ``aligner data stats`` / ``pack`` counting pairs as pairs."""
import json

import pytest

from aligner.data import load_dataset, load_tokenizer
from aligner.data.datasets import DataFormatError
from tests.algorithms.conftest import write_jsonl


def _ids(vocab, text):
    return [vocab[w] for w in text.split()]


def test_raw_template_is_prompt_response_eos(tiny_hf, tmp_path):
    v, tok = tiny_hf["vocab"], load_tokenizer(tiny_hf["dir"])
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "tell me a story", "chosen": "once upon a time",
                                            "rejected": "no", "margin": 2.5, "chosen_reward": 3, "rejected_reward": 1}])
    s = load_dataset(f, kind="pairs", tokenizer=tok, template="raw")[0]
    prompt = _ids(v, "tell me a story")
    assert s["chosen"].tolist() == prompt + _ids(v, "once upon a time") + [v["</s>"]]
    assert s["rejected"].tolist() == prompt + [v["no"], v["</s>"]]
    assert s["chosen_loss_mask"].tolist() == [0.0] * 4 + [1.0] * 5
    assert s["rejected_loss_mask"].tolist() == [0.0] * 4 + [1.0] * 2
    assert (s["margin"], s["reward_gap"], s["strength"]) == (2.5, 2.0, 1.0)
    plain = load_dataset(write_jsonl(tmp_path / "q.jsonl", [{"prompt": "hi", "chosen": "a", "rejected": "no"}]),
                         kind="pairs", tokenizer=tok, template="raw")[0]
    assert plain["margin"] is None and plain["reward_gap"] is None  # absent fields stay absent


def test_raw_template_sft_and_prompts(tiny_hf, tmp_path):
    v, tok = tiny_hf["vocab"], load_tokenizer(tiny_hf["dir"])
    f = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "User", "value": "tell me"},
                                                               {"from": "Assistant", "value": "no"}]}])
    s = load_dataset(f, kind="sft", tokenizer=tok, template="raw")[0]
    assert s["tokens"].tolist() == _ids(v, "tell me no") + [v["</s>"]]
    assert s["loss_mask"].tolist() == [0.0, 0.0, 1.0, 1.0]
    p = load_dataset(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "tell me a story"}]), kind="prompts",
                     tokenizer=tok, template="raw")[0]
    assert p["prompt_tokens"].tolist() == _ids(v, "tell me a story")
    bad = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "hi", "chosen": "a", "rejected": "no"},
                                             {"system": "be", "prompt": "hi", "chosen": "a", "rejected": "no"}])
    with pytest.raises(DataFormatError, match=r"b.jsonl:2: field 'system' is set, but data.template = raw"):
        load_dataset(bad, kind="pairs", tokenizer=tok, template="raw")


def test_pair_numbers_are_checked_with_file_and_line(tiny_hf, tmp_path):
    tok = load_tokenizer(tiny_hf["dir"])
    row = {"prompt": "hi", "chosen": "a", "rejected": "no"}
    for extra, message in (({"margin": "3"}, "field 'margin' must be a finite number"),
                           ({"chosen_reward": 3}, "field 'chosen_reward' is given without 'rejected_reward'"),
                           ({"strength": True}, "field 'strength' must be a finite number")):
        f = write_jsonl(tmp_path / "x.jsonl", [row, dict(row, **extra)])
        with pytest.raises(DataFormatError, match=f"x.jsonl:2: {message}"):
            load_dataset(f, kind="pairs", tokenizer=tok, template="raw")


def test_packing_sizes_pairs_as_pairs(tiny_hf, tmp_path):
    v, tok = tiny_hf["vocab"], load_tokenizer(tiny_hf["dir"])
    # prompt 8 tokens; chosen 8 + 1 + EOS = 10, rejected 8 + 3 + EOS = 12: 22 together
    rows = [{"prompt": "what is the sum of two and three", "chosen": "five", "rejected": "four i think"}]
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    whole = load_dataset(f, kind="pairs", tokenizer=tok, template="raw", max_length=16)[0]
    assert (len(whole["chosen"]), len(whole["rejected"])) == (10, 12)  # each fits 16: unchanged without packing
    pairs = load_dataset(f, kind="pairs", tokenizer=tok, template="raw", max_length=16, packing=True)
    s = pairs[0]
    assert len(s["chosen"]) + len(s["rejected"]) == 16 and pairs.report["truncated_left_pair"] == 1
    # 6 tokens over: 3 prompt tokens from the left of each; the responses are whole
    assert s["chosen"].tolist() == whole["chosen"].tolist()[3:]
    assert s["rejected"].tolist() == whole["rejected"].tolist()[3:]
    assert s["rejected_loss_mask"].tolist() == [0.0] * 5 + [1.0] * 4
    with pytest.raises(DataFormatError, match=r"no usable samples \({'dropped_overlong_pair': 1}\)"):
        load_dataset(f, kind="pairs", tokenizer=tok, template="raw", max_length=16, packing=True, overlong="drop")
    # the responses alone need 4 + 2 tokens: 12 tokens of prompt room is not enough for max_length 5
    with pytest.raises(DataFormatError, match="no usable samples"):
        load_dataset(f, kind="pairs", tokenizer=tok, template="raw", max_length=5, packing=True)


def test_data_stats_and_pack_count_pairs_as_pairs(tiny_hf, tmp_path, capsys):
    from aligner.cli.data import main

    rows = [{"prompt": "what is the sum of two and three", "chosen": "five", "rejected": "four i think"},
            {"prompt": "tell me a story", "chosen": "once upon a time", "rejected": "no"}]
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    args = [f, "--tokenizer", str(tiny_hf["dir"]), "--template", "raw"]
    assert main(["stats"] + args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairs"] == 2 and report["kind"] == "pairs"
    assert report["token_length"]["chosen"]["p100"] == 10 and report["token_length"]["rejected"]["p100"] == 12
    assert report["token_length"]["pair"]["p100"] == 22 and report["token_length"]["pair"]["p50"] == 15
    assert main(["pack"] + args + ["--capacity", "32"]) == 0
    pack = json.loads(capsys.readouterr().out)["pack"]
    # pairs of 22 and 15 tokens: two bins of 32; unpacked, each pair is 2 padded rows
    assert (pack["pairs"], pack["bins"], pack["padded_rows_without_packing"]) == (2, 2, 4)
    assert pack["efficiency"] == round(37 / 64, 4)
    assert main(["pack"] + args + ["--capacity", "16"]) == 1
    assert "needs --capacity >= 22" in capsys.readouterr().err
