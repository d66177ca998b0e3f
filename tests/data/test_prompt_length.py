"""Prompt files under the over-length policy (``data.overlong``), on hand-built files whose
token ids are known word by word: the rows kept, dropped and truncated, the exact tokens a
truncated prompt keeps (its end), the counts reported and the refusal's text; the same
``error`` value for SFT data; prepared prompt folders against the use's length."""
import json

import pytest

from aligner.data import DataFormatError, load_dataset, load_tokenizer

# (words of the prompt, their count): raw template, so a prompt's tokens are its words
ROWS = ["hi there", "hi there hello friend", "what is 2", "be nice good bad ok"]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ids(vocab, text):
    return [vocab[w] for w in text.split()]


def _counts(data):
    """The load report without the cache folder's name."""
    return {k: v for k, v in data.report.items() if k != "prepared"}


def _report_lines(err):
    """The report lines of stderr (the cache's "preparing" lines left out)."""
    return [line for line in err.splitlines() if not line.startswith("aligner data: preparing")]


@pytest.fixture
def prompt_file(tmp_path):
    return _write(tmp_path / "prompts.jsonl", [{"prompt": p, "id": i} for i, p in enumerate(ROWS)])


def test_truncate_left_keeps_each_long_prompts_last_tokens(prompt_file, word_tokenizer, capsys):
    v, tok = word_tokenizer["vocab"], load_tokenizer(word_tokenizer["plain"])
    data = load_dataset(prompt_file, kind="prompts", tokenizer=tok, template="raw", max_length=3,
                        overlong="truncate_left")
    assert [s["prompt_tokens"].tolist() for s in data] == [
        _ids(v, "hi there"), _ids(v, "there hello friend"), _ids(v, "what is 2"), _ids(v, "good bad ok")]
    # the rest of the sample is the row's: its text and fields, whole
    assert [s["prompt"] for s in data] == ROWS and [s["meta"]["id"] for s in data] == [0, 1, 2, 3]
    assert _counts(data) == {"file": str(prompt_file), "kind": "prompts", "samples": 4, "truncated_left": 2}
    assert _report_lines(capsys.readouterr().err) == [f"aligner data: {prompt_file}: 4 samples; truncated_left: 2"]


def test_drop_skips_long_prompts_counted_and_reported(prompt_file, word_tokenizer, capsys):
    v, tok = word_tokenizer["vocab"], load_tokenizer(word_tokenizer["plain"])
    data = load_dataset(prompt_file, kind="prompts", tokenizer=tok, template="raw", max_length=3, overlong="drop")
    assert [s["prompt_tokens"].tolist() for s in data] == [_ids(v, "hi there"), _ids(v, "what is 2")]
    assert [data.where(i) for i in range(len(data))] == [f"{prompt_file}:1", f"{prompt_file}:3"]
    assert _counts(data) == {"file": str(prompt_file), "kind": "prompts", "samples": 2, "dropped_overlong": 2}
    assert _report_lines(capsys.readouterr().err) == [f"aligner data: {prompt_file}: 2 samples; dropped_overlong: 2"]


def test_error_refuses_the_first_long_prompt_naming_file_line_and_lengths(prompt_file, word_tokenizer):
    tok = load_tokenizer(word_tokenizer["plain"])
    with pytest.raises(DataFormatError) as err:
        load_dataset(prompt_file, kind="prompts", tokenizer=tok, template="raw", max_length=3, overlong="error")
    assert str(err.value) == (f"{prompt_file}:2: the prompt has 4 tokens, more than max_length = 3 (overlong ="
                              " error; truncate_left or drop would fit the row)")
    # every prompt fits: nothing is cut, nothing reported
    data = load_dataset(prompt_file, kind="prompts", tokenizer=tok, template="raw", max_length=5, overlong="error")
    assert len(data) == 4 and _counts(data) == {"file": str(prompt_file), "kind": "prompts", "samples": 4}


def test_a_templated_prompt_keeps_its_end_the_assistant_header(tmp_path, word_tokenizer):
    v, tok = word_tokenizer["vocab"], load_tokenizer(word_tokenizer["plain"])
    f = _write(tmp_path / "p.jsonl", [{"system": "be nice", "prompt": "hi there hello"}])
    whole = ["<extra_id_0>", "System", "be", "nice", "<extra_id_1>", "User", "hi", "there", "hello",
             "<extra_id_1>", "Assistant"]
    full = load_dataset(f, kind="prompts", tokenizer=tok, template="extra_id", max_length=11, overlong="error")[0]
    assert full["prompt_tokens"].tolist() == [v[w] for w in whole]
    cut = load_dataset(f, kind="prompts", tokenizer=tok, template="extra_id", max_length=5,
                       overlong="truncate_left")[0]
    assert cut["prompt_tokens"].tolist() == [v[w] for w in whole[-5:]]  # there hello <extra_id_1> Assistant
    assert cut["conversation"].turns[0].content == "hi there hello"  # the conversation stays whole


def test_sft_data_takes_the_error_value_too(tmp_path, word_tokenizer):
    tok = load_tokenizer(word_tokenizer["plain"])
    f = _write(tmp_path / "sft.jsonl", [
        {"system": "be", "conversations": [{"from": "User", "value": "hi"}, {"from": "Assistant", "value": "ok"}]},
        {"system": "be nice", "conversations": [{"from": "User", "value": "hi there hi there"},
                                                 {"from": "Assistant", "value": "hello"}]}])
    # row 1: <extra_id_0> System be <extra_id_1> User hi <extra_id_1> Assistant ok </s> = 10 tokens;
    # row 2: 4 + 2 + 4 + 2 + 1 + 1 = 14 tokens
    with pytest.raises(DataFormatError) as err:
        load_dataset(f, kind="sft", tokenizer=tok, template="extra_id", max_length=10, overlong="error")
    assert str(err.value) == (f"{f}:2: the sample has 14 tokens, more than max_length = 10 (overlong = error;"
                              " truncate_left or drop would fit the row)")


def test_a_prepared_prompt_folder_serves_a_length_its_prompts_fit(prompt_file, word_tokenizer, tmp_path):
    from aligner.data.prepare import prepare_dataset

    tok = load_tokenizer(word_tokenizer["plain"])
    folder = tmp_path / "prepared"
    prepare_dataset([prompt_file], folder, "prompts", tok, template="raw", max_length=4096)
    # nothing was cut and the longest prompt (5 tokens) fits 5: the same samples as a fresh read
    data = load_dataset(folder, kind="prompts", tokenizer=tok, template="raw", max_length=5, overlong="error")
    assert [s["prompt_tokens"].numel() for s in data] == [2, 4, 3, 5]
    # 4 would cut or refuse a prompt: the folder was not prepared for that
    with pytest.raises(DataFormatError, match=r"prepared with max_length = 4096; this use asks for 4: prepare it"
                                              r" again with --max-length 4"):
        load_dataset(folder, kind="prompts", tokenizer=tok, template="raw", max_length=4, overlong="drop")
    # a folder that cut prompts cannot serve a use that reads them whole (and fits them itself)
    from aligner.data.datasets import NO_BOUND

    cut = tmp_path / "cut"
    prepare_dataset([prompt_file], cut, "prompts", tok, template="raw", max_length=3, overlong="truncate_left")
    with pytest.raises(DataFormatError) as err:
        load_dataset(cut, kind="prompts", tokenizer=tok, template="raw", max_length=NO_BOUND, overlong="error")
    assert str(err.value) == (f"{cut}: prepared with max_length = 3, which cut or dropped prompts ({{'truncated_left':"
                              " 2}); this use reads the prompts whole and fits them itself: prepare it again with a"
                              " --max-length every prompt fits, or give the source file")


def test_every_place_that_sets_the_policy_offers_the_same_values(capsys):
    """data.overlong, aligner data prepare --overlong and aligner generate --overlong."""
    from aligner.cli.data import main as data_main
    from aligner.cli.generate import build_parser as generate_parser
    from aligner.data.datasets import OVERLONG
    from aligner.training.config import Overlong

    assert [o.value for o in Overlong] == list(OVERLONG)
    action = next(a for a in generate_parser()._actions if a.dest == "overlong")
    assert set(action.choices) == set(OVERLONG)
    with pytest.raises(SystemExit):
        data_main(["prepare", "x.jsonl", "--out", "o", "--tokenizer", "t", "--overlong", "cut"])
    listed = capsys.readouterr().err.split("invalid choice: 'cut' (choose from ")[1].split(")")[0]
    assert sorted(c.strip(" '") for c in listed.split(",")) == sorted(OVERLONG)
