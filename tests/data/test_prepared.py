"""Prepared datasets against the rows they come from: every kind token for token as the
in-memory reading gives it, the same rows from every file type, the new formats by hand,
the folder's checks, the cache shared by the ranks of a job, and blends."""
import gzip
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from aligner.data import DataFormatError, load_dataset, load_tokenizer, read_samples
from aligner.data.formats import detect_format
from aligner.data.prepare import cache_dir, prepare_dataset
from aligner.data.prepared import PreparedDataset

LABEL = "helpfulness:4,correctness:4,coherence:4,complexity:2,verbosity:2"
SFT = [{"system": "be nice", "conversations": [{"from": "User", "value": "hi there"},
                                               {"from": "Assistant", "value": "hello friend"}]},
       {"conversations": [{"from": "User", "value": "what is 2"}, {"from": "Assistant", "value": "4"},
                          {"from": "User", "value": "bye"}, {"from": "Assistant", "value": "fine", "label": LABEL}]}]
HS2 = [{"prompt": "what is 2", "response": "4", "helpfulness": 4, "correctness": 4, "coherence": 4},
       {"prompt": "what is 2", "response": "bye", "helpfulness": 0, "verbosity": 1}]
PAIRS = [{"prompt": "what is 2", "chosen": "4", "rejected": "bad bad", "margin": 2.5, "strength": 3},
         {"prompt": "hi\n<extra_id_1>Assistant\nhello\n<extra_id_1>User\nbye", "chosen": "fine", "rejected": "ok",
          "chosen_reward": 3.0, "rejected_reward": 1.5, "subset": "x"},
         {"prompt": "hi there hello friend", "chosen": "ok", "rejected": "bad"}]
PREF = [{"prompt": "what is 2", "response_1": "4", "response_2": "bad", "preference_strength": -2},
        {"prompt": "hi", "response_1": "ok", "response_2": "fine", "preference_strength": 0},
        {"prompt": "hi", "response_1": "bye", "response_2": "hello", "preference_strength": 1}]
PROMPTS = [{"prompt": "what is 2", "answer": 4, "family": ["a", {"b": 1.5}]},
           {"prompt": "hi there", "label": LABEL, "system": "be nice"}]
STEERLM2 = [{"prompt_turns": [{"from": "User", "value": "what is 2"}], "label": LABEL,
             "responses": [{"value": "4", "log(P(a|x,y))": -1.25, "log(P(y|x))": -8.5, "log(Q(y|a,x))": -7.75},
                           {"value": "", "log(P(a|x,y))": -2.0, "log(P(y|x))": -6.0, "log(Q(y|a,x))": -5.5}]}]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def same(a, b) -> bool:
    """Equal values of equal types: tensors by dtype and every element (NaN equal to NaN: a pair
    without rewards), containers by their items."""
    if torch.is_tensor(a):
        return (torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape
                and bool(torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all()))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _without_index(sample):
    return {k: v for k, v in sample.items() if k != "index"}


# (file rows, kind, options): every kind and layout, each template family
CASES = [
    (SFT, "sft", {"template": "extra_id"}),
    (SFT, "sft", {"template": "extra_id", "max_length": 20}),
    (SFT[:1], "sft", {"template": "chat", "chat": True}),
    (HS2, "regression", {}),
    (HS2, "regression", {"attributes": ["quality", "helpfulness", "verbosity"]}),
    (PAIRS, "pairs", {"template": "extra_id"}),
    (PAIRS, "pairs", {"reward_model": True}),
    (PAIRS, "pairs", {"template": "auto", "max_length": 24, "packing": True}),
    (PREF, "pairs", {"template": "raw"}),
    (PROMPTS, "prompts", {"template": "extra_id"}),
    (SFT, "prompts", {"template": "extra_id"}),
    (PAIRS, "any_scored", {}),
    (HS2, "any_scored", {}),
    (STEERLM2, "steerlm2", {}),
]


@pytest.mark.parametrize("rows,kind,options", CASES, ids=[f"{i}-{c[1]}" for i, c in enumerate(CASES)])
def test_prepared_samples_equal_the_in_memory_reading(tmp_path, word_tokenizer, rows, kind, options):
    options = dict(options)
    tok = load_tokenizer(word_tokenizer["chat" if options.pop("chat", False) else "plain"])
    path = _write(tmp_path / "rows.jsonl", rows)
    raw = read_samples(path, kind, tok, **options)
    mapped = load_dataset(path, kind, tok, **options)  # prepared into the cache on first use
    again = load_dataset(path, kind, tok, **options)  # the cached folder, mapped again
    assert isinstance(mapped, PreparedDataset) and mapped.folder == again.folder
    assert len(raw) == len(mapped) > 0
    for i, sample in enumerate(mapped):
        assert sample["index"] == i and same(raw[i], _without_index(sample)), (i, raw[i], sample)
    assert raw.report == {k: v for k, v in mapped.report.items() if k != "prepared"}


def test_batches_of_every_algorithm_are_equal_from_prepared_files_and_rows(tmp_path, word_tokenizer):
    """The micro-batches each algorithm builds (padded and packed) from mapped samples and
    from samples in memory; a worker pool prepares the folders here."""
    from aligner.algorithms.dpo import DPOAlgorithm
    from aligner.algorithms.reward import RewardAlgorithm
    from aligner.algorithms.sft import SFTAlgorithm
    from aligner.algorithms.steerlm import SteerLM2Algorithm

    tok = load_tokenizer(word_tokenizer["plain"])
    algorithms = {
        "sft": [SFTAlgorithm(0), SFTAlgorithm(0, packing=True, capacity=64)],
        "regression": [RewardAlgorithm(0, mode="regression", attributes=["helpfulness", "verbosity"])],
        "pairs": [DPOAlgorithm(0), RewardAlgorithm(0, mode="bt", attributes=["helpfulness"]),
                  DPOAlgorithm(0, packing=True, capacity=96)],
        "steerlm2": [SteerLM2Algorithm(0)],
    }
    files = {"sft": SFT * 3, "regression": HS2 * 2, "pairs": PAIRS * 2, "steerlm2": STEERLM2 * 3}
    for kind, algos in algorithms.items():
        options = {"attributes": ["helpfulness", "verbosity"]} if kind == "regression" else {}
        path = _write(tmp_path / f"{kind}.jsonl", files[kind])
        out = tmp_path / f"{kind}.prepared"
        prepare_dataset([path], out, kind, tok, workers=2 if kind == "sft" else 0, progress=False, **options)
        raw = [dict(s, index=i) for i, s in enumerate(read_samples(path, kind, tok, **options))]
        mapped = load_dataset(out, kind, tok, **options)
        for algo in algos:
            want = algo.microbatches(raw, 2, 64)
            got = algo.microbatches(list(mapped), 2, 64)
            assert len(want) == len(got) > 0 and all(same(w, g) for w, g in zip(want, got)), (kind, algo)


def test_the_same_rows_from_jsonl_gz_parquet_and_arrow(tmp_path, word_tokenizer):
    """Nulls in columnar files are absent fields (the pairs without numbers)."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from datasets import Dataset

    tok = load_tokenizer(word_tokenizer["plain"])
    paths = {"jsonl": _write(tmp_path / "p.jsonl", PAIRS)}
    paths["jsonl.gz"] = tmp_path / "p.jsonl.gz"
    paths["jsonl.gz"].write_bytes(gzip.compress(paths["jsonl"].read_bytes()))
    columns = {k: [r.get(k) for r in PAIRS] for r in PAIRS for k in r}  # every field, null where a row lacks it
    table = pa.Table.from_pydict(columns)
    paths["parquet"] = tmp_path / "p.parquet"
    pq.write_table(table, paths["parquet"])
    paths["arrow"] = tmp_path / "arrow"
    Dataset(table).save_to_disk(str(paths["arrow"]))
    reference = read_samples(paths["jsonl"], "pairs", tok, template="extra_id")
    assert reference[0]["margin"] == 2.5 and reference[2]["margin"] is None and reference[1]["reward_gap"] == 1.5
    for name, path in paths.items():
        for samples in (read_samples(path, "pairs", tok, template="extra_id"),
                        load_dataset(path, "pairs", tok, template="extra_id")):
            assert len(samples) == len(reference), name
            assert all(same(r, _without_index(s)) for r, s in zip(reference, samples)), name


def test_sharegpt_trl_and_openai_rows_render_as_their_nemo_equivalents(tmp_path, word_tokenizer):
    v = word_tokenizer["vocab"]
    tok = load_tokenizer(word_tokenizer["plain"])
    sharegpt = {"conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "hi there"},
                                  {"from": "gpt", "value": "hello friend"}]}
    completion = {"prompt": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi there"}],
                  "completion": [{"role": "assistant", "content": "hello friend"}]}
    assert [detect_format(r) for r in (sharegpt, completion, SFT[0])] == ["sharegpt", "prompt_completion", "sft"]
    words = ["<extra_id_0>", "System", "be", "nice", "<extra_id_1>", "User", "hi", "there", "<extra_id_1>",
             "Assistant", "hello", "friend", "</s>"]
    for row in (sharegpt, completion, SFT[0]):
        s = load_dataset(_write(tmp_path / "r.jsonl", [row]), "sft", tok, template="extra_id")[0]
        assert s["tokens"].tolist() == [v[w] for w in words], row
        assert s["loss_mask"].tolist() == [0.0] * 10 + [1.0] * 3
    # TRL's standard prompt-completion under raw: prompt, completion, EOS
    s = load_dataset(_write(tmp_path / "s.jsonl", [{"prompt": "what is", "completion": "4"}]), "sft", tok,
                     template="raw")[0]
    assert s["tokens"].tolist() == [v["what"], v["is"], v["4"], v["</s>"]]
    # TRL's conversational preference row is the string pair it spells
    conversational = {"prompt": [{"role": "user", "content": "what is 2"}],
                      "chosen": [{"role": "assistant", "content": "4"}],
                      "rejected": [{"role": "assistant", "content": "bad bad"}]}
    a = load_dataset(_write(tmp_path / "c.jsonl", [conversational]), "pairs", tok, template="extra_id")[0]
    b = load_dataset(_write(tmp_path / "d.jsonl", [{"prompt": "what is 2", "chosen": "4", "rejected": "bad bad"}]),
                     "pairs", tok, template="extra_id")[0]
    assert same(_without_index(a), _without_index(b))
    with pytest.raises(DataFormatError, match=r"e.jsonl:1: field 'chosen' must be a string or a list of one"
                                              r" assistant message"):
        load_dataset(_write(tmp_path / "e.jsonl", [dict(conversational, chosen=conversational["prompt"])]),
                     "pairs", tok)
    with pytest.raises(DataFormatError, match=r"f.jsonl:1: conversations\[1\].from must be 'human' or 'gpt'"):
        load_dataset(_write(tmp_path / "f.jsonl", [{"conversations": [{"from": "human", "value": "hi"},
                                                                      {"from": "bot", "value": "x"}]}]), "sft", tok)


def test_an_interrupted_preparation_leaves_no_folder_and_errors_come_in_row_order(tmp_path, word_tokenizer):
    tok = load_tokenizer(word_tokenizer["plain"])
    rows = PAIRS * 300 + [{"prompt": "hi", "chosen": 3, "rejected": "x"}]
    rows[700] = dict(rows[700], system="be nice")  # raw cannot render it: the first error, before line 901
    path = _write(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataFormatError, match=r"p.jsonl:701: field 'system' is set, but data.template = raw"):
        prepare_dataset([path], tmp_path / "out", "pairs", tok, template="raw", progress=False)
    with pytest.raises(DataFormatError, match=r"p.jsonl:901: field 'chosen' must be a string"):
        prepare_dataset([path], tmp_path / "out", "pairs", tok, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["p.jsonl"]  # no prepared folder, no partial one


def _stats(args, cwd):
    import sys

    from tests import pyproc

    return pyproc.run([sys.executable, "-m", "aligner.cli.main", "data", *args], timeout=300, cwd=cwd)


def test_a_prepared_folder_that_does_not_fit_is_one_line_exit_2(tmp_path, word_tokenizer):
    """Another tokenizer, another template, a truncated .bin, a missing .idx, a changed source."""
    from tests.word_tokenizer import save_word_tokenizer
    from tests.data.conftest import SPECIAL, WORDS

    other = save_word_tokenizer(tmp_path / "other", WORDS, SPECIAL, seed=3)  # the same words, other ids
    path = _write(tmp_path / "sft.jsonl", SFT)
    out = _stats(["prepare", str(path), "--tokenizer", str(word_tokenizer["plain"]), "--out", "prep",
                  "--template", "extra_id"], tmp_path)
    assert out.returncode == 0 and json.loads(out.stdout)["samples"] == 2, out.stderr
    prep = tmp_path / "prep"

    def fails(args, message):
        out = _stats(["stats", "prep", "--tokenizer", str(args.pop(0)), *args], tmp_path)
        assert out.returncode == 2 and out.stderr.splitlines()[0].startswith("aligner data: error: prep"), out.stderr
        assert message in out.stderr and len(out.stderr.splitlines()) == 1, out.stderr

    ok = _stats(["stats", "prep", "--tokenizer", str(word_tokenizer["plain"]), "--template", "extra_id"], tmp_path)
    assert ok.returncode == 0 and json.loads(ok.stdout)["samples"] == 2, ok.stderr
    fails([other, "--template", "extra_id"], f"prepared with another tokenizer ({word_tokenizer['plain']}")
    fails([word_tokenizer["chat"], "--template", "chat"], "prepared with another tokenizer")
    fails([word_tokenizer["plain"], "--template", "raw"], "prepared with template extra_id (rendering extra_id);"
                                                          " this use's template raw renders raw")
    fails([word_tokenizer["plain"], "--template", "extra_id", "--max-length", "64"],
          "prepared with max_length = 4096; this use asks for 64: prepare it again with --max-length 64")
    path.write_text(path.read_text().replace("hello friend", "hello there"))
    fails([word_tokenizer["plain"], "--template", "extra_id"], "its source")
    path.write_text(path.read_text().replace("hello there", "hello friend"))  # the same bytes: fine again
    shutil.copy(prep / "tokens.idx", tmp_path / "tokens.idx")
    (prep / "tokens.idx").unlink()
    fails([word_tokenizer["plain"], "--template", "extra_id"], "prep/tokens.idx: missing")
    shutil.copy(tmp_path / "tokens.idx", prep / "tokens.idx")
    data = (prep / "tokens.bin").read_bytes()
    (prep / "tokens.bin").write_bytes(data[:-6])
    fails([word_tokenizer["plain"], "--template", "extra_id"], f"prep/tokens.bin: {len(data) - 6} bytes, the"
                                                                f" manifest records {len(data)}: the file is truncated")
    undetectable = _write(tmp_path / "x.jsonl", [{"input": "hi", "output": "there"}])
    out = _stats(["prepare", str(undetectable), "--tokenizer", str(word_tokenizer["plain"]), "--out", "x"], tmp_path)
    assert out.returncode == 2 and out.stderr.splitlines() == [
        f"aligner data: error: {undetectable}:1: cannot tell the format from fields ['input', 'output'] (the formats"
        " and their fields: docs/data_formats.md; or name the format)"]


def test_without_the_data_extra_parquet_is_a_one_line_error(tmp_path, word_tokenizer):
    import subprocess
    import sys

    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    code = ("import sys; sys.modules['pyarrow'] = sys.modules['datasets'] = None\n"  # as if not installed
            "from aligner.cli.main import main; sys.exit(main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, "data", "stats", "p.parquet", "--tokenizer",
                          str(word_tokenizer["plain"])], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.splitlines() == [
        "aligner data: error: p.parquet: reading parquet files needs the optional package 'pyarrow': pip install"
        " 'aligner[data]'"], out.stderr


def _rank_loads(path, tokenizer_dir):
    """One rank of a job: load (preparing into the shared cache on first use) and read every sample."""
    tok = load_tokenizer(tokenizer_dir)
    data = load_dataset(path, "sft", tok, template="extra_id")
    return str(data.folder), [s["tokens"].tolist() for s in data]


def test_the_ranks_of_a_job_prepare_once_and_map_the_same_samples(tmp_path, word_tokenizer, monkeypatch):
    from aligner.parallel.spawn import spawn_local

    monkeypatch.setenv("ALIGNER_DATA_CACHE", str(tmp_path / "cache"))
    path = _write(tmp_path / "sft.jsonl", SFT * 50)
    results = spawn_local(_rank_loads, 2, str(path), str(word_tokenizer["plain"]), timeout=240)
    raw = [s["tokens"].tolist() for s in read_samples(path, "sft", load_tokenizer(word_tokenizer["plain"]),
                                                       template="extra_id")]
    assert results[0] == results[1] and results[0][1] == raw
    assert [p.name for p in cache_dir().iterdir() if p.is_dir() and p.name != "sources"] == [
        Path(results[0][0]).name]  # one preparation, no partial folder left


def test_blend_proportions_determinism_and_coverage(tmp_path, word_tokenizer):
    from aligner.training.loop import epoch_order

    tok = load_tokenizer(word_tokenizer["plain"])
    a = _write(tmp_path / "a.jsonl", [SFT[0]] * 300)
    b = _write(tmp_path / "b.jsonl", [SFT[1]] * 500)
    blend = [{"path": str(a), "weight": 0.7}, {"path": str(b), "weight": 0.3}]
    data = load_dataset(blend, "sft", tok, template="extra_id", seed=5)
    # every row of both at least once per epoch of the blend: N = max(300 / 0.7, 500 / 0.3)
    assert len(data) == 1667 and data.counts == [1167, 500]
    assert {data.locate(i) for i in range(len(data))} >= {(0, j) for j in range(300)} | {(1, j) for j in range(500)}
    # 10,000 samples in the training loop's order (seed, epoch): proportions within 1%
    drawn = torch.cat([epoch_order(len(data), 5, e) for e in range(7)])[:10_000]
    share_a = sum(data.locate(int(i))[0] == 0 for i in drawn) / 10_000
    assert abs(share_a - 0.7) < 0.01, share_a
    assert data.where(0).startswith(str(a) + ":") or data.where(0).startswith(str(b) + ":")
    again = load_dataset(blend, "sft", tok, template="extra_id", seed=5)
    other = load_dataset(blend, "sft", tok, template="extra_id", seed=6)
    assert [again.locate(i) for i in range(200)] == [data.locate(i) for i in range(200)]
    assert [other.locate(i) for i in range(200)] != [data.locate(i) for i in range(200)]
    assert data.sample_tokens().tolist() == [len(s["tokens"]) for s in data]
    with pytest.raises(ValueError, match=r"blend entry 1 \(.*b.jsonl\): weight must be a positive number, got 0"):
        load_dataset([blend[0], dict(blend[1], weight=0)], "sft", tok)


def test_the_same_tokenizer_files_beside_another_model_type_are_another_preparation(tmp_path, word_tokenizer,
                                                                                    monkeypatch):
    """transformers chooses an HF tokenizer's class from config.json's model_type: the same
    tokenizer files beside a Qwen2 config tokenise as Qwen2's class rebuilds them (byte-level
    BPE), beside a Llama config as written. The cache keeps the two preparations apart."""
    monkeypatch.setenv("ALIGNER_DATA_CACHE", str(tmp_path / "cache"))
    path = _write(tmp_path / "sft.jsonl", SFT)
    tokens = {}
    for model_type in ("llama", "qwen2"):
        folder = shutil.copytree(word_tokenizer["plain"], tmp_path / model_type)
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
        tok = load_tokenizer(folder)
        prepared = [s["tokens"].tolist() for s in load_dataset(path, "sft", tok, template="extra_id")]
        assert prepared == [s["tokens"].tolist() for s in read_samples(path, "sft", tok, template="extra_id")]
        tokens[model_type] = prepared
    assert tokens["llama"] != tokens["qwen2"]  # the two classes do tokenise differently
