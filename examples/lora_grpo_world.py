"""GRPO with LoRA on the embedded world's exact-answer task, judged by its ground truth (docs/lora.md).

    python examples/lora_grpo_world.py --out runs/lora_grpo_world [--quickstart runs/quickstart]

1. The base: the quickstart's SFT model (``--quickstart DIR``, a finished ``aligner
   quickstart --out DIR`` folder, read only), or the quickstart's world and SFT stage run
   here into ``--out`` (``aligner.cli.quickstart``: the same world, tokenizer and training).
2. ``aligner train grpo`` from it with ``lora.enabled`` (rank 16, alpha 32, every target),
   the verifiable exact-answer reward (``pg.reward.kind=exact_answer``) on the world's
   training prompts; the reference is the frozen base (adapters off).
3. The SFT model and the LoRA policy (its merged export) answer the world's held-out
   prompts, greedily and sampled (temperature 1, fixed seeds); the world's scorer says
   which answers are exact. ``results.json``: each exact-answer rate with its standard
   error and the paired gain over SFT with its paired standard error and z, the run's
   steps and wall time. A trained run in ``--out`` is evaluated again, not retrained.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from world_common import paired, rate  # the examples folder is the script's own


def generate(model_dir: Path, prompts, tokenizer, max_new_tokens: int, seed: int, greedy: bool):
    from aligner.models import from_pretrained
    from aligner.rollout.engine import GenerationConfig, RolloutEngine

    models, cfg = from_pretrained(str(model_dir))
    engine = RolloutEngine(models, cfg, tokenizer=tokenizer, max_batch=64)
    result = engine.generate([p["prompt_tokens"].tolist() for p in prompts],
                             GenerationConfig(max_new_tokens=max_new_tokens, temperature=1.0, greedy=greedy,
                                              seed=seed, stop_token_ids=[tokenizer.eos_id]))
    return [tokenizer.decode(result.response_tokens(i)) for i in range(len(prompts))]


def base_model(args, out: Path):
    """(the SFT model's HF folder, the world's folder): the quickstart's, or trained here."""
    if args.quickstart:
        base = Path(args.quickstart)
        return base / "sft" / "hf", base / "world"
    from aligner.cli.quickstart import common_overrides, train_sft
    from aligner.data import load_tokenizer
    from aligner.data.world import synthesize
    from aligner.parallel import ParallelConfig, initialize, is_initialized

    world = synthesize(out / "world", seed=args.seed)
    tok = load_tokenizer(str(world["tokenizer"]))
    if not is_initialized():
        initialize(ParallelConfig(seed=args.seed))
    train_sft(out, world, common_overrides(world, tok, args.seed), args.sft_steps)
    return out / "sft" / "hf", out / "world"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quickstart", default=None, help="a finished `aligner quickstart --out DIR` folder")
    parser.add_argument("--sft-steps", type=int, default=300, help="without --quickstart: the SFT stage's steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl", type=float, default=0.01)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sft, world = base_model(args, out)

    from aligner.cli.train import compose
    from aligner.data import load_tokenizer
    from aligner.data.world import load_prompts, score_response

    tok = load_tokenizer(str(world / "tokenizer.model"))
    run = out / "grpo_lora"
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if not (run / "hf").is_dir():
        t0 = time.perf_counter()
        trainer_cls, cfg = compose("grpo", [
            f"init.hf={sft}", f"data.train={world / 'prompts_train.jsonl'}",
            f"data.tokenizer={world / 'tokenizer.model'}", f"trainer.out_dir={run}",
            f"trainer.max_steps={args.steps}", f"trainer.global_batch_size={args.prompts_per_step}",
            f"trainer.micro_batch_size={min(16, args.prompts_per_step * args.samples_per_prompt)}",
            "trainer.save_interval=0", "trainer.progress=true", "trainer.tensorboard=false",
            f"trainer.seed={args.seed}", f"optim.lr={args.lr}", f"pg.kl_coef={args.kl}",
            f"pg.samples_per_prompt={args.samples_per_prompt}", f"pg.generation.max_new_tokens={args.max_new_tokens}",
            "pg.reward.kind=exact_answer", "lora.enabled=true", f"lora.rank={args.rank}", f"lora.alpha={args.alpha}",
        ])
        trainer_cls(cfg).fit()
        results["train_seconds"] = time.perf_counter() - t0
        results["settings"] = vars(args)
    prompts = load_prompts(str(world / "prompts_heldout.jsonl"), tok)
    exact = {}
    for name, folder in (("sft", sft), ("grpo_lora", run / "hf")):
        for mode in ("greedy", "sampled"):
            responses = generate(folder, prompts, tok, 48, args.seed, greedy=mode == "greedy")
            scores = [score_response(p["meta"], r) for p, r in zip(prompts, responses)]
            exact[(name, mode)] = [float(s["exact"]) for s in scores]
            with open(out / f"generations_{name}_{mode}.jsonl", "w") as f:
                for p, r, s in zip(prompts, responses, scores):
                    f.write(json.dumps({"prompt": p["prompt"], "response": r, "scores": s}) + "\n")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    results.update({
        "base": str(sft),
        "run": {"steps": lines[-1]["step"], "step_time_mean": sum(r.get("step_time", 0.0) for r in lines) / len(lines),
                "final_kl_ref": lines[-1].get("kl_ref")},
        "exact_answer_rate": {f"{n}/{m}": rate(v) for (n, m), v in exact.items()},
        "exact_gain_over_sft": {m: paired(exact[("sft", m)], exact[("grpo_lora", m)]) for m in ("greedy", "sampled")},
    })
    results_path.write_text(json.dumps(results, indent=2, sort_keys=True))
    print(json.dumps(results, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
