"""The GPU suite's measurements (run by ``benchmarks/gpu_suite.sh``; each writes one JSON).

    python benchmarks/gpu_bench.py train    --out OUT/train.json    [--model llama_1b --seq 4096]
    python benchmarks/gpu_bench.py generate --out OUT/generate.json [--model llama_1b --batches 1,16,64]
    python benchmarks/gpu_bench.py report   OUT                     (OUT/summary.json + OUT/summary.md)

``train``: SFT and reward-model (5-attribute regression) training on random token
sequences packed into ``--seq``-token bins (block-diagonal attention), bf16 parameters
with fp32 main parameters and gradients, the layer spec ``auto`` picks. Tokens/s counts
real tokens; model FLOPs follow ``benchmarks/flops.py`` (3 x forward: 2 FLOPs per matmul
parameter per token plus causal attention per packed sample) and MFU divides their
rate by the device's dense bf16 peak (datasheet, by device name) and by the bf16 matmul
rate measured in the same run.

``generate``: the same architecture with random weights made by transformers, saved and
imported by aligner; greedy generation of ``--new-tokens`` after ``--prompt-len`` tokens
by transformers ``generate`` (bf16, static cache) and by aligner's rollout engine, at
each batch size; median of ``--reps`` after a warm-up; the share of identical tokens.

Every step also runs on a CPU at toy sizes (``--smoke``), which is how it is tested here.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops import generation_flops, matmul_peak, training_flops  # noqa: E402

# dense bf16 tensor-core peaks from the datasheets (FLOP/s, without sparsity)
DATASHEET_BF16 = {"H200": 989.4e12, "H100 SXM": 989.4e12, "H100 80GB HBM3": 989.4e12, "H100 NVL": 835e12,
                  "H100 PCIe": 756e12, "A100": 312e12, "L40S": 362e12}


def device_peak() -> tuple:
    """(name, datasheet bf16 peak or None) of the current device."""
    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name()
    for key, peak in DATASHEET_BF16.items():
        if key in name:
            return name, peak
    return name, None


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _write(path, data):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True))
    print(json.dumps(data, sort_keys=True))


def _model_cfg(args, **overrides):
    from aligner.models import ModelConfig

    if args.smoke:
        return ModelConfig(vocab_size=512, hidden_size=64, ffn_hidden_size=128, num_layers=2, num_attention_heads=4,
                           num_query_groups=2, max_position_embeddings=1024, pad_token_id=0, **overrides)
    return ModelConfig.preset(args.model, pad_token_id=0, **overrides)


# ---------------------------------------------------------------------------- train
def _train_samples(kind, n, seq, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(seq // 16, seq // 2 + 1, (1,), generator=g))
        tokens = torch.randint(1, vocab, (length,), generator=g)
        if kind == "sft":
            mask = torch.ones(length)
            mask[: length // 4] = 0  # a prompt quarter
            out.append({"tokens": tokens, "loss_mask": mask, "index": i})
        else:
            out.append({"tokens": tokens, "labels": torch.randint(0, 5, (5,), generator=g).float(),
                        "label_mask": torch.ones(5), "index": i})
    return out


def train(args) -> int:
    from aligner.algorithms.reward import RewardAlgorithm
    from aligner.algorithms.sft import SFTAlgorithm
    from aligner.models import build_model
    from aligner.models.layer_spec import describe_layer_spec
    from aligner.parallel import ParallelConfig, get_device, initialize, set_seed
    from aligner.training.config import OptimSection, TrainerSection
    from aligner.training.loop import TrainingLoop

    initialize(ParallelConfig(seed=0))
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    name, datasheet = device_peak()
    measured = matmul_peak(n=1024 if args.smoke else 8192, repeats=5 if args.smoke else 10, dtype=dtype,
                           device=str(get_device()))
    result = {"device": name, "layer_spec": describe_layer_spec(), "dtype": args.dtype, "seq": args.seq,
              "datasheet_peak": datasheet, "measured_matmul_peak": measured, "runs": {}}
    attrs = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]
    for kind in ("sft", "rm"):
        set_seed(0)
        cfg = _model_cfg(args)
        head = None if kind == "sft" else "reward"
        model = build_model(cfg, head=head, num_outputs=5 if head else 1, params_dtype=dtype).to(get_device())
        algo = (SFTAlgorithm(0, packing=True, capacity=args.seq) if kind == "sft" else
                RewardAlgorithm(0, mode="regression", attributes=attrs, packing=True, capacity=args.seq))
        gbs = args.bins * 4  # samples per step: about 4 per bin at these lengths
        samples = _train_samples(kind, gbs * (args.steps + args.warmup + 1), args.seq, cfg.vocab_size)
        loop = TrainingLoop(algo, [model], samples, optim=OptimSection(lr=1e-5), model_cfg=cfg,
                            trainer=TrainerSection(max_steps=10_000, global_batch_size=gbs, micro_batch_size=1,
                                                   out_dir=tempfile.mkdtemp(), progress=False, tensorboard=False,
                                                   export_hf=False, resume=False))
        for _ in range(args.warmup):
            loop.train_step()
        _sync()
        start = loop.step
        t0 = time.perf_counter()
        losses = [loop.train_step()["loss"] for _ in range(args.steps)]
        _sync()
        elapsed = time.perf_counter() - t0
        lengths = [int(s["tokens"].numel()) for k in range(start, loop.step) for s in loop.global_batch(k)]
        flops = training_flops(cfg, lengths)
        rate = flops / elapsed
        result["runs"][kind] = {
            "tokens_per_s": sum(lengths) / elapsed, "s_per_step": elapsed / args.steps, "model_flops_per_s": rate,
            "mfu_datasheet": rate / datasheet if datasheet else None, "mfu_measured": rate / measured,
            "losses": losses, "params": cfg.num_parameters(),
            "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        }
        del loop, model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    _write(args.out, result)
    return 0


# ---------------------------------------------------------------------------- generate
def generate(args) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    from aligner.models import from_pretrained
    from aligner.parallel import ParallelConfig, get_device, initialize
    from aligner.rollout import GenerationConfig, RolloutEngine

    initialize(ParallelConfig(seed=0))
    device = get_device()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = _model_cfg(args)
    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type")})
    hf_cfg.eos_token_id = None  # no row stops early: both do the same work
    torch.manual_seed(0)
    with torch.device(device):
        hf = LlamaForCausalLM(hf_cfg).to(dtype).eval()
    work = Path(tempfile.mkdtemp())
    hf.save_pretrained(work)
    models, acfg = from_pretrained(str(work), params_dtype=dtype)
    engine = RolloutEngine(models, acfg, max_batch=max(args.batches))
    gen_config = GenerationConfig(max_new_tokens=args.new_tokens, greedy=True, stop_token_ids=[])
    result = {"device": device_peak()[0], "dtype": args.dtype, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "batches": {}}
    for b in args.batches:
        g = torch.Generator().manual_seed(b)
        prompts = torch.randint(2, cfg.vocab_size, (b, args.prompt_len), generator=g)

        def run_hf(prompts=prompts):
            with torch.inference_mode():
                out = hf.generate(prompts.to(device), attention_mask=torch.ones_like(prompts, device=device),
                                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                                  use_cache=True, cache_implementation="static", pad_token_id=0)
            _sync()
            return out[:, args.prompt_len:].cpu()

        def run_aligner(prompts=prompts):
            out = engine.generate(prompts.tolist(), gen_config)
            _sync()
            return out.tokens[:, args.prompt_len:args.prompt_len + args.new_tokens].cpu()

        ref, ours = run_hf(), run_aligner()  # warm-up; outputs compared
        times = {"transformers": [], "aligner": []}
        for _ in range(args.reps):
            for key, fn in (("transformers", run_hf), ("aligner", run_aligner)):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        flops = generation_flops(cfg, b, args.prompt_len, args.new_tokens)
        row = {key: {"tokens_per_s": b * args.new_tokens / statistics.median(t),
                     "model_flops_per_s": flops / statistics.median(t)} for key, t in times.items()}
        row["ratio"] = row["aligner"]["tokens_per_s"] / row["transformers"]["tokens_per_s"]
        row["same_tokens_share"] = float((ref == ours).float().mean())
        result["batches"][str(b)] = row
    _write(args.out, result)
    return 0


# ---------------------------------------------------------------------------- report
def report(args) -> int:
    out = Path(args.dir)
    parts = {name: json.loads((out / f"{name}.json").read_text()) for name in ("env", "tests", "train", "generate", "dpo")
             if (out / f"{name}.json").is_file()}
    rows = []
    train_part = parts.get("train", {})
    runs = train_part.get("runs", {})
    for kind, r in sorted(runs.items(), key=lambda kv: kv[0] != "sft"):  # SFT first
        mfu = r.get("mfu_datasheet")
        rows.append([f"{kind.upper()} training, {train_part['dtype']}, seq {train_part['seq']} packed",
                     f"{r['tokens_per_s']:.0f} tokens/s",
                     f"MFU {100 * mfu:.1f}% of datasheet" if mfu else "MFU n/a (unknown device)",
                     f"{100 * r['mfu_measured']:.1f}% of measured matmul peak"])
    for b, r in parts.get("generate", {}).get("batches", {}).items():
        rows.append([f"generation, batch {b}", f"{r['aligner']['tokens_per_s']:.0f} tokens/s",
                     f"{r['ratio']:.2f}x transformers (static cache)",
                     f"{100 * r['same_tokens_share']:.0f}% identical tokens"])
    if "dpo" in parts:
        d = parts["dpo"]
        rows.append(["DPO step time vs TRL", f"{d['ratio']:.2f}x TRL", f"aligner {d['aligner_s']:.1f} s",
                     f"TRL {d['trl_s']:.1f} s"])
    if "tests" in parts:
        t = parts["tests"]
        rows.append(["CUDA test subset", f"exit status {t['returncode']}", t.get("summary", ""), ""])
    table = ["| measurement | value | vs | note |", "|---|---|---|---|"]
    table += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    header = [f"# aligner GPU suite: {train_part.get('device') or parts.get('env', {}).get('gpus')}",
              f"layer spec: {train_part.get('layer_spec', '?')}", ""]
    (out / "summary.md").write_text("\n".join(header + table) + "\n")
    (out / "summary.json").write_text(json.dumps(parts, indent=2, sort_keys=True))
    print("\n".join(header + table))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("train", "generate"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True)
        p.add_argument("--model", default="llama_1b")
        p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
        p.add_argument("--smoke", action="store_true", help="toy sizes (CPU check of the script)")
    t = sub.choices["train"]
    t.add_argument("--seq", type=int, default=4096)
    t.add_argument("--bins", type=int, default=8, help="packed bins per step (micro-batch 1 bin)")
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--warmup", type=int, default=2)
    g = sub.choices["generate"]
    g.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    g.add_argument("--prompt-len", type=int, default=128)
    g.add_argument("--new-tokens", type=int, default=128)
    g.add_argument("--reps", type=int, default=2)
    r = sub.add_parser("report")
    r.add_argument("dir")
    args = ap.parse_args(argv)
    return {"train": train, "generate": generate, "report": report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
