"""Continuous batching in the rollout engine: refills on vs off, at the same outputs.

A random Llama-shaped model is made with transformers and imported (TP=1, fp32). Its output
layer is scaled down (``--logit-scale``) so that the next-token distribution is close to
uniform over the vocabulary: with ``--stop-tokens`` k stop tokens out of a vocabulary of V,
a sampled response ends at each step with probability about k / V, so response lengths
spread geometrically from a few tokens up to the ``--new-tokens`` cap (the defaults: 1/128
per step, mean about 110 tokens, cap 256). No reward is involved: only generation is timed.

``--samples`` prompts (``--prompt-len`` random tokens each) are generated with
``--max-batch`` slots by the engine with ``continuous_batching`` off (each batch of
``max_batch`` decodes until its longest row ends; finished rows leave, so the batch thins
out) and on (a finished row's slot goes to the next waiting prompt). Sampled (temperature
1, the same seeds) and greedy. Reported per mode: response lengths, model forwards
(prefills and decode steps: the load-free cost on a dispatch-bound CPU), rows x decode
steps (the arithmetic), the medians of ``--reps`` interleaved timed runs (off, on, off, on,
...: both see the same load) in wall time and in this process's CPU time (with one thread,
the work done, less sensitive than wall time to other processes on a shared machine) and
the speed-ups; outputs must be identical (tokens and stop
reasons; log-probs to float rounding). The load average is printed before and after.

    python benchmarks/bench_refill.py                            # 128 samples, 16 slots
    python benchmarks/profile_refill.py                          # where the time goes
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--stop-tokens", type=int, default=4, help="stop tokens: P(stop) per step ~ this / vocab")
    p.add_argument("--logit-scale", type=float, default=0.02, help="output layer scale (small: near uniform)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--modes", default="sampled,greedy")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def make_model(args, path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.prompt_len + args.new_tokens + 8, initializer_range=0.1,
        bos_token_id=1, eos_token_id=None, pad_token_id=0, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(args.logit_scale)
    model.save_pretrained(path)


def load(path):
    from aligner.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(seed=1))
    from aligner.models import from_pretrained

    return from_pretrained(path)


def lengths_summary(lengths) -> str:
    q = torch.tensor(lengths, dtype=torch.float64).quantile(torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64))
    return ("min {:.0f} p10 {:.0f} median {:.0f} p90 {:.0f} max {:.0f}".format(*q.tolist())
            + f", total {sum(lengths)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from aligner.rollout import GenerationConfig, RolloutEngine

    with tempfile.TemporaryDirectory() as tmp:
        make_model(args, tmp)
        models, cfg = load(tmp)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, args.vocab, (args.samples, args.prompt_len), generator=g).tolist()
    stops = list(range(3, 3 + args.stop_tokens))
    configs = {
        "sampled": GenerationConfig(max_new_tokens=args.new_tokens, temperature=1.0, stop_token_ids=stops, seed=0),
        "greedy": GenerationConfig(max_new_tokens=args.new_tokens, greedy=True, stop_token_ids=stops),
    }
    variants = {"off": dict(continuous_batching=False), "on": dict(continuous_batching=True)}
    print(f"model: Llama {args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, heads {args.heads}/"
          f"{args.kv_heads}, vocab {args.vocab}, output layer x{args.logit_scale}; {args.samples} samples of "
          f"{args.prompt_len}-token prompts, {args.max_batch} slots, up to {args.new_tokens} new tokens, "
          f"{len(stops)} stop tokens; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    ok = True
    for mode in args.modes.split(","):
        config = configs[mode]
        engines = {name: RolloutEngine(models, cfg, max_batch=args.max_batch, **kw) for name, kw in variants.items()}
        results, counts = {}, {}
        times, cpu = {name: [] for name in engines}, {name: [] for name in engines}
        for name, engine in engines.items():  # warm-up; outputs and counts
            results[name] = engine.generate(prompts, config)
            counts[name] = (engine.forwards, engine.row_steps)
        for _ in range(args.reps):
            for name, engine in engines.items():
                t0, c0 = time.perf_counter(), time.process_time()
                engine.generate(prompts, config)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        names = list(engines)
        a, b = results[names[0]], results[names[1]]
        same = torch.equal(a.tokens, b.tokens) and a.stop_reasons == b.stop_reasons
        logp_diff = float((a.logprobs - b.logprobs).abs().max())
        ok &= same
        print(f"\n{mode}: response lengths {lengths_summary(a.response_lengths.tolist())}; outputs identical: "
              f"{'yes' if same else 'NO'} (log-probs max |diff| {logp_diff:.1e})")
        print(f"  {'engine':<28} {'forwards':>8} {'rows x steps':>12} {'wall s':>7} {'CPU s':>7} {'CPU min':>7}"
              "  CPU s of each run")
        for name in names:
            print(f"  {name:<28} {counts[name][0]:>8} {counts[name][1]:>12} {statistics.median(times[name]):>7.3f}"
                  f" {statistics.median(cpu[name]):>7.3f} {min(cpu[name]):>7.3f}"
                  f"  {' '.join(f'{x:.2f}' for x in cpu[name])}")
        t0, t1 = (statistics.median(times[n]) for n in names)
        c0, c1 = (statistics.median(cpu[n]) for n in names)
        m0, m1 = (min(cpu[n]) for n in names)
        f0, f1 = (counts[n][0] for n in names)
        print(f"  {names[0]} / {names[1]}: wall time {t0 / t1:.2f}x, CPU time {c0 / c1:.2f}x (fastest runs"
              f" {m0 / m1:.2f}x), forwards {f0 / f1:.2f}x")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
