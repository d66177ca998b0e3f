"""Rows as the public datasets write them -> the exact token / label / mask tensors."""
import json

import torch

from aligner.data import load_dataset, load_tokenizer
from aligner.data.datasets import DEFAULT_SYSTEM


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ids(vocab, words):
    return [vocab[w] for w in words]


def test_sft_extra_id_template(tmp_path, word_tokenizer):
    v = word_tokenizer["vocab"]
    tok = load_tokenizer(word_tokenizer["plain"])
    f = _write(tmp_path / "sft.jsonl", [{"system": "be nice", "mask": "User", "type": "TEXT_TO_VALUE",
                                         "conversations": [{"from": "User", "value": "hi there"},
                                                           {"from": "Assistant", "value": "hello friend"}]}])
    s = load_dataset(f, kind="sft", tokenizer=tok, template="extra_id")[0]
    words = ["<extra_id_0>", "System", "be", "nice", "<extra_id_1>", "User", "hi", "there", "<extra_id_1>",
             "Assistant", "hello", "friend", "</s>"]
    assert s["tokens"].tolist() == _ids(v, words)
    assert s["loss_mask"].tolist() == [0.0] * 10 + [1.0] * 3


def test_helpsteer2_multi_turn_row(tmp_path, word_tokenizer):
    v = word_tokenizer["vocab"]
    tok = load_tokenizer(word_tokenizer["plain"])
    prompt = "hi\n<extra_id_1>Assistant\nhello\n<extra_id_1>User\nbye"  # as HelpSteer2 joins turns
    row = {"prompt": prompt, "response": "fine", "helpfulness": 3, "correctness": 4, "coherence": 4,
           "complexity": 1, "verbosity": 0}
    f = _write(tmp_path / "hs2.jsonl", [row, dict(row, response="ok", helpfulness=1)])
    s = load_dataset(f, kind="regression", tokenizer=tok)
    words = (["<extra_id_0>", "System"] + DEFAULT_SYSTEM.split() + ["<extra_id_1>", "User", "hi", "<extra_id_1>",
             "Assistant", "hello", "<extra_id_1>", "User", "bye", "<extra_id_1>", "Assistant", "fine", "<extra_id_2>"])
    assert s[0]["tokens"].tolist() == _ids(v, words)
    assert s[0]["labels"].tolist() == [3.0, 4.0, 4.0, 1.0, 0.0]
    assert s[0]["label_mask"].tolist() == [1.0] * 5
    assert s[1]["labels"][0].item() == 1.0 and s[1]["tokens"][-2].item() == v["ok"]
    nine = load_dataset(f, kind="regression", tokenizer=tok,
                        attributes=["quality", "toxicity", "humor", "creativity", "helpfulness", "correctness",
                                    "coherence", "complexity", "verbosity"])
    assert nine[0]["label_mask"].tolist() == [0.0] * 4 + [1.0] * 5  # never-labelled outputs are masked
    assert nine[0]["labels"][4:].tolist() == [3.0, 4.0, 4.0, 1.0, 0.0]


def test_helpsteer2_preference_pairs(tmp_path, word_tokenizer):
    v = word_tokenizer["vocab"]
    tok = load_tokenizer(word_tokenizer["plain"])
    rows = [
        {"split": "train", "prompt": "what is 2", "response_1": "good", "response_2": "bad", "preference_strength": -2},
        {"split": "train", "prompt": "what is 2", "response_1": "bad", "response_2": "good", "preference_strength": 3},
        {"split": "train", "prompt": "what is 2", "response_1": "ok", "response_2": "fine", "preference_strength": 0},
    ]
    s = load_dataset(_write(tmp_path / "pref.jsonl", rows), kind="pairs", tokenizer=tok, template="extra_id")
    assert len(s) == 2 and s.report["dropped_tie"] == 1  # ties dropped, and counted
    head = ["<extra_id_0>", "System"] + DEFAULT_SYSTEM.split() + ["<extra_id_1>", "User", "what", "is", "2",
                                                                    "<extra_id_1>", "Assistant"]
    assert s[0]["chosen"].tolist() == _ids(v, head + ["good", "<extra_id_2>"])
    assert s[0]["rejected"].tolist() == _ids(v, head + ["bad", "<extra_id_2>"])
    assert s[0]["chosen_loss_mask"].tolist() == [0.0] * len(head) + [1.0, 1.0]
    assert (s[0]["strength"], s[1]["strength"]) == (2.0, 3.0)
    assert s[1]["chosen"].tolist() == s[0]["chosen"].tolist()  # response_2 better when strength > 0


def test_rewardbench_rows(tmp_path, word_tokenizer):
    tok = load_tokenizer(word_tokenizer["plain"])
    rows = [{"prompt": "hi", "chosen": "hello", "rejected": "bye", "subset": "alpacaeval-easy", "id": 7,
             "chosen_model": "a", "rejected_model": "b"}]
    s = load_dataset(_write(tmp_path / "rb.jsonl", rows), kind="pairs", tokenizer=tok, template="extra_id")[0]
    assert s["subset"] == "alpacaeval-easy" and s["strength"] == 1.0


def test_openai_messages_with_chat_template(tmp_path, word_tokenizer):
    v = word_tokenizer["vocab"]
    tok = load_tokenizer(word_tokenizer["chat"])
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "bye"}, {"role": "assistant", "content": "fine"}]}]
    s = load_dataset(_write(tmp_path / "oa.jsonl", rows), kind="sft", tokenizer=tok, template="chat")[0]
    words = ["<user>", "hi", "<assistant>", "hello", "<user>", "bye", "<assistant>", "fine"]
    assert s["tokens"].tolist() == _ids(v, words)
    assert s["loss_mask"].tolist() == [0, 0, 0, 1, 0, 0, 0, 1]


def test_prompts_and_overlength_policies(tmp_path, word_tokenizer):
    tok = load_tokenizer(word_tokenizer["plain"])
    f = _write(tmp_path / "sft.jsonl", [{"system": "be nice", "conversations": [
        {"from": "User", "value": "hi there hi there"}, {"from": "Assistant", "value": "hello"}]},
        {"system": "be", "conversations": [{"from": "User", "value": "hi"}, {"from": "Assistant", "value": "ok"}]}])
    t = load_dataset(f, kind="sft", tokenizer=tok, template="extra_id", max_length=10, overlong="truncate_left")
    assert len(t) == 2 and t[0]["tokens"].numel() == 10 and t.report["truncated_left"] == 1
    assert t[0]["loss_mask"][-2:].tolist() == [1.0, 1.0]  # the response survives, the prompt lost its left end
    d = load_dataset(f, kind="sft", tokenizer=tok, template="extra_id", max_length=10, overlong="drop")
    assert len(d) == 1 and d.report["dropped_overlong"] == 1
    p = load_dataset(f, kind="prompts", tokenizer=tok, template="extra_id")[0]
    assert p["prompt_tokens"].tolist()[-2:] == [word_tokenizer["vocab"]["<extra_id_1>"], word_tokenizer["vocab"]["Assistant"]]


def test_sentencepiece_tokenizer_round_trips_and_saves_for_hf(tmp_path):
    from transformers import AutoTokenizer

    from aligner.data.tokenizer import train_sentencepiece

    texts = [f"What is {a} plus {b}? The answer is {a + b}." for a in range(30) for b in range(0, 30, 7)]
    model = train_sentencepiece(texts, tmp_path / "tok.model", vocab_size=400)
    tok = load_tokenizer(model)
    for t in ("The answer is 1234.", "Reverse zebra! ümlaut"):
        assert tok.decode(tok.encode(t)) == t  # byte fallback: anything round-trips
    assert tok.encode("<extra_id_1>")[-1] == tok.token_to_id("<extra_id_1>")
    tok.save(tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.encode("The answer is 42.", add_special_tokens=False) == tok.encode("The answer is 42.")
