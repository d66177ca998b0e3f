"""Generation throughput: aligner's rollout engine vs transformers' ``generate``.

One random Llama-shaped model is made with transformers and saved; aligner imports the same
weights (TP=1, fp32). Both generate greedily with a KV cache from the same batch of prompts
(all ``--prompt-len`` tokens, so both do the same work; transformers: ``use_cache=True``,
``min_new_tokens`` = ``max_new_tokens`` so no row stops early), ``--reps`` interleaved
timed runs after one warm-up each; the median is reported. Tokens/s counts generated
tokens (batch x new tokens). The engine's outputs are checked against transformers'.

Also reported: the engine with megatron-core's own decode steps (``decode_impl=megatron``),
for the first batch size the share of the engine's time spent in matrix multiplies, and
each row's model FLOP rate (``benchmarks/flops.py``: prefill plus one step per new token)
against the fp32 matmul peak measured in the same run (before and after, the better).

    python benchmarks/bench_generate.py                 # batch 8 and 32
    python benchmarks/bench_generate.py --batch-sizes 8,64 --new-tokens 128
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops import generation_flops, matmul_peak  # noqa: E402

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="8,32", help="comma-separated batch sizes (default 8,32)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-megatron-decode", action="store_true", help="skip the decode_impl=megatron row")
    return p.parse_args(argv)


def make_hf_model(args, path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=args.prompt_len + args.new_tokens + 8,
        initializer_range=0.1, bos_token_id=1, eos_token_id=None, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


def load_aligner(path):
    from aligner.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(seed=1))
    from aligner.models import from_pretrained

    return from_pretrained(path)


def median_time(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_share(fn) -> float:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    return mm / max(total, 1)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from aligner.rollout import GenerationConfig, RolloutEngine

    with tempfile.TemporaryDirectory() as tmp:
        hf = make_hf_model(args, tmp)
        models, cfg = load_aligner(tmp)
    engines = {"aligner (fused decode)": RolloutEngine(models, cfg, decode_impl="fused")}
    if not args.no_megatron_decode:
        engines["aligner (megatron-core decode)"] = RolloutEngine(models, cfg, decode_impl="megatron")
    gen_config = GenerationConfig(max_new_tokens=args.new_tokens, greedy=True, stop_token_ids=[])
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"model: Llama {args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, heads {args.heads}/"
          f"{args.kv_heads}, vocab {args.vocab} ({n_params / 1e6:.1f}M params, fp32); "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    peak = matmul_peak()
    rows = []
    shares = None
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        g = torch.Generator().manual_seed(b)
        prompts = torch.randint(2, args.vocab, (b, args.prompt_len), generator=g)

        def run_hf():
            with torch.inference_mode():
                return hf.generate(prompts, attention_mask=torch.ones_like(prompts),
                                   max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                   do_sample=False, use_cache=True, pad_token_id=0)

        runs = {"transformers generate": run_hf}
        for name, engine in engines.items():
            runs[name] = lambda engine=engine: engine.generate(prompts.tolist(), gen_config)
        outputs = {name: fn() for name, fn in runs.items()}  # warm-up, and outputs to compare
        reference = outputs["transformers generate"][:, args.prompt_len:]
        same = {name: torch.equal(out.tokens[:, args.prompt_len:], reference)
                for name, out in outputs.items() if name != "transformers generate"}
        times = {name: [] for name in runs}
        for _ in range(args.reps):  # interleaved, so load changes hit every contender alike
            for name, fn in runs.items():
                times[name].append(median_time(fn, 1))
        tokens = b * args.new_tokens
        flops = generation_flops(hf.config, b, args.prompt_len, args.new_tokens)
        hf_tps = tokens / statistics.median(times["transformers generate"])
        for name in runs:
            tps = tokens / statistics.median(times[name])
            rows.append((b, name, tps, tps / hf_tps, same.get(name), flops / statistics.median(times[name])))
        if shares is None:
            shares = (b, matmul_share(runs["aligner (fused decode)"]))

    peak = max(peak, matmul_peak())
    print()
    print(f"measured fp32 matmul peak (1024^3, fastest of 20): {peak / 1e9:.1f} GFLOP/s")
    print(f"{'batch':>5}  {'generator':<32} {'tokens/s':>10} {'vs HF':>7} {'GFLOP/s':>8} {'of peak':>7}  tokens = HF")
    for b, name, tps, ratio, same, rate in rows:
        flag = "" if same is None else ("yes" if same else "NO")
        print(f"{b:>5}  {name:<32} {tps:>10.1f} {ratio:>6.2f}x {rate / 1e9:8.2f} {100 * rate / peak:6.1f}%  {flag}")
    if shares:
        print(f"\nbatch {shares[0]}: matrix multiplies (aten::mm/addmm/bmm) take {100 * shares[1]:.0f}% of the"
              " fused engine's CPU time")
    return 0 if all(same is not False for *_, same in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
