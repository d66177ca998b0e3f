"""Training throughput of the quickstart's SFT stage: the fused layer spec vs the local spec.

The embedded world's SFT conversations (tokenised by its own SentencePiece tokenizer), the
quickstart's model (``conf/model/tiny.yaml``) and batch (global 32, micro 16), fp32, one
process: for each spec the same initial weights and the same steps of the shared loop.
The two specs alternate in rounds of ``--steps`` steps after a warm-up step each; each
spec's fastest round counts (robust to other load on a shared machine). Tokens/s counts
real tokens (not padding). Model FLOP/s follows ``benchmarks/flops.py`` (3 x forward,
real tokens only) against this run's measured fp32 matmul peak.

    python benchmarks/bench_train.py [--steps 4] [--rounds 3] [--threads 2] [--packing]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops import matmul_peak, training_flops  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="tiny", help="model preset (conf/model)")
    ap.add_argument("--global-batch", type=int, default=32)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--packing", action="store_true", help="pack conversations into 256-token bins")
    ap.add_argument("--specs", default="fused,local")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from aligner.algorithms.sft import SFTAlgorithm
    from aligner.data import load_dataset, load_tokenizer
    from aligner.data.world import synthesize
    from aligner.models import ModelConfig, build_model
    from aligner.parallel import ParallelConfig, initialize, set_seed
    from aligner.training.config import OptimSection, TrainerSection
    from aligner.training.loop import TrainingLoop

    work = Path(tempfile.mkdtemp())
    world = synthesize(work / "world", seed=0, n_sft=(args.rounds * args.steps + 2) * args.global_batch,
                       n_sft_val=8, n_regression=8, n_pairs=8, n_pairs_val=4, n_heldout=4, n_rewardbench=4)
    tok = load_tokenizer(str(world["tokenizer"]))
    samples = load_dataset(str(world["sft_train"]), kind="sft", tokenizer=tok, max_length=256)
    samples = [dict(s, index=i) for i, s in enumerate(samples)]
    initialize(ParallelConfig(seed=0))
    specs = args.specs.split(",")
    loops = {}
    for spec in specs:
        set_seed(0)
        cfg = ModelConfig.preset(args.model, vocab_size=max(tok.vocab_size, 512), pad_token_id=tok.pad_id,
                                 layer_spec=spec)
        model = build_model(cfg)
        loops[spec] = TrainingLoop(
            SFTAlgorithm(tok.pad_id, packing=args.packing, capacity=256), [model], samples,
            optim=OptimSection(lr=1e-3), model_cfg=cfg,
            trainer=TrainerSection(max_steps=10_000, global_batch_size=args.global_batch,
                                   micro_batch_size=args.micro_batch, out_dir=str(work / spec), progress=False,
                                   tensorboard=False, export_hf=False, resume=False),
        )
    peak = matmul_peak(args.threads)
    best = {spec: None for spec in specs}
    losses = {spec: [] for spec in specs}
    for spec in specs:
        losses[spec].append(loops[spec].train_step()["loss"])  # warm-up (same first step for both)
    for _ in range(args.rounds):
        for spec in specs:
            loop = loops[spec]
            start = loop.step
            t0 = time.perf_counter()
            for _ in range(args.steps):
                losses[spec].append(loop.train_step()["loss"])
            elapsed = time.perf_counter() - t0
            lengths = [int(s["tokens"].numel()) for k in range(start, loop.step) for s in loop.global_batch(k)]
            if best[spec] is None or elapsed < best[spec][0]:
                best[spec] = (elapsed, sum(lengths), training_flops(loop.model_cfg, lengths))
    peak = max(peak, matmul_peak(args.threads))  # the better of before and after
    n_params = loops[specs[0]].model_cfg.num_parameters()
    print(f"SFT on the embedded world, model {args.model} ({n_params / 1e6:.2f}M params), global batch"
          f" {args.global_batch}, micro {args.micro_batch}, {'packed' if args.packing else 'padded'}, fp32,"
          f" {args.threads} threads, torch {torch.__version__}; fastest of {args.rounds} rounds of {args.steps} steps")
    print(f"measured fp32 matmul peak (1024^3, fastest of 20): {peak / 1e9:.1f} GFLOP/s")
    print(f"{'spec':<8} {'s/step':>8} {'tokens/s':>10} {'GFLOP/s':>8} {'of peak':>8}  first losses")
    out = {"peak_flops": peak}
    for spec in specs:
        elapsed, tokens, flops = best[spec]
        rate = flops / elapsed
        out[spec] = {"s_per_step": elapsed / args.steps, "tokens_per_s": tokens / elapsed, "model_flops_per_s": rate,
                     "fraction_of_peak": rate / peak}
        print(f"{spec:<8} {elapsed / args.steps:8.3f} {tokens / elapsed:10.0f} {rate / 1e9:8.1f} {100 * rate / peak:7.0f}%"
              f"  {[round(x, 4) for x in losses[spec][:3]]}")
    if "fused" in best and "local" in best:
        out["ratio_fused_over_local"] = best["local"][0] / best["fused"][0]
        print(f"ratio fused / local tokens/s: {out['ratio_fused_over_local']:.2f}x")
        same = all(abs(a - b) < 1e-4 for a, b in zip(losses["fused"], losses["local"]))
        print(f"losses agree (1e-4) across specs: {same}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
