"""SPIN with a window of iterations (``spin.keep_previous = 1``, the paper's released
recipe: iteration 1 trains on iteration 0's pairs and its own), on a tiny random HF Llama
and 4 prompt/completion rows at global batch 4: iteration 0 is 1 step, iteration 1 two.

- The pairs iteration 1 trains on, counted by hand: its file holds its 4 own pairs and
  iteration 0's 4 (the same generations, token for token), every pair with the reference
  log-probs of the model iteration 1 starts from (transformers on that model, exported
  from the same run cut short after iteration 0: 1e-5), not those it carried in iteration
  0 (the initial model's); the 2 steps of iteration 1 take 4 earlier pairs in all
  (``window/previous``), and its first step's loss is ln 2 (policy = reference for every
  pair it holds, old or new).
- Data-parallel (DP=2) and tensor-parallel (TP=2) runs write the same pairs (the earlier
  iteration's recomputed reference log-probs included, 1e-5) and log the same loss and
  gradient norm as one process at all 3 steps (1e-5).
- The length: 3 steps (``trainer.max_epochs`` derived as 1 + 2), a wrong override refused.
- SIGKILL at the iteration boundary (after step 1's checkpoint, before iteration 1 samples:
  the resumed run reads iteration 0's file back, checked against the checkpoint's digest)
  and inside iteration 1 (after step 2's: it reads iteration 1's file back): both end with
  exactly the metrics and files of an uninterrupted run.
"""
import json
import math
import sys

import pytest

from aligner.parallel.spawn import spawn_local
from tests.algorithms.conftest import COMPLETION_ROWS as ROWS, write_jsonl
from tests.algorithms.test_spin import layout_calls, run_at, run_full_and_first_iteration, spin_config, transformers_logps
from tests.layouts import in_turn
from tests.kill_resume import assert_same_metrics, kill_after_checkpoint, metrics, run


def window_config(hf, train, out_dir, **trainer):
    cfg = spin_config(hf, train, out_dir, **trainer)
    cfg["spin"]["keep_previous"] = 1
    return cfg


def test_iteration_one_trains_on_both_iterations_pairs_against_its_own_reference(tiny_hf, tmp_path):
    from transformers import AutoTokenizer

    train = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    cfg = window_config(str(tiny_hf["dir"]), train, str(tmp_path / "run"))
    (metrics, rows), first_hf = spawn_local(run_full_and_first_iteration, 1, cfg, timeout=600)[0]
    assert [m["iteration"] for m in metrics] == [0.0, 1.0, 1.0]
    assert [m["epoch"] for m in metrics] == [0.0, 0.0, 0.0]
    # iteration 0: its own 4 pairs; iteration 1: its own 4, then iteration 0's 4
    assert [(r["iteration"], r["index"]) for r in rows[0]] == [(0, i) for i in range(4)]
    assert [(r["iteration"], r["index"]) for r in rows[1]] == [(1, i) for i in range(4)] + [(0, i) for i in range(4)]
    old, own = rows[1][4:], rows[1][:4]
    for before, again in zip(rows[0], old):
        assert again["rejected_tokens"] == before["rejected_tokens"] and again["rejected"] == before["rejected"]
    # every pair of iteration 1 carries the log-probs of the model iteration 1 starts from
    tok = AutoTokenizer.from_pretrained(tiny_hf["dir"])
    pairs = []
    for row in old + own:
        r = ROWS[row["index"]]
        prompt = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        chosen = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        pairs.append((prompt, chosen, row["rejected_tokens"]))
    want_c, want_r = transformers_logps(first_hf, pairs)
    got_c = [r["ref_chosen"] for r in old + own]
    got_r = [r["ref_rejected"] for r in old + own]
    print(f"iteration 0's pairs in iteration 1: reference {got_r[:4]} vs transformers {want_r[:4]}"
          f" (in iteration 0: {[r['ref_rejected'] for r in rows[0]]})")
    assert max(abs(a - b) for a, b in zip(got_c + got_r, want_c + want_r)) <= 1e-5
    assert min(abs(a["ref_rejected"] - b["ref_rejected"]) for a, b in zip(old, rows[0])) > 1e-3
    assert [r["ref_chosen"] for r in old] == [r["ref_chosen"] for r in own]  # one forward of each chosen
    # the 2 steps of iteration 1 take the 8 pairs once each: 4 of them iteration 0's
    assert 4 * (metrics[1]["window/previous"] + metrics[2]["window/previous"]) == 4
    assert 0 < metrics[1]["window/previous"] < 1  # a batch mixes the iterations' pairs
    assert abs(metrics[1]["loss"] - math.log(2)) <= 1e-6 and abs(metrics[2]["loss"] - math.log(2)) > 1e-4
    assert "window/previous" not in metrics[0]


def test_data_and_tensor_parallel_equal_one_process(tiny_hf, tmp_path):
    train = write_jsonl(tmp_path / "rows.jsonl", ROWS)

    def config(out_dir):
        return window_config(str(tiny_hf["dir"]), train, out_dir, micro_batch_size=1)

    want_metrics, want_rows = spawn_local(in_turn, 1, run_at, layout_calls(config, tmp_path, 1, [(1, 1)]),
                                          timeout=600)[0][(1, 1)]
    # DP=2, then TP=2
    two = spawn_local(in_turn, 2, run_at, layout_calls(config, tmp_path, 2, [(1, 1), (2, 1)]), timeout=900)[0]
    assert len(want_rows[1]) == 8
    for (tp, pp), (metrics, rows) in two.items():
        for k in range(2):
            assert [(r["iteration"], r["index"], r["rejected_tokens"]) for r in rows[k]] == \
                [(r["iteration"], r["index"], r["rejected_tokens"]) for r in want_rows[k]], (tp, k)
            for key in ("ref_chosen", "ref_rejected"):
                assert max(abs(a[key] - b[key]) for a, b in zip(rows[k], want_rows[k])) <= 1e-5, (tp, k, key)
        assert len(metrics) == len(want_metrics) == 3
        for got, want in zip(metrics, want_metrics):
            for key in ("loss", "grad_norm", "rewards/margins", "window/previous"):
                if key in want:
                    print(f"tp{tp} step {got['step']} {key}: {got[key]:.9g} vs {want[key]:.9g}")
                    assert abs(got[key] - want[key]) <= 1e-5 * max(1.0, abs(want[key])), (tp, got["step"], key)


def test_window_length_is_derived(tmp_path):
    from aligner.algorithms.spin import SPINTrainer
    from aligner.config import ConfigError

    cfg = window_config("unused", "unused.jsonl", str(tmp_path))
    cfg["spin"]["iterations"] = 3
    assert SPINTrainer.derive(cfg).trainer.max_epochs == 1 + 2 + 2
    cfg["spin"]["epochs"] = 2
    assert SPINTrainer.derive(cfg).trainer.max_epochs == 2 * (1 + 2 + 2)
    cfg["trainer"]["max_epochs"] = 6
    with pytest.raises(ConfigError, match=r"trainer.max_epochs = 6: SPIN runs spin.epochs x the iterations' windows"
                                          r" \(spin.keep_previous = 1\) = 10 epochs"):
        SPINTrainer.derive(cfg)
    cfg["trainer"]["max_epochs"] = None
    cfg["spin"]["keep_previous"] = -1
    with pytest.raises(ConfigError, match=r"spin.keep_previous = -1: expected >= 0"):
        SPINTrainer.derive(cfg)


def _cmd(assets, out, sleep=0.0):
    return [sys.executable, "-W", "ignore", "-m", "tests.algorithms.online_driver", "spin:window", str(assets),
            str(out), "3", "1", str(sleep)]


def test_resumed_at_and_inside_the_window_ends_with_the_same_metrics(tiny_hf, tmp_path):
    path = tmp_path / "assets.json"
    path.write_text(json.dumps({"student": str(tiny_hf["dir"]),
                                "train": write_jsonl(tmp_path / "rows.jsonl", ROWS)}))
    whole = tmp_path / "whole"
    run(_cmd(path, whole), 600)
    assert [r["iteration"] for r in metrics(whole)] == [0.0, 1.0, 1.0]
    for step, name in ((1, "boundary"), (2, "inside")):
        killed = tmp_path / name
        # each step sleeps 1 s before it samples or trains: killed within it
        assert kill_after_checkpoint(_cmd(path, killed, 1.0), killed, step) == step, name
        written = (killed / "spin_samples" / "iteration_1.jsonl").is_file()
        assert written == (step == 2), name  # at the boundary iteration 1 has not sampled yet
        before = (killed / "spin_samples" / "iteration_0.jsonl").stat().st_mtime_ns
        run(_cmd(path, killed), 600)
        assert (killed / "spin_samples" / "iteration_0.jsonl").stat().st_mtime_ns == before, name
        assert_same_metrics(whole, killed, 3)
        for k in (0, 1):
            file = f"spin_samples/iteration_{k}.jsonl"
            assert (whole / file).read_bytes() == (killed / file).read_bytes(), (name, file)
