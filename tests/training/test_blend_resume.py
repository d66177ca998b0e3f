"""Training from a blend of a prepared folder and a parquet file, through the command line:
a run stopped at step 2 and resumed draws the samples an uninterrupted run draws (the same
losses at steps 3 and 4); a prepared folder given with another tokenizer is refused in one
line before any training."""
import json
import sys

import pytest

from tests import pyproc
from tests.training.test_run_folder import WORDS, _tiny


def _aligner(*args, cwd):
    return pyproc.run([sys.executable, "-W", "ignore", "-m", "aligner.cli.main", *args], timeout=600, cwd=cwd)


def _losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.fixture(scope="module")
def blend_runs(tmp_path_factory):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from tests.word_tokenizer import save_word_tokenizer

    root = tmp_path_factory.mktemp("blend")
    save_word_tokenizer(root / "tok", WORDS, [])
    save_word_tokenizer(root / "other", WORDS, [], seed=3)
    with open(root / "a.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"conversations": [{"from": "human", "value": f"what is {WORDS[i % 5]}"},
                                                  {"from": "gpt", "value": f"{WORDS[(i + 3) % 15]} friend"}]}) + "\n")
    pq.write_table(pa.Table.from_pylist([{"prompt": f"hi {WORDS[i % 15]}", "completion": f"{WORDS[(i + 7) % 15]} ok"}
                                         for i in range(20)]), root / "b.parquet")
    prepared = _aligner("data", "prepare", "a.jsonl", "--tokenizer", "tok", "--out", "a_prepared",
                        "--template", "extra_id", "--max-length", "128", cwd=root)
    assert prepared.returncode == 0, prepared.stderr
    common = ["train", "sft", "data.train=[{path:a_prepared,weight:0.7},{path:b.parquet,weight:0.3}]",
              "data.tokenizer=tok", "data.template=extra_id", "trainer.save_interval=2", *_tiny(len(WORDS) + 4)]
    for args in (["trainer.max_steps=4", "trainer.out_dir=whole"], ["trainer.max_steps=2", "trainer.out_dir=part"],
                 ["trainer.max_steps=4", "trainer.out_dir=part"]):
        out = _aligner(*common, *args, cwd=root)
        assert out.returncode == 0, out.stderr
    return root, common, out.stderr


def test_a_resumed_blended_run_draws_what_an_uninterrupted_one_draws(blend_runs):
    root, _, stderr = blend_runs
    assert "resumed from step 2" in stderr
    whole, part = _losses(root / "whole"), _losses(root / "part")
    assert sorted(whole) == sorted(part) == [1, 2, 3, 4]
    assert part == whole
    assert len(set(whole.values())) == 4  # four different batches


def test_a_prepared_folder_with_another_tokenizer_is_refused_in_one_line(blend_runs):
    root, common, _ = blend_runs
    out = _aligner(*[a for a in common if not a.startswith("data.tokenizer")], "data.tokenizer=other",
                   "trainer.max_steps=1", "trainer.out_dir=refused", cwd=root)
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith(f"aligner train: error: a_prepared: prepared with another tokenizer ({root / 'tok'}")
    assert not (root / "refused" / "checkpoints").exists()
