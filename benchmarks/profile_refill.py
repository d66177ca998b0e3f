"""Where a generation's CPU time goes, continuous batching off and on (bench_refill.py's
model and prompts, greedy).

The engine's and the fused decoder's methods are wrapped with CPU-time counters (one
thread): decode steps (and, inside them, the projections ``_linear``, the logits, the
per-row rope / cache-index / attention-bias tables), the newcomers' prefills, the token
decisions, the cache-row drops, megatron-core's prefill. Per decode step it records the
rows, the key columns the attention reads for every row (one span for the batch: the
highest position + 1) and the rows' own lengths, and prints the steps' CPU time by rows.
Runs off, on, off, on (the second pair printed too: the load changes between runs).

    OMP_NUM_THREADS=1 python benchmarks/profile_refill.py            # hidden 256, 4 layers
"""
from __future__ import annotations

import collections
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_refill  # noqa: E402  (the model, its options and the prompts)


def main(argv=None) -> int:
    args = bench_refill.parse_args(argv)
    torch.set_num_threads(args.threads or 1)
    from aligner.rollout import GenerationConfig, RolloutEngine
    from aligner.rollout import decode, engine as engine_mod

    with tempfile.TemporaryDirectory() as tmp:
        bench_refill.make_model(args, tmp)
        models, cfg = bench_refill.load(tmp)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, args.vocab, (args.samples, args.prompt_len), generator=g).tolist()
    config = GenerationConfig(max_new_tokens=args.new_tokens, greedy=True,
                              stop_token_ids=list(range(3, 3 + args.stop_tokens)))
    seconds, calls, steps = collections.defaultdict(float), collections.Counter(), []

    def timed(owner, name, record_step=False):
        inner = getattr(owner, name)

        def wrapper(*a, **k):
            c0 = time.process_time()
            out = inner(*a, **k)
            dt = time.process_time() - c0
            seconds[name] += dt
            calls[name] += 1
            if record_step:  # FusedDecoder.step(self, token_ids, t)
                b, t = a[1].shape[0], a[2]
                span = int(t.max()) + 1 if isinstance(t, torch.Tensor) else t + 1
                own = float(t.float().mean()) + 1 if isinstance(t, torch.Tensor) else t + 1
                steps.append((b, span, own, dt))
            return out

        setattr(owner, name, wrapper)

    timed(decode.FusedDecoder, "step", record_step=True)
    for name in ("prefill", "take", "keep_rows", "_row_bias", "_row_rope", "_cache_index", "_logits"):
        if hasattr(decode.FusedDecoder, name):
            timed(decode.FusedDecoder, name)
    for name in ("_shared_decision", "_write_out", "_admit", "_forward"):
        timed(engine_mod.RolloutEngine, name)
    timed(decode, "_linear")

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for on in (False, True, False, True):
        engine = RolloutEngine(models, cfg, max_batch=args.max_batch, continuous_batching=on)
        seconds.clear(), calls.clear(), steps.clear()
        c0 = time.process_time()
        engine.generate(prompts, config)
        total = time.process_time() - c0
        print(f"\ncontinuous_batching={on}: CPU {total:.2f} s, forwards {engine.forwards}, rows x steps "
              f"{engine.row_steps}, load {os.getloadavg()[0]:.0f}")
        for name, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
            print(f"  {name:<18} {s:7.3f} s {calls[name]:7d} calls {1e6 * s / calls[name]:9.1f} us/call")
        rows = sum(s[0] for s in steps)
        print(f"  decode steps {len(steps)}, rows per step {rows / len(steps):.2f}; key columns read per row "
              f"{sum(s[0] * s[1] for s in steps) / rows:.1f}, the rows' own lengths {sum(s[0] * s[2] for s in steps) / rows:.1f}")
        for lo, hi in ((1, 1), (2, 4), (5, 8), (9, 12), (13, 16), (17, 1 << 30)):
            sel = sorted(s[3] for s in steps if lo <= s[0] <= hi)
            if sel:
                keys = sum(s[1] for s in steps if lo <= s[0] <= hi) / len(sel)
                print(f"    steps of {lo}-{min(hi, args.max_batch)} rows: {len(sel):5d}, median CPU "
                      f"{1e6 * sel[len(sel) // 2]:7.0f} us, key columns {keys:.0f}")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
