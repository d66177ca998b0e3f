"""Full fine-tuning against LoRA (rank 16) for DPO and GRPO on a ~100M-parameter model.

    python benchmarks/lora.py [--work DIR] [--steps 3] [--rank 16] [--pairs 2] [--prompts 2]

A random Llama-shaped model (14 layers, hidden 768, FFN 2048, 12 heads, the world
tokenizer's vocabulary of 512, untied: 100M parameters, fp32) saved as an HF folder, and
the embedded world (its tokenizer, preference pairs and exact-answer prompts). Four runs, each in a process of
its own (so that its peak RSS is its own):

- ``dpo/full``, ``dpo/lora``: ``aligner train dpo`` (``dpo.reference=resident``: the full
  run keeps the initial weights on the host and swaps them in, LoRA disables its adapters),
  ``--pairs`` pairs a step, micro-batch 1;
- ``grpo/full``, ``grpo/lora``: ``aligner train grpo`` with the exact-answer reward (the
  reference: the full run's host copy, LoRA's adapters off), ``--prompts`` prompts x 4
  responses of at most 32 tokens a step.

Per run: bytes of parameters (every model tensor of the job, the reference's copy
included), gradients (megatron-core's DDP buffers, fp32), optimizer state (Adam's
moments); the peak RSS of the process (``ru_maxrss``); the median step time over the
steps after the first; the size of the checkpoint the run saved at its last step; for
LoRA the time of the base fingerprint its checkpoint records. Prints a markdown table (the
one in docs/lora.md) and writes ``<work>/results.json``. Run it with OMP_NUM_THREADS=1.

``--rollout``: generation with adapters, the added path (what the rollout engine does)
against merging them into the weights for the generation (``adapters_merged``: merge,
generate, restore, all timed) and against the base alone (adapters disabled), on a
smaller model (8 layers, hidden 512), 16 prompts x 48 sampled tokens, the three
interleaved in each of ``--rounds`` rounds; prints the fastest and median times.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RUNS = ("dpo/full", "dpo/lora", "grpo/full", "grpo/lora")
SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=14, num_attention_heads=12,
             num_key_value_heads=12, max_position_embeddings=512)


def prepare(work: Path) -> dict:
    """The HF model folder and the world (made once, reused)."""
    from aligner.data.world import synthesize

    world = synthesize(work / "world", seed=0) if not (work / "world" / "tokenizer.model").is_file() else None
    paths = {"model": str(work / "model"), "world": str(work / "world")}
    if not (work / "model" / "config.json").is_file():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from aligner.data import load_tokenizer

        tok = load_tokenizer(str(work / "world" / "tokenizer.model"))
        torch.manual_seed(0)
        config = LlamaConfig(**SHAPE, vocab_size=tok.vocab_size, tie_word_embeddings=False, pad_token_id=tok.pad_id,
                             bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
        LlamaForCausalLM(config).save_pretrained(work / "model")
    del world
    return paths


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def child(spec: dict) -> dict:
    """One run (in its own process); its figures."""
    import torch

    torch.set_num_threads(1)
    from aligner.cli.train import compose
    from aligner.models.checkpoint import base_fingerprint, find_latest
    from aligner.training.roles import ReferencePolicy

    algorithm, mode = spec["run"].split("/")
    world, out = Path(spec["world"]), Path(spec["out"])
    overrides = [f"init.hf={spec['model']}", f"data.tokenizer={world / 'tokenizer.model'}", f"trainer.out_dir={out}",
                 f"trainer.max_steps={spec['steps']}", "trainer.save_interval=0", "trainer.export_hf=false",
                 "trainer.progress=false", "trainer.tensorboard=false", "trainer.resume=false", "optim.lr=1e-5"]
    if mode == "lora":
        overrides += ["lora.enabled=true", f"lora.rank={spec['rank']}", f"lora.alpha={2 * spec['rank']}"]
    if algorithm == "dpo":
        overrides += [f"data.train={world / 'pairs_train.jsonl'}", f"trainer.global_batch_size={spec['pairs']}",
                      "trainer.micro_batch_size=1", "dpo.reference=resident"]
    else:
        overrides += [f"data.train={world / 'prompts_train.jsonl'}", f"trainer.global_batch_size={spec['prompts']}",
                      "trainer.micro_batch_size=8", "pg.samples_per_prompt=4", "pg.generation.max_new_tokens=32",
                      "pg.reward.kind=exact_answer"]
    trainer_cls, cfg = compose(algorithm, overrides)
    trainer = trainer_cls(cfg)
    trainer.fit()
    loop = trainer.trainer
    params, grads, optim = {}, {}, []
    for role in loop.roles.trainable.values():
        for p in (p for m in role.modules for p in m.parameters()):
            params[id(p)] = p
            if p.requires_grad and getattr(p, "main_grad", None) is not None:
                grads[id(p.main_grad)] = p.main_grad
        inner = role.optimizer.optimizer
        optim += [v for st in inner.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
    for role in loop.roles.frozen.values():
        for p in role.parameters():
            params[id(p)] = p
    host_copy = 0  # a reference's host copy of the initial weights (DPO's resident one, the online reference)
    refs = [loop.roles.reference, getattr(loop.algorithm, "_host_ref", None)]
    for ref in refs:
        if isinstance(ref, ReferencePolicy) and ref.mode == "host":
            host_copy += sum(_nbytes(w.values()) for w in ref._weights)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time"] for r in metrics if r.get("split", "train") == "train" and "step_time" in r][1:]
    ckpt = find_latest(out / "checkpoints")
    fingerprint_s = None
    if mode == "lora":
        t0 = time.perf_counter()
        base_fingerprint(loop.policy.chunks)
        fingerprint_s = time.perf_counter() - t0
    policy = loop.policy.modules
    return {
        "parameters": sum(p.numel() for m in policy for p in m.parameters() if not getattr(p, "lora", False)),
        "trainable": sum(p.numel() for m in policy for p in m.parameters() if p.requires_grad),
        "param_bytes": _nbytes(params.values()) + host_copy,
        "reference_copy_bytes": host_copy,
        "grad_bytes": _nbytes(grads.values()),
        "optimizer_bytes": _nbytes(optim),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_time_s": statistics.median(times) if times else float("nan"),
        "checkpoint_bytes": sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()),
        "fingerprint_s": fingerprint_s,
    }


def rollout_child(rounds: int) -> dict:
    """Generation times: adapters as an added path, merged for the generation, disabled."""
    import torch

    torch.set_num_threads(1)
    from aligner.models import ModelConfig, build_model
    from aligner.models.lora import LoraSettings, adapters_disabled, adapters_merged, apply_lora, lora_layers
    from aligner.parallel import ParallelConfig, initialize
    from aligner.rollout import GenerationConfig, RolloutEngine

    initialize(ParallelConfig(seed=0))
    cfg = ModelConfig(vocab_size=512, hidden_size=512, ffn_hidden_size=1408, num_layers=8, num_attention_heads=8,
                      num_query_groups=8, max_position_embeddings=256, pad_token_id=0)
    model = build_model(cfg)
    apply_lora([model], cfg, LoraSettings(rank=16, alpha=32.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers([model]):
            for part in layer.parts.values():
                part.lora_B.copy_(torch.randn(part.lora_B.shape, generator=g) * 0.01)
    model.eval()
    engine = RolloutEngine([model], cfg)
    prompts = [torch.randint(3, 512, (16,), generator=g).tolist() for _ in range(16)]
    gen = GenerationConfig(max_new_tokens=48, temperature=1.0, seed=0, stop_token_ids=[])
    modes = {"added": lambda: engine.generate(prompts, gen)}

    def merged():
        with adapters_merged([model]):
            return engine.generate(prompts, gen)

    def base():
        with adapters_disabled([model]):
            return engine.generate(prompts, gen)

    modes.update(merged=merged, base=base)
    times = {name: [] for name in modes}
    tokens = {}
    for _ in range(rounds):
        for name, fn in modes.items():
            t0 = time.perf_counter()
            res = fn()
            times[name].append(time.perf_counter() - t0)
            tokens[name] = [res.response_tokens(i) for i in range(len(res))]
    same = sum(a == b for a, b in zip(tokens["added"], tokens["merged"]))
    return {"min_s": {k: min(v) for k, v in times.items()},
            "median_s": {k: statistics.median(v) for k, v in times.items()}, "times_s": times,
            "rows_identical_added_vs_merged": f"{same}/{len(prompts)}", "decoder": type(engine.decoder).__name__}


def mib(n) -> str:
    return f"{n / 2**20:.1f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/bench_lora")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=2, help="DPO: pairs a step")
    parser.add_argument("--prompts", type=int, default=2, help="GRPO: prompts a step (x 4 responses)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--rollout", action="store_true", help="time generation: added path, merged, base")
    parser.add_argument("--rounds", type=int, default=5, help="--rollout: interleaved rounds")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rollout:
        result = rollout_child(args.rounds)
        result["load_average"] = os.getloadavg()
        print(json.dumps(result, indent=2))
        return 0
    if args.child:
        spec = json.loads(args.child)
        print("RESULT " + json.dumps(child(spec)), flush=True)
        return 0
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    paths = prepare(work)
    results = {}
    for run in args.runs.split(","):
        spec = dict(paths, run=run, steps=args.steps, rank=args.rank, pairs=args.pairs, prompts=args.prompts,
                    out=str(work / run.replace("/", "_")))
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        results[run] = json.loads(lines[-1][len("RESULT "):])
        print(run, results[run], file=sys.stderr, flush=True)
    results["load_average"] = os.getloadavg()
    results["settings"] = vars(args)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print("| run | parameters (trainable) | parameter MiB (reference copy) | gradient MiB | optimizer MiB |"
          " peak RSS MiB | step s | checkpoint MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for run in RUNS:
        r = results.get(run)
        if r:
            print(f"| {run} | {r['parameters'] / 1e6:.1f}M ({r['trainable'] / 1e6:.2f}M) | {mib(r['param_bytes'])}"
                  f" ({mib(r['reference_copy_bytes'])}) | {mib(r['grad_bytes'])} | {mib(r['optimizer_bytes'])} |"
                  f" {r['peak_rss_mib']:.0f} | {r['step_time_s']:.2f} | {mib(r['checkpoint_bytes'])} |")
    print(f"load average {results['load_average']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
