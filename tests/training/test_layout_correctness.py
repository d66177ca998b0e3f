"""The loop under every layout, on the cases that used to break it.

One job per layout (TP=1 world 1; DP=2, TP=2, PP=2 and PP=2 x VPP=2 on 2 ranks), all from
the same initial weights (made by the TP=1 job):

- validation sets whose size is not a multiple of the micro-batch size (SFT 7 samples,
  regression 7, BT 19 pairs, DPO 7 pairs, the DPO reference pass included): the same
  numbers under every layout, and at TP=1 the numbers of an independent computation
  (plain forward passes for SFT, :func:`score_sequences` for BT accuracies), so filler rows
  count nowhere;
- metrics keyed by data (per-subset accuracy): a RewardBench-style file of 8 ``world-easy``
  then 8 ``world-hard`` pairs (and 3 ``world-chat`` ones, so the ranks hold different
  numbers of keys) scored as one global batch, so the DP=2 ranks hold disjoint subsets;
- interleaved pipelining (PP=2 x VPP=2): SFT, regression and BT reward models and DPO
  train 3 steps with the losses and gradient norms of TP=1 (1e-5); a checkpoint saved at
  TP=1 resumes at VPP=2, and one saved at VPP=2 resumes at PP=2 without VPP, with the
  loss and gradient norm of the uninterrupted run; greedy generation from the VPP-built
  model gives the TP=1 model's tokens.
"""
import math
import os
import shutil

import pytest
import torch

from aligner.parallel import ParallelConfig, initialize
from aligner.parallel.spawn import SpawnError, spawn_local
from tests.training import layouts as L

TOL = 1e-5
SUBSETS = ["world-easy"] * 8 + ["world-hard"] * 8 + ["world-chat"] * 3
LAYOUTS = {"tp1": (1, 1, None, 1), "dp2": (1, 1, None, 2), "tp2": (2, 1, None, 2), "pp2": (1, 2, None, 2),
           "vpp2": (1, 2, 2, 2)}
PROMPTS = [[1, 5, 9, 3], [1, 7, 30, 44, 8, 19], [1, 60], [1, 11, 12, 13, 14, 15, 16, 17]]


def _algos():
    from aligner.algorithms.dpo import DPOAlgorithm
    from aligner.algorithms.reward import RewardAlgorithm
    from aligner.algorithms.sft import SFTAlgorithm

    return {
        "sft": (lambda: SFTAlgorithm(0), "lm", L.sft_samples(24, 1), L.sft_samples(7, 2)),
        "regression": (lambda: RewardAlgorithm(0, mode="regression", attributes=["a", "b", "c"]), "rm3",
                       L.regression_samples(24, 3), L.regression_samples(7, 4)),
        "bt": (lambda: RewardAlgorithm(0, mode="bt", bt_kind="scaled", attributes=["a"]), "rm1",
               L.pair_samples(24, 5), L.pair_samples(19, 6, SUBSETS)),
        "dpo": (lambda: DPOAlgorithm(0, beta=0.5), "lm", L.pair_samples(24, 7), L.pair_samples(7, 8)),
    }


def _validation(root, workdir, name):
    """Validation metrics of the initial weights (global batch 16 for BT: the subsets in one batch)."""
    algo_fn, kind, train, val = _algos()[name]
    algo = algo_fn()
    chunks = L.build_chunks(*L.HEADS[kind])
    L.load_weights(chunks, root, *L.HEADS[kind])
    gbs = 16 if name == "bt" else 8
    loop = L.make_loop(algo, chunks, train, f"{workdir}/val_{name}", val=val, gbs=gbs, mbs=2)
    loop.algorithm.setup(loop)  # DPO: the reference pass over the validation pairs
    return loop.evaluate()


def _train(root, workdir, name, resume_from=None, steps=3):
    """Train ``name`` for ``steps`` steps (checkpoint at step 2); the logged train rows."""
    algo_fn, kind, train, _ = _algos()[name]
    chunks = L.build_chunks(*L.HEADS[kind])
    L.load_weights(chunks, root, *L.HEADS[kind])
    out = f"{workdir}/train_{name}" + ("_resumed" if resume_from else "")
    if resume_from:
        import torch.distributed as dist

        if dist.get_rank() == 0:
            shutil.copytree(resume_from, f"{out}/checkpoints")
        dist.barrier()
    loop = L.make_loop(algo_fn(), chunks, train, out, steps=steps, save_interval=2, resume=bool(resume_from))
    loop.fit()
    return [{k: r[k] for k in ("step", "loss", "grad_norm", "lr")} for r in L.metrics_rows(out)]


def _generate(root):
    from aligner.rollout.engine import GenerationConfig, RolloutEngine

    chunks = L.build_chunks()
    L.load_weights(chunks, root, None, 1)
    out = {}
    for impl in ("fused", "megatron"):
        engine = RolloutEngine(chunks, L.model_cfg(), decode_impl=impl)
        result = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=12, greedy=True, stop_token_ids=[]))
        out[impl] = (result.tokens.tolist(), result.lengths.tolist(), result.logprobs.tolist())
    return out


def _independent_references(root, workdir):
    """TP=1 only: SFT validation NLL by plain forward passes, BT accuracies from scoring."""
    from aligner.training.scoring import score_sequences

    _, _, _, sft_val = _algos()["sft"]
    (model,) = L.build_chunks()
    L.load_weights([model], root, None, 1)
    nll, count = 0.0, 0.0
    with torch.no_grad():
        for s in sft_val:
            logits = model(s["tokens"][None], None, None)[0, :-1, : L.VOCAB].double()
            lp = torch.log_softmax(logits, -1).gather(-1, s["tokens"][1:, None])[:, 0]
            nll -= float((lp * s["loss_mask"][1:]).sum())
            count += float(s["loss_mask"][1:].sum())
    (rm,) = L.build_chunks("reward", 1)
    L.load_weights([rm], root, "reward", 1)
    _, _, _, bt_val = _algos()["bt"]
    seqs = [t for s in bt_val for t in (s["chosen"], s["rejected"])]
    scores = score_sequences([rm], seqs, 0, micro_batch_size=3)[:, 0]
    correct = (scores[0::2] > scores[1::2]).double()
    acc = {"accuracy": float(correct.mean())}
    for name in sorted(set(SUBSETS)):
        sel = torch.tensor([s == name for s in SUBSETS])
        acc[f"accuracy/{name}"] = float(correct[sel].mean())
    return {"sft_loss": nll / count, "bt": acc}


def run_layout(root, workdir, tp, pp, vpp):
    torch.set_num_threads(1)
    initialize(ParallelConfig(tp=tp, pp=pp, vpp=vpp, seed=5))
    from aligner.parallel import set_seed

    set_seed(5)
    out = {}
    if tp == pp == 1 and not os.path.exists(os.path.join(root, "lm_1")):
        import torch.distributed as dist

        if dist.get_world_size() == 1:
            L.save_weights(root)
    out["val"] = {name: _validation(root, workdir, name) for name in _algos()}
    if vpp or (tp == pp == 1 and int(os.environ["WORLD_SIZE"]) == 1):
        out["train"] = {name: _train(root, workdir, name) for name in _algos()}
        out["generate"] = _generate(root)
    if tp == pp == 1 and int(os.environ["WORLD_SIZE"]) == 1:
        out["reference"] = _independent_references(root, workdir)
    if vpp:  # saved at TP=1 (world 1), resumed with interleaved chunks
        out["resumed"] = _train(root, workdir, "sft", resume_from=f"{root}/tp1/train_sft/checkpoints")
    if pp == 2 and not vpp:  # saved with interleaved chunks, resumed without
        out["resumed"] = _train(root, workdir, "sft", resume_from=f"{root}/vpp2/train_sft/checkpoints")
    return out


def _keep_step(ckpt_dir, step):
    """Leave only checkpoint ``step`` (as latest) in a copied checkpoint folder."""
    import json

    for p in os.listdir(ckpt_dir):
        if p.startswith("step_") and p != f"step_{step:07d}":
            shutil.rmtree(os.path.join(ckpt_dir, p))
    with open(os.path.join(ckpt_dir, "latest"), "w") as f:
        json.dump({"step": step, "dir": f"step_{step:07d}"}, f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("layouts"))
    out = {}
    for name in ("tp1", "vpp2", "pp2", "dp2", "tp2"):  # tp1 first: it makes the weights
        tp, pp, vpp, world = LAYOUTS[name]
        workdir = os.path.join(root, name)
        try:
            out[name] = spawn_local(run_layout, world, root, workdir, tp, pp, vpp, timeout=900)
        except SpawnError as exc:  # reported by the tests of that layout
            out[name] = exc
            continue
        if "train" in out[name][0]:
            _keep_step(os.path.join(workdir, "train_sft", "checkpoints"), 2)
    return out


def _ranks(runs, layout):
    if isinstance(runs[layout], Exception):
        raise AssertionError(f"the {layout} job failed: {runs[layout]}"[:3000])
    return runs[layout]


def _close(a, b, tol=TOL):
    assert set(a) == set(b), (sorted(a), sorted(b))
    for k in a:
        assert abs(a[k] - b[k]) <= tol or (math.isnan(a[k]) and math.isnan(b[k])), (k, a[k], b[k])


@pytest.mark.parametrize("layout", ["dp2", "tp2", "pp2", "vpp2"])
@pytest.mark.parametrize("algo", ["sft", "regression", "bt", "dpo"])
def test_validation_of_any_size_agrees_across_layouts(runs, layout, algo):
    ref = _ranks(runs, "tp1")[0]["val"][algo]
    for rank_out in _ranks(runs, layout):
        _close(rank_out["val"][algo], ref)


def test_validation_numbers_match_an_independent_computation(runs):
    out = _ranks(runs, "tp1")[0]
    ref = out["reference"]
    assert abs(out["val"]["sft"]["loss"] - ref["sft_loss"]) < TOL
    for key, value in ref["bt"].items():
        assert abs(out["val"]["bt"][key] - value) < 1e-12, key
    # 19 pairs: accuracies are multiples of 1/19, 1/8 and 1/3 (no filler pair counted)
    assert abs(out["val"]["bt"]["accuracy"] * 19 - round(out["val"]["bt"]["accuracy"] * 19)) < 1e-9
    dpo = out["val"]["dpo"]
    assert dpo["rewards/margins"] == 0.0 and abs(dpo["loss"] - math.log(2)) < 1e-6


def test_subset_metrics_reduce_over_the_union_of_ranks_keys(runs):
    ref = _ranks(runs, "tp1")[0]["val"]["bt"]
    assert {"accuracy/world-easy", "accuracy/world-hard", "accuracy/world-chat"} <= set(ref)
    for rank_out in _ranks(runs, "dp2"):
        bt = rank_out["val"]["bt"]
        for key in ("accuracy", "accuracy/world-easy", "accuracy/world-hard", "accuracy/world-chat"):
            assert bt[key] == pytest.approx(ref[key], abs=1e-12), key


@pytest.mark.parametrize("algo", ["sft", "regression", "bt", "dpo"])
def test_interleaved_pipeline_trains_like_tp1(runs, algo):
    ref = _ranks(runs, "tp1")[0]["train"][algo]
    assert [r["step"] for r in ref] == [1, 2, 3]
    for rank_out in _ranks(runs, "vpp2"):
        rows = rank_out["train"][algo]
        assert [r["step"] for r in rows] == [1, 2, 3]
        for a, b in zip(rows, ref):
            assert abs(a["loss"] - b["loss"]) < TOL and abs(a["grad_norm"] - b["grad_norm"]) < TOL, (a, b)


@pytest.mark.parametrize("layout", ["vpp2", "pp2"])
def test_checkpoint_resumes_across_virtual_pipeline_layouts(runs, layout):
    ref = _ranks(runs, "tp1")[0]["train"]["sft"][2]
    for rank_out in _ranks(runs, layout):
        rows = rank_out["resumed"]
        assert [r["step"] for r in rows] == [3]
        assert abs(rows[0]["loss"] - ref["loss"]) < TOL and abs(rows[0]["grad_norm"] - ref["grad_norm"]) < TOL


def test_greedy_generation_from_interleaved_chunks(runs):
    ref_tokens, ref_lengths, ref_logps = _ranks(runs, "tp1")[0]["generate"]["megatron"]
    assert ref_lengths == [len(p) + 12 for p in PROMPTS]
    assert [t[: len(p)] for t, p in zip(ref_tokens, PROMPTS)] == PROMPTS
    for rank_out in _ranks(runs, "vpp2"):
        for impl in ("fused", "megatron"):
            tokens, lengths, logps = rank_out["generate"][impl]
            assert tokens == ref_tokens and lengths == ref_lengths, impl
            torch.testing.assert_close(torch.tensor(logps), torch.tensor(ref_logps), atol=1e-5, rtol=0)
