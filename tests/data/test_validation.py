"""Malformed inputs: every one fails with file:line and the field; skip_invalid counts them."""
import json

import pytest

from aligner.data import DataFormatError, load_dataset, load_tokenizer
from aligner.data.datasets import read_rows

HS2 = {"prompt": "hi", "response": "hello", "helpfulness": 3, "correctness": 3, "coherence": 4, "complexity": 1,
       "verbosity": 1}
PREF = {"split": "train", "prompt": "hi", "response_1": "hello", "response_2": "bye", "preference_strength": 1}
PAIR = {"prompt": "hi", "chosen": "hello", "rejected": "bye"}
RB = dict(PAIR, subset="alpacaeval-easy", id=1)
SFT = {"system": "be nice", "conversations": [{"from": "User", "value": "hi"}, {"from": "Assistant", "value": "hello"}]}
OA = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _drop(d, k):
    return {x: y for x, y in d.items() if x != k}


def _conv(**turn):
    return dict(SFT, conversations=[{"from": "User", "value": "hi"}, dict({"from": "Assistant", "value": "ok"}, **turn)])


# (format, good row, bad line (dict, or raw str / bytes), text the message must contain)
CASES = [
    ("helpsteer2", HS2, _drop(HS2, "prompt"), "'prompt'"),
    ("helpsteer2", HS2, dict(HS2, prompt=""), "'prompt' is empty"),
    ("helpsteer2", HS2, dict(HS2, prompt=123), "'prompt' must be a string"),
    ("helpsteer2", HS2, _drop(HS2, "response"), "'response'"),
    ("helpsteer2", HS2, dict(HS2, response="   "), "'response' is empty"),
    ("helpsteer2", HS2, dict(HS2, helpfulness=5), "'helpfulness' = 5 is outside 0..4"),
    ("helpsteer2", HS2, dict(HS2, helpfulness=-1), "'helpfulness' = -1 is outside 0..4"),
    ("helpsteer2", HS2, dict(HS2, correctness=2.5), "'correctness' must be an integer"),
    ("helpsteer2", HS2, dict(HS2, coherence="3"), "'coherence' must be an integer"),
    ("helpsteer2", HS2, dict(HS2, verbosity=True), "'verbosity' must be an integer"),
    ("helpsteer2", HS2, {"prompt": "hi", "response": "x"}, "no attribute rating"),
    ("helpsteer2", HS2, dict(HS2, prompt="another prompt"), "must share their prompt"),
    ("helpsteer2_preference", PREF, _drop(PREF, "response_2"), "'response_2'"),
    ("helpsteer2_preference", PREF, dict(PREF, preference_strength=4), "'preference_strength' = 4 is outside -3..3"),
    ("helpsteer2_preference", PREF, dict(PREF, preference_strength=-4), "outside -3..3"),
    ("helpsteer2_preference", PREF, dict(PREF, preference_strength="2"), "'preference_strength' must be an integer"),
    ("helpsteer2_preference", PREF, dict(PREF, preference_strength=1.5), "'preference_strength' must be an integer"),
    ("helpsteer2_preference", PREF, _drop(PREF, "preference_strength"), "missing field 'preference_strength'"),
    ("helpsteer2_preference", PREF, dict(PREF, response_1=""), "'response_1' is empty"),
    ("pairwise", PAIR, _drop(PAIR, "chosen"), "'chosen'"),
    ("pairwise", PAIR, dict(PAIR, rejected=""), "'rejected' is empty"),
    ("pairwise", PAIR, dict(PAIR, chosen=["a"]), "'chosen' must be a string"),
    ("rewardbench", RB, _drop(RB, "subset"), "missing field 'subset'"),
    ("rewardbench", RB, dict(RB, subset=""), "'subset' is empty"),
    ("sft", SFT, _drop(SFT, "conversations"), "'conversations' must be a non-empty list"),
    ("sft", SFT, dict(SFT, conversations=[]), "'conversations' must be a non-empty list"),
    ("sft", SFT, _conv(**{"from": "Robot"}), "conversations[1].from must be 'User' or 'Assistant'"),
    ("sft", SFT, _conv(value=""), "conversations[1]: field 'value' is empty"),
    ("sft", SFT, dict(SFT, conversations=[{"from": "User", "value": "hi"}]), "no Assistant turn"),
    ("sft", SFT, dict(SFT, conversations=["hi"]), "conversations[0] must be an object"),
    ("sft", SFT, dict(SFT, system=5), "'system' must be a string"),
    ("openai", OA, {"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role must be"),
    ("openai", OA, {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "messages[0]: missing field 'content'"),
    ("openai", OA, {"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ("helpsteer2", HS2, '{"prompt": "hi", "response": ', "not valid JSON"),
    ("helpsteer2", HS2, "[1, 2, 3]", "expected a JSON object"),
    ("helpsteer2", HS2, b'{"prompt": "\xff\xfe", "response": "x"}', "not valid UTF-8"),
    ("prompt", {"prompt": "hi"}, {"prompt": ""}, "'prompt' is empty"),
]


def _write(path, good, bad):
    lines = [json.dumps(good).encode(), json.dumps(good).encode()]
    lines.append(bad if isinstance(bad, bytes) else (bad if isinstance(bad, str) else json.dumps(bad)).encode())
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_corpus_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("fmt,good,bad,expected", CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_malformed_row_names_file_line_and_field(tmp_path, fmt, good, bad, expected):
    if "share their prompt" in expected:  # the second row of a HelpSteer2 pair: line 4
        path = tmp_path / "bad.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in (good, good, good, bad)))
        line = 4
    else:
        path = _write(tmp_path / "bad.jsonl", good, bad)
        line = 3
    with pytest.raises(DataFormatError) as err:
        list(read_rows(path, fmt))
    msg = str(err.value)
    assert f"{path}:{line}" in msg and expected in msg, msg


def test_skip_invalid_reports_counts(tmp_path, word_tokenizer):
    tok = load_tokenizer(word_tokenizer["plain"])
    rows = [json.dumps(PAIR), json.dumps(dict(PAIR, chosen="")), json.dumps(PAIR), "{broken",
            json.dumps(dict(PAIR, rejected="")), json.dumps(PAIR)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataFormatError, match=rf"{path}:2: field 'chosen' is empty"):
        load_dataset(path, kind="pairs", tokenizer=tok)
    samples = load_dataset(path, kind="pairs", tokenizer=tok, skip_invalid=True)
    assert len(samples) == 3
    report = samples.report
    assert report["invalid: field 'chosen' is empty"] == 1
    assert report["invalid: field 'rejected' is empty"] == 1
    assert report["invalid: not valid JSON"] == 1
    assert report["samples"] == 3


def test_wrong_kind_of_file_is_an_error_even_with_skip_invalid(tmp_path, word_tokenizer):
    tok = load_tokenizer(word_tokenizer["plain"])
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(PAIR) + "\n")
    with pytest.raises(DataFormatError, match="format 'pairwise' cannot be used here"):
        load_dataset(path, kind="sft", tokenizer=tok, skip_invalid=True)
