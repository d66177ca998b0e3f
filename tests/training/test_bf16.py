"""bf16 end to end on CPU: the quickstart's SFT stage (the embedded world, the tiny model,
``aligner train sft``) with ``init.dtype=bf16``: bf16 parameters and compute, fp32 main
parameters and gradients in megatron-core's mixed-precision optimizer.

- the bf16 training curve follows the fp32 one (bf16 keeps 8 mantissa bits, a relative
  rounding of 0.4% per operation; at the quickstart's learning rate a batch of 8 makes
  single steps jumpy, which bf16 rounding can shift): every logged training loss within
  3% of fp32's, their mean relative gap within 0.5%, the final validation loss within
  1%, and both curves fall;
- a bf16 run stopped after 5 steps and rerun with 10 resumes from its checkpoint and ends
  with exactly the metrics of an uninterrupted bf16 run (fp32 main parameters and Adam
  moments are restored, not rebuilt from the bf16 copy);
- the HF export holds bf16 tensors; transformers loads it and its loss on the validation
  rows equals the run's own validation loss within 1.5% (bf16 compute on both sides).
"""
import json
import sys
from pathlib import Path

import pytest

from tests import pyproc

STEPS, HALF = 10, 5
STEP_TOL, MEAN_TOL, VAL_TOL, EXPORT_TOL = 0.03, 0.005, 0.01, 0.015


def _train(out, world, dtype, steps, progress=False):
    cmd = [
        sys.executable, "-W", "ignore", "-m", "aligner.cli.main", "train", "sft",
        f"data.train={world / 'sft_train.jsonl'}", f"data.validation={world / 'sft_val.jsonl'}",
        f"data.tokenizer={world / 'tokenizer.model'}", f"init.dtype={dtype}", f"trainer.out_dir={out}",
        f"trainer.max_steps={steps}", "trainer.global_batch_size=8", "trainer.micro_batch_size=8", "data.max_length=96",
        f"trainer.save_interval={HALF}", "trainer.val_interval=0", f"trainer.progress={str(progress).lower()}",
        "trainer.tensorboard=false", "optim.schedule=constant", "optim.warmup_steps=2", "trainer.seed=2",
    ]
    proc = pyproc.run(cmd, cwd=Path(__file__).parents[2], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def _metrics(out, split="train"):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from aligner.data.world import synthesize

    base = tmp_path_factory.mktemp("bf16")
    world = base / "world"
    synthesize(world, seed=0, n_sft=96, n_sft_val=24, n_regression=8, n_pairs=8, n_pairs_val=4, n_heldout=4,
               n_rewardbench=4)
    _train(base / "fp32", world, "fp32", STEPS)
    log = _train(base / "bf16", world, "bf16", STEPS)
    _train(base / "resumed", world, "bf16", HALF)
    resumed_log = _train(base / "resumed", world, "bf16", STEPS, progress=True)  # says where it resumed
    return {"base": base, "world": world, "log": log, "resumed_log": resumed_log}


def test_bf16_curve_follows_fp32(runs):
    fp32, bf16 = _metrics(runs["base"] / "fp32"), _metrics(runs["base"] / "bf16")
    assert [r["step"] for r in fp32] == [r["step"] for r in bf16] == list(range(1, STEPS + 1))
    gaps = [abs(b["loss"] - a["loss"]) / a["loss"] for a, b in zip(fp32, bf16)]
    assert max(gaps) <= STEP_TOL and sum(gaps) / len(gaps) <= MEAN_TOL, gaps
    assert bf16[-1]["loss"] < bf16[0]["loss"] - 0.5 and fp32[-1]["loss"] < fp32[0]["loss"] - 0.5
    va, vb = (_metrics(runs["base"] / k, "val")[-1]["loss"] for k in ("fp32", "bf16"))
    assert abs(vb - va) <= VAL_TOL * va, (va, vb)
    # the two runs really differ in precision (bf16 rounding shows in the losses)
    assert any(a["loss"] != b["loss"] for a, b in zip(fp32, bf16))
    assert "layer spec" in runs["log"]  # the spec in use is announced at start-up


def test_bf16_run_resumes_exactly(runs):
    whole, resumed = _metrics(runs["base"] / "bf16"), _metrics(runs["base"] / "resumed")
    assert f"resumed from step {HALF}" in runs["resumed_log"]
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(whole, resumed):
        for key in ("loss", "grad_norm", "lr"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    va, vb = (_metrics(runs["base"] / k, "val")[-1]["loss"] for k in ("bf16", "resumed"))
    assert va == vb


def test_bf16_export_loads_in_transformers_with_the_runs_loss(runs):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from aligner.data import load_dataset, load_tokenizer

    hf = runs["base"] / "bf16" / "hf"
    files = sorted(hf.glob("*.safetensors"))
    assert files
    for path in files:
        with safe_open(str(path), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    model = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.bfloat16).eval()
    assert next(model.parameters()).dtype == torch.bfloat16
    tok = load_tokenizer(str(runs["world"] / "tokenizer.model"))
    from omegaconf import OmegaConf

    data = OmegaConf.load(runs["base"] / "bf16" / "config.yaml").data  # the run's own length policy
    rows = load_dataset(str(runs["world"] / "sft_val.jsonl"), kind="sft", tokenizer=tok, template=data.template,
                        max_length=data.max_length, overlong=data.overlong)
    nll, count = 0.0, 0.0
    with torch.no_grad():
        for row in rows:
            tokens, mask = row["tokens"], row["loss_mask"].float()
            logits = model(tokens[None]).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, tokens[1:, None])[:, 0]
            nll -= float((lp * mask[1:]).sum())
            count += float(mask[1:].sum())
    run_val = _metrics(runs["base"] / "bf16", "val")[-1]["loss"]
    assert abs(nll / count - run_val) <= EXPORT_TOL * run_val, (nll / count, run_val)
