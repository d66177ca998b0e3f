"""The phases after generation of one GRPO step, old code against new in one process
(docs/benchmarks_pg.md, "After: the passes after generation profiled").

    OMP_NUM_THREADS=1 python benchmarks/phase_bench.py --model stops --repeats 11 \
        --base /tmp/aligner_base --modules aligner.training.roles [--out FILE]
    OMP_NUM_THREADS=1 python benchmarks/phase_bench.py --model stops --profile [--stacks]
    OMP_NUM_THREADS=1 python benchmarks/phase_bench.py --model stops --calibrate --repeats 11

bench_pg.py's model, prompts and configuration (16 prompts x 4 samples, micro-batches of 16
rows, one thread) run two steps of aligner's GRPO; on the second, before its update, the
phases are repeated ``--repeats`` times on that step's experience, alternating ``old`` and
``new``, each timed by the process's CPU clock (``time.process_time``): the decode of the
step's responses (one ``decode`` call each, then one ``decode_batch``), the host
reference's weight swap alone (``active()`` entered and left), the reference pass
(:meth:`ExperienceMaker.score_passes`) and the update (:meth:`OnlineAlgorithm.update`:
forward, backward and optimizer step; each update moves the weights the next repeat
starts from). ``old``: the functions and methods of ``--modules`` as the source tree
``--base`` has them (for instance ``git archive <commit> | tar -x -C /tmp/aligner_base``),
swapped into the live classes and modules; ``new``: this tree. Printed as JSON: medians
per phase and variant, the largest difference of the two variants' reference log-probs
over response tokens, the token positions of the step's cut and packed micro-batches and
their estimated forward FLOPs (:class:`aligner.training.forward.PassCost`), and the load
averages.

``--calibrate``: the model's forward on fixed shapes, the CPU seconds per token position and
per query-key pair fitted against :class:`aligner.training.forward.PassCost`'s FLOP ratio
(:func:`calibrate`); nothing is compared.

``--profile``: torch.profiler (CPU) of one reference pass and one update of ``new``, the
ops by self CPU time (``--stacks``: with the Python functions that ran them as rows of
their own); nothing is compared.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path


def same_code(a, b) -> bool:
    """Whether two functions (or code objects) compile to the same instructions, constants
    and names, wherever they sit in their files (nested code compared alike)."""
    a, b = (getattr(f, "__func__", f) for f in (a, b))
    a, b = (getattr(f, "__code__", f) for f in (a, b))
    if not (isinstance(a, types.CodeType) and isinstance(b, types.CodeType)):
        return False
    if a.co_code != b.co_code or a.co_names != b.co_names or len(a.co_consts) != len(b.co_consts):
        return False
    return all(same_code(x, y) if isinstance(x, types.CodeType) else (type(x) is type(y) and x == y)
               for x, y in zip(a.co_consts, b.co_consts))


def load_base(base: Path, names):
    """``[(live object, attribute, old value)]``: what swaps the live code for ``base``'s.
    A method whose code is unchanged is not swapped (an old copy of a method that calls
    ``super()`` without arguments would name the old class)."""
    swaps = []
    for name in names:
        live = sys.modules.get(name) or importlib.import_module(name)
        path = base / (name.replace(".", "/") + ".py")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: module {name} is not in the base tree")
        spec = importlib.util.spec_from_file_location(f"_base_{name.replace('.', '_')}", path)
        old = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = old  # dataclasses look their module up
        spec.loader.exec_module(old)
        for attr, value in list(vars(old).items()):
            if isinstance(value, type) and getattr(value, "__module__", None) == old.__name__:
                target = getattr(live, attr, None)
                if target is None:
                    continue
                setattr(old, attr, target)  # the old methods see the live classes (isinstance, super)
                for key, member in vars(value).items():
                    if isinstance(member, (types.FunctionType, staticmethod, classmethod, property)):
                        if not isinstance(member, property) and same_code(member, target.__dict__.get(key)):
                            continue
                        swaps.append((target, key, member))
        for attr, value in vars(old).items():
            if isinstance(value, types.FunctionType) and value.__module__ == old.__name__:
                current = getattr(live, attr, None)
                for module in list(sys.modules.values()):  # everyone who imported the function by name
                    if module is not None and current is not None and getattr(module, attr, None) is current:
                        swaps.append((module, attr, value))
    return swaps


class Variants:
    """Switches between the live code and the swaps of :func:`load_base`."""

    def __init__(self, swaps):
        self.old = swaps
        self.new = [(owner, attr, owner.__dict__.get(attr, None) if isinstance(owner, type) else getattr(owner, attr))
                    for owner, attr, _ in swaps]

    def use(self, which: str) -> None:
        for owner, attr, value in (self.old if which == "old" else self.new):
            if value is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, value)


def step_phases(algo, context, exp, extra, variants: Variants, repeats: int, profile: bool,
                stacks: bool = False) -> dict:
    maker = algo.maker
    tok = maker.tokenizer
    responses = [exp.tokens[i, int(p):int(p) + int(r)].tolist()
                 for i, (p, r) in enumerate(zip(exp.prompt_lengths, exp.response_lengths))]

    def decode():  # the responses one decode call each, then in one decode_batch call
        t0 = time.process_time()
        texts = [tok.decode(ids) for ids in responses]
        t1 = time.process_time()
        batch = tok.decode_batch(responses)
        decode_times.append((t1 - t0, time.process_time() - t1))
        if batch != texts:
            raise AssertionError("decode_batch and decode disagree")
        return texts

    def reference():
        return maker.score_passes(context, dataclasses.replace(exp, old_logps=None, ref_logps=None),
                                  old_logps=False).ref_logps

    def swap():  # the host reference's weights in and out, no pass
        with maker.reference.active():
            pass

    def update():
        return algo.update(context, dataclasses.replace(exp, old_logps=None, ref_logps=exp.ref_logps), extra)

    decode_times = []
    phases = {"decode": decode, "swap": swap, "reference": reference, "update": update}
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        variants.use("new")
        reference(), update()  # warm
        out = {}
        for name in ("reference", "update"):
            with torch_profile(activities=[ProfilerActivity.CPU], with_stack=stacks) as prof:
                phases[name]()
            table = prof.key_averages(group_by_stack_n=6 if stacks else 0).table(
                sort_by="self_cpu_time_total", row_limit=60 if stacks else 25)
            total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
            print(f"== {name}: {total:.3f} s self CPU in all ops\n{table}", flush=True)
            out[name] = total
        return out
    times = {f"{name}/{v}": [] for name in phases for v in ("old", "new")}
    results = {}
    for rep in range(repeats):
        for v in (("old", "new") if rep % 2 == 0 else ("new", "old")):
            variants.use(v)
            for name, fn in phases.items():
                t0 = time.process_time()
                value = fn()
                times[f"{name}/{v}"].append(time.process_time() - t0)
                if rep == 0 and name in ("decode", "reference"):
                    results[f"{name}/{v}"] = value
    variants.use("new")
    out = {k: statistics.median(v) for k, v in times.items()}
    out["decode_equal"] = results["decode/old"] == results["decode/new"]
    out["decode_per_call"] = statistics.median(t for t, _ in decode_times)
    out["decode_batch"] = statistics.median(t for _, t in decode_times)
    diff = (results["reference/old"] - results["reference/new"]).abs() * exp.response_mask
    out["reference_max_abs_diff"] = float(diff.max())  # over the response tokens
    from aligner.training.forward import packed_rows, pass_cost, trimmed_rows

    ends = (exp.prompt_lengths + exp.response_lengths).tolist()
    cost = pass_cost(context.roles["policy"].chunks)
    out["cost_weights"] = {"position": cost.position, "pair": cost.pair}
    for name, fn in (("trimmed", trimmed_rows), ("packed", packed_rows)):
        micro = fn(exp.tokens, ends, context.micro_batch_size)
        out[f"positions/{name}"] = None if micro is None else sum(b["tokens"].numel() for b in micro)
        out[f"cost/{name}"] = None if micro is None else cost.microbatches(micro)  # estimated FLOPs of a forward
    out["all"] = times
    return out


def run(model: str, prompts: str, out_dir: str, base: str, modules: str, repeats: int, profile: bool,
        stacks: bool = False):
    """A spawned rank: two GRPO steps, the phases measured on the second's experience."""
    import torch

    torch.set_num_threads(1)
    from bench_pg import CLIP, CONTEXT, KL_COEF, LR

    from aligner.algorithms.online import OnlineAlgorithm
    from aligner.algorithms.pg import PGTrainer
    from aligner.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(seed=0))

    variants = Variants(load_base(Path(base), [m for m in modules.split(",") if m]) if base else [])
    found = {}
    real_update = OnlineAlgorithm.update

    def update(self, context, exp, extra):
        if context.step == 1 and not found:
            found["measuring"] = True  # the measured updates call this again
            found.update(step_phases(self, context, exp, extra, variants, repeats, profile, stacks))
            del found["measuring"]
        return real_update(self, context, exp, extra)

    OnlineAlgorithm.update = update
    P, G = 16, 4
    cfg = {
        "algorithm": "pg",
        "init": {"hf": model},
        "data": {"train": prompts, "tokenizer": model, "template": "raw", "max_length": CONTEXT},
        "optim": {"lr": LR, "clip_grad": 1.0, "weight_decay": 0.0},
        "trainer": {"max_steps": 2, "global_batch_size": P, "micro_batch_size": P, "out_dir": out_dir,
                    "progress": False, "tensorboard": False, "save_interval": 0, "export_hf": False,
                    "resume": False, "seed": 0},
        "pg": {"reward": {"kind": "function", "function": "bench_pg:aligner_reward"},
               "advantage": "grpo", "loss": "clipped", "aggregation": "token_mean", "clip_eps": CLIP,
               "kl_coef": KL_COEF, "kl_mode": "loss", "kl_estimator": "k3", "samples_per_prompt": G,
               "generation": {"max_new_tokens": 64, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                              "max_batch": P * G}},
    }
    PGTrainer(cfg).fit()
    return found


def calibrate(model: str, repeats: int) -> dict:
    """A spawned rank: the model's forward (no gradient, one thread) timed by the CPU clock
    on micro-batches of 16 rows, causal without a mask (rows cut to 24..96 tokens) and packed
    with a block-diagonal mask (rows of 48 and 96 holding 1, 2 or 4 samples); the least-squares fit
    ``seconds = a * positions + b * query-key pairs`` (pairs as
    :class:`aligner.training.forward.PassCost` counts them) against the FLOP estimate's
    ratio ``position / pair``. Medians of ``repeats`` per shape."""
    import torch

    torch.set_num_threads(1)
    from aligner.models.gpt import packed_attention_mask, packed_position_ids
    from aligner.models.hf import from_pretrained
    from aligner.parallel import ParallelConfig, initialize
    from aligner.training.forward import pass_cost

    initialize(ParallelConfig(seed=0))
    chunk = from_pretrained(model)[0][0].eval()
    cost = pass_cost(chunk)
    shapes = []
    for w in (24, 48, 72, 96):
        shapes.append({"tokens": torch.randint(3, 400, (16, w)), "position_ids": None, "attention_mask": None})
    for w in (48, 96):
        for parts in (1, 2, 4):  # one part: the causal mask given explicitly
            seg = torch.arange(w).div(w // parts, rounding_mode="floor").expand(16, w)
            shapes.append({"tokens": torch.randint(3, 400, (16, w)), "position_ids": packed_position_ids(seg),
                           "attention_mask": packed_attention_mask(seg)})
    rows = []
    with torch.no_grad():
        for b in shapes:
            chunk(b["tokens"], b["position_ids"], b["attention_mask"])  # warm
            times = []
            for _ in range(repeats):
                t0 = time.process_time()
                chunk(b["tokens"], b["position_ids"], b["attention_mask"])
                times.append(time.process_time() - t0)
            k, w = b["tokens"].shape
            pairs = k * (w * w if b["attention_mask"] is not None else w * (w + 1) // 2)
            rows.append({"shape": [k, w], "packed": b["attention_mask"] is not None, "positions": k * w,
                         "pairs": pairs, "seconds": statistics.median(times),
                         "estimate": cost.microbatch(b)})
    x = torch.tensor([[r["positions"], r["pairs"]] for r in rows], dtype=torch.float64)
    y = torch.tensor([r["seconds"] for r in rows], dtype=torch.float64)
    a, b = torch.linalg.lstsq(x, y[:, None]).solution[:, 0].tolist()
    return {"shapes": rows, "fit_position_s": a, "fit_pair_s": b, "fit_position_per_pair": a / b,
            "flops_position_per_pair": cost.position / cost.pair}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="stops", choices=["stops", "never"])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--base", default="", help="source tree of the old code (empty: old = new)")
    parser.add_argument("--modules", default="", help="comma-separated modules whose old code is swapped in")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--stacks", action="store_true", help="with --profile: the ops grouped by Python stack")
    parser.add_argument("--calibrate", action="store_true",
                        help="fit the forward's CPU seconds per position and per query-key pair (nothing compared)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    here = str(Path(__file__).parent)
    sys.path.insert(0, here)
    from bench_pg import make_assets

    from aligner.parallel.spawn import spawn_local

    work = Path(tempfile.mkdtemp(prefix="phase_bench_"))
    assets = make_assets(work, 16)
    load_before = os.getloadavg()
    if args.calibrate:
        found = spawn_local(calibrate, 1, assets[args.model], args.repeats, timeout=3600, threads_per_rank=1)[0]
    else:
        found = spawn_local(run, 1, assets[args.model], assets["prompts"], str(work / "run"), args.base,
                            args.modules, args.repeats, args.profile, args.stacks, timeout=3600, threads_per_rank=1)[0]
    report = {"model": args.model, "repeats": args.repeats, "modules": args.modules, "load_before": load_before,
              "load_after": os.getloadavg(), **found}
    print(json.dumps({k: v for k, v in report.items() if k != "all"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
