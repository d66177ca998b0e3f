"""The rollout engine against an earlier revision of itself, in one process (docs/rollout.md).

    OMP_NUM_THREADS=1 python benchmarks/bench_prefill.py --baseline REV [--case pg|refill] [--reps 5]
    OMP_NUM_THREADS=1 python benchmarks/bench_prefill.py --baseline REV --profile   # where a call's time goes

The baseline is ``aligner/rollout/`` as committed at git revision ``REV`` (read with ``git
show`` in the current directory's repository, imported as a package of its own beside the
``aligner`` that Python imports); both engines run on the
same model objects, alternately (baseline, current, baseline, current, ...), so both see
the same machine load. Per generate call: this process's CPU seconds
(``time.process_time``, one thread) and wall seconds; medians are reported, with the
forwards (prefills and decode steps) and rows x decode steps, and whether the outputs are
identical (tokens and stop reasons; log-probs to float rounding). The load average is
printed before and after.

Cases:

- ``pg``: the two models of ``benchmarks/bench_pg.py`` (``stops``: responses end on EOS
  after ~24 tokens on average; ``never``: every response runs to the limit), its prompts
  (8 to 32 words), its generation: 16 prompts x G = 4 samples = 64 rows in one batch of 64
  slots, 64 new tokens at most, temperature 1. One generate call is one step's generation;
  ``--steps`` calls with different prompts (and seeds) per repeat.
- ``refill``: the continuous-batching model of ``benchmarks/bench_refill.py`` (hidden 256,
  4 layers, an output layer scaled so that 4 stop tokens of 512 end a sampled response with
  probability ~1/128 per step: lengths spread up to the 256-token cap), 128 samples whose
  prompts have 8 to 32 random tokens, 16 slots, continuous batching on.

``--profile``: instead of timing, one warm call per engine (after a warm-up call) under
``torch.profiler`` (CPU): the operators dispatched per forward (every call of a torch
operator, nested ones included) and the top operators by self CPU time; the same call
again with a dispatch counter (the torch operators called from Python, by the rollout
function that calls them) and under ``cProfile``, whose tottime of the rollout modules'
own functions is the Python time outside operators (cProfile inflates it).
"""
from __future__ import annotations

import argparse
import cProfile
import collections
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_baseline(rev: str, folder: Path):
    """``aligner/rollout`` at ``rev`` as the package ``baseline_rollout`` -> its engine module."""
    pkg = folder / "baseline_rollout"
    pkg.mkdir()
    for name in ("__init__", "engine", "decode", "sampling"):
        src = subprocess.run(["git", "show", f"{rev}:aligner/rollout/{name}.py"], check=True,
                             capture_output=True, text=True).stdout
        (pkg / f"{name}.py").write_text(src.replace("aligner.rollout.", "baseline_rollout."))
    sys.path.insert(0, str(folder))
    return importlib.import_module("baseline_rollout.engine")


def load_model(path):
    from aligner.models import from_pretrained

    return from_pretrained(path)


def pg_case(work: Path, steps: int):
    """bench_pg's models and prompts -> {model name: (model dir, [calls: (prompts, seeds)])}."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_pg
    from transformers import AutoTokenizer

    assets = bench_pg.make_assets(work, 16 * steps)
    tok = AutoTokenizer.from_pretrained(assets["stops"])
    texts = [json.loads(line)["prompt"] for line in Path(assets["prompts"]).read_text().splitlines()]
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    calls = []
    for step in range(steps):
        rows = [p for p in ids[16 * step:16 * step + 16] for _ in range(4)]  # G = 4 samples per prompt
        calls.append((rows, [1000 * step + i for i in range(len(rows))]))
    return {name: assets[name] for name in ("stops", "never")}, calls


def refill_model(work: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=32 + 256 + 8,
                         initializer_range=0.1, bos_token_id=1, eos_token_id=None, pad_token_id=0,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(0.02)
    model.save_pretrained(work / "refill")
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 33, (128,), generator=g).tolist()
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in lengths]
    return str(work / "refill"), [(prompts, list(range(len(prompts))))]


def profile_call(name: str, key: str, engine, prompts, config, seeds) -> None:
    """The profile of one generate call (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            frames = [f for f in traceback.extract_stack() if "rollout" in f.filename]
            self.calls[frames[-1].name if frames else "other"] += 1
            return func(*args, **(kwargs or {}))

    engine.generate(prompts, config, seeds=seeds)  # warm-up
    before = engine.forwards
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.generate(prompts, config, seeds=seeds)
    forwards = engine.forwards - before
    events = prof.key_averages()
    ops = sum(e.count for e in events)
    self_us = sum(e.self_cpu_time_total for e in events)
    counter = Counter()
    with counter:
        engine.generate(prompts, config, seeds=seeds)
    python = cProfile.Profile()
    c0 = time.process_time()
    python.enable()
    engine.generate(prompts, config, seeds=seeds)
    python.disable()
    cpu = time.process_time() - c0
    import pstats

    stats = pstats.Stats(python).stats
    own = sum(tt for (path, _, _), (_, _, tt, _, _) in stats.items() if Path(path).parent.name.endswith("rollout"))
    dispatched = sum(counter.calls.values())
    print(f"\n{name} / {key}: {forwards} forwards; operators per forward (profiler, nested included) "
          f"{ops / forwards:.0f}, dispatched from Python per forward {dispatched / forwards:.0f}; "
          f"self CPU of all operators {self_us / 1e6:.3f} s")
    print("  dispatched by function: " + ", ".join(f"{k} {v}" for k, v in counter.calls.most_common(12)))
    print(f"  under cProfile: CPU {cpu:.3f} s, Python time of the rollout functions themselves {own:.3f} s")
    print("  top operators by self CPU (ms, calls): " + "; ".join(
        f"{e.key} {e.self_cpu_time_total / 1e3:.1f} ({e.count})"
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="git revision of the baseline aligner/rollout")
    p.add_argument("--case", choices=("pg", "refill"), default="pg")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="pg: generate calls (steps) per repeat")
    p.add_argument("--profile", action="store_true", help="profile one call per engine instead of timing")
    args = p.parse_args(argv)

    from aligner.parallel import ParallelConfig, initialize
    from aligner.rollout import GenerationConfig, RolloutEngine

    initialize(ParallelConfig(seed=1))
    work = Path(tempfile.mkdtemp())
    baseline = load_baseline(args.baseline, work)
    if args.case == "pg":
        dirs, calls = pg_case(work, args.steps)
        config = dict(max_new_tokens=64, temperature=1.0, top_k=0, top_p=1.0, stop_token_ids=[3])
        slots = 64
    else:
        folder, calls = refill_model(work)
        dirs = {"refill": folder}
        config = dict(max_new_tokens=256, temperature=1.0, stop_token_ids=[3, 4, 5, 6])
        slots = 16
    import aligner

    print(f"baseline {args.baseline}, current: {Path(aligner.__file__).parent}; case {args.case}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    ok = True
    for name, folder in dirs.items():
        models, cfg = load_model(folder)
        engines = {"baseline": baseline.RolloutEngine(models, cfg, max_batch=slots),
                   "current": RolloutEngine(models, cfg, max_batch=slots)}
        gen = {"baseline": baseline.GenerationConfig(**config), "current": GenerationConfig(**config)}
        if args.profile:
            for key, engine in engines.items():
                profile_call(name, key, engine, calls[0][0], gen[key], calls[0][1])
            continue
        results = {}
        for key, engine in engines.items():  # warm-up; outputs and counts
            before = (engine.forwards, engine.row_steps)
            results[key] = [engine.generate(prompts, gen[key], seeds=seeds) for prompts, seeds in calls]
            results[key + "_counts"] = (engine.forwards - before[0], engine.row_steps - before[1])
        cpu = {key: [] for key in engines}
        wall = {key: [] for key in engines}
        for _ in range(args.reps):
            for prompts, seeds in calls:
                for key, engine in engines.items():
                    t0, c0 = time.perf_counter(), time.process_time()
                    engine.generate(prompts, gen[key], seeds=seeds)
                    wall[key].append(time.perf_counter() - t0)
                    cpu[key].append(time.process_time() - c0)
        same, diff = True, 0.0
        for a, b in zip(results["baseline"], results["current"]):
            same &= torch.equal(a.tokens, b.tokens) and a.stop_reasons == b.stop_reasons
            diff = max(diff, float((a.logprobs - b.logprobs).abs().max()))
        ok &= same
        plen = [len(x) for prompts, _ in calls for x in prompts]
        rlen = [n for r in results["current"] for n in r.response_lengths.tolist()]
        print(f"\n{name}: {len(calls)} calls of {len(calls[0][0])} rows, prompts {min(plen)}-{max(plen)} tokens, "
              f"responses mean {statistics.mean(rlen):.1f} (min {min(rlen)}, max {max(rlen)}); outputs identical: "
              f"{'yes' if same else 'NO'} (log-probs max |diff| {diff:.1e})")
        print(f"  {'engine':<10} {'forwards':>8} {'rows x steps':>12} {'CPU s/call':>10} {'wall s/call':>11}"
              "  CPU s of each call")
        for key in engines:
            f, r = results[key + "_counts"]
            print(f"  {key:<10} {f:>8} {r:>12} {statistics.median(cpu[key]):>10.3f} {statistics.median(wall[key]):>11.3f}"
                  f"  {' '.join(f'{x:.3f}' for x in cpu[key])}")
        c0, c1 = (statistics.median(cpu[k]) for k in engines)
        w0, w1 = (statistics.median(wall[k]) for k in engines)
        print(f"  baseline / current: CPU {c0 / c1:.2f}x, wall {w0 / w1:.2f}x, forwards "
              f"{results['baseline_counts'][0] / results['current_counts'][0]:.2f}x")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
