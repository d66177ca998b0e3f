"""KTO's rows through the data layer (kind ``unpaired``), token for token with the ``raw``
template: labelled prompt/completion rows, the conversation forms (the last assistant turn
is the rated response, earlier ones are prompt), pair files split in two; a missing or
ill-typed ``label`` is a one-line error naming file:line; the mismatched sequences of a
step built by hand; the ``kto`` section's values checked when the config is composed (the
command line itself runs in tests/algorithms/test_kto_against_trl.py's job)."""
import pytest

from aligner.data import load_dataset, load_tokenizer
from aligner.data.datasets import DataFormatError
from tests.algorithms.conftest import write_jsonl


def _ids(vocab, text):
    return [vocab[w] for w in text.split()]


def test_unpaired_rows_and_pairs_split(tiny_hf, tmp_path):
    v, tok = tiny_hf["vocab"], load_tokenizer(tiny_hf["dir"])
    eos = v["</s>"]
    rows = [{"prompt": "tell me a story", "completion": "once upon a time", "label": True},
            {"prompt": "is it a dog", "response": "no", "label": False},
            {"conversations": [{"from": "User", "value": "is it a cat"}, {"from": "Assistant", "value": "yes"},
                               {"from": "User", "value": "is it a dog"}, {"from": "Assistant", "value": "no"}],
             "label": False},
            {"messages": [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": "a story"}],
             "label": True}]
    data = load_dataset(write_jsonl(tmp_path / "u.jsonl", rows), kind="unpaired", tokenizer=tok, template="raw")
    assert len(data) == 4 and [s["labels"].tolist() for s in data] == [[True], [False], [False], [True]]
    (tokens, mask), = data[0]["responses"]
    assert tokens.tolist() == _ids(v, "tell me a story once upon a time") + [eos]
    assert mask.tolist() == [0.0] * 4 + [1.0] * 5
    (tokens, mask), = data[2]["responses"]
    # raw joins earlier turns into the prompt the HelpSteer2 way; only the last answer is a target
    assert tokens.tolist()[-2:] == [v["no"], eos] and mask.tolist().count(1.0) == 2 and mask[-2:].tolist() == [1, 1]
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "tell me a story", "chosen": "once upon a time",
                                                "rejected": "no"}])
    (s,) = load_dataset(pairs, kind="unpaired", tokenizer=tok, template="raw")
    assert s["labels"].tolist() == [True, False]
    assert [t.tolist() for t, _ in s["responses"]] == [_ids(v, "tell me a story once upon a time") + [eos],
                                                       _ids(v, "tell me a story no") + [eos]]


@pytest.mark.parametrize("row,message", [
    ({"prompt": "hi", "completion": "a"}, r"u.jsonl:2: missing field 'label' \(true: a desirable response"),
    ({"prompt": "hi", "completion": "a", "label": "yes"},
     r"u.jsonl:2: field 'label' must be true \(desirable\) or false \(undesirable\), got 'yes'"),
    ({"prompt": "hi", "completion": "a", "label": 1}, r"u.jsonl:2: field 'label' must be true .* got 1"),
    ({"prompt": "hi", "completion": "a", "label": None}, r"u.jsonl:2: field 'label' must be true .* got None"),
    ({"messages": [{"role": "user", "content": "a"}], "label": True},
     r"u.jsonl:2: the last of 'messages' must be the assistant message the label rates"),
])
def test_bad_labels_name_file_and_line(tiny_hf, tmp_path, row, message):
    from aligner.data.loading import check_dataset

    good = {"prompt": "hi", "completion": "a", "label": True}
    f = write_jsonl(tmp_path / "u.jsonl", [good, row])
    with pytest.raises(DataFormatError, match=message):
        check_dataset(f, "unpaired")
    if "label" not in row:  # a file without labels: its first row names the format, and the error
        with pytest.raises(DataFormatError, match=message.replace(":2:", ":1:")):
            check_dataset(write_jsonl(tmp_path / "u.jsonl", [row, good]), "unpaired")


def test_a_label_decides_the_format_only_when_boolean(tiny_hf, tmp_path):
    from aligner.data.loading import check_dataset

    v, tok = tiny_hf["vocab"], load_tokenizer(tiny_hf["dir"])
    # an SFT file whose rows carry a 'label' of their own (a topic): prompt and completion rows, read as SFT
    topical = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "tell me a story", "completion": "once upon a time",
                                                  "label": "stories"}])
    (s,) = load_dataset(topical, kind="sft", tokenizer=tok, template="raw")
    assert s["tokens"].tolist() == _ids(v, "tell me a story once upon a time") + [v["</s>"]]
    # ... which KTO refuses, naming the line and the field
    with pytest.raises(DataFormatError, match=r"s.jsonl:1: field 'label' must be true \(desirable\) or false"
                                              r" \(undesirable\), got 'stories'"):
        check_dataset(topical, "unpaired")
    # skipping bad rows, the refused first row does not decide the format of the rows after it
    good = {"prompt": "is it a dog", "completion": "no", "label": False}
    mixed = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "completion": "b", "label": "stories"}, good])
    (u,) = load_dataset(mixed, kind="unpaired", tokenizer=tok, template="raw", skip_invalid=True)
    assert u["labels"].tolist() == [False]
    # a boolean label is KTO's: an SFT run would train on the undesirable responses, so it is refused
    marked = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "is it a dog", "completion": "no", "label": False}])
    with pytest.raises(DataFormatError, match=r"m.jsonl:1: field 'label' = False marks the row as format 'unpaired'"
                                              r" .* remove the field to read the row as 'prompt_completion'"):
        check_dataset(marked, "sft")
    (u,) = load_dataset(marked, kind="unpaired", tokenizer=tok, template="raw")
    assert u["labels"].tolist() == [False]


def test_mismatched_sequences_of_a_step(tiny_hf, tmp_path):
    from aligner.algorithms.kto import KTOAlgorithm

    v, tok = tiny_hf["vocab"], load_tokenizer(tiny_hf["dir"])
    rows = [{"prompt": "tell me a story", "chosen": "once upon a time", "rejected": "no"},
            {"prompt": "is it a dog", "chosen": "yes", "rejected": "maybe a cat"}]
    data = load_dataset(write_jsonl(tmp_path / "p.jsonl", rows), kind="unpaired", tokenizer=tok, template="raw")
    batch = [data[1], data[0]]  # the step's order; data order decides the rotation
    kl = KTOAlgorithm(0).mismatched(batch)
    # data order: c0 c1... rows (x0,c0) (x0,r0) (x1,c1) (x1,r1); each takes the completion of the
    # nearest row before it with another prompt: c0 <- r1, r0 <- r1 (c0 shares x0), c1 <- r0, r1 <- r0
    story, dog, eos = _ids(v, "tell me a story"), _ids(v, "is it a dog"), v["</s>"]
    want0 = [story + _ids(v, "maybe a cat") + [eos], story + _ids(v, "maybe a cat") + [eos]]
    want1 = [dog + [v["no"], eos], dog + [v["no"], eos]]
    assert [t.tolist() for t, _ in kl[1]["responses"]] == want0 and kl[1]["kl_pos"].tolist() == [0, 1]
    assert [t.tolist() for t, _ in kl[0]["responses"]] == want1 and kl[0]["kl_pos"].tolist() == [2, 3]
    assert kl[0]["responses"][0][1].tolist() == [0.0] * 4 + [1.0, 1.0]


def test_kto_config_values_are_checked_when_composed():
    from aligner.cli.train import compose
    from aligner.config import ConfigError

    trainer_cls, cfg = compose("kto", ["init.hf=sft/hf", "data.train=u.jsonl", "kto.beta=0.2", "kto.reference=resident"])
    assert trainer_cls.__name__ == "KTOTrainer" and (cfg.kto.beta, str(cfg.kto.reference)) == (0.2, "resident")
    for override, message in (("kto.undesirable_weight=0", r"kto.undesirable_weight = 0(\.0)?: expected > 0"),
                              ("kto.beta=-1", r"kto.beta = -1(\.0)?: expected > 0"),
                              ("kto.sft_weight=-1", r"kto.sft_weight = -1(\.0)?: expected >= 0"),
                              ("kto.reference=model", "kto.reference"),
                              ("data.packing=true", "data.packing = true: KTO")):
        with pytest.raises(ConfigError, match=message):
            trainer_cls(compose("kto", ["init.hf=sft/hf", "data.train=u.jsonl", override])[1])


def test_data_stats_counts_responses_and_labels(tiny_hf, tmp_path, capsys):
    import json

    from aligner.cli.data import main

    rows = [{"prompt": "tell me a story", "completion": "once upon a time", "label": True},
            {"prompt": "is it a dog", "completion": "no", "label": False},
            {"prompt": "is it a cat", "completion": "yes", "label": True}]
    assert main(["stats", write_jsonl(tmp_path / "u.jsonl", rows), "--tokenizer", str(tiny_hf["dir"]),
                 "--template", "raw"]) == 0
    report = json.loads(capsys.readouterr().out)
    # 4 + 4 + 1, 4 + 1 + 1, 4 + 1 + 1 tokens
    assert (report["kind"], report["responses"], report["desirable"]) == ("unpaired", 3, 2)
    assert report["token_length"]["p100"] == 9 and report["token_length"]["p50"] == 6


def test_weight_advice_follows_the_papers_ratio():
    from aligner.algorithms.kto import weight_advice

    # 300 desirable, 100 undesirable, λ 1 / 1: ratio 3; λ_D in [100/300, (4/3)·100/300], λ_U in [300/(4/3·100), 3]
    advice = weight_advice(300, 100, 1.0, 1.0)
    assert "= 3, outside the paper's [1, 4/3]" in advice
    assert "kto.desirable_weight in [0.333, 0.444]" in advice and "kto.undesirable_weight in [2.25, 3]" in advice
    assert weight_advice(300, 100, 1.0, 2.5) is None  # 300 / 250 = 1.2
    assert weight_advice(100, 100, 1.0, 1.0) is None and weight_advice(5, 0, 1.0, 1.0) is None
