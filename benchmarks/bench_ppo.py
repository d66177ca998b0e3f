"""PPO step time and its split, and PPO epochs 1 vs 4 per wall-clock second (docs/ppo.md).

    python benchmarks/bench_ppo.py --base runs/quickstart [--split-steps 4] [--steps 20] [--prompts 32] [--judge 200]

``--base``: a folder with ``world/`` and ``sft/hf`` (a finished quickstart, or
``examples/ppo_world.py --mini``); without it a world is synthesised and the policy is the
tiny model (``conf/model/tiny.yaml``) with random weights. The reward is the world's scorer
(ground truth), the critic starts from the policy.

1. Step time at TP=1 and TP=2 (one job of 1 / 2 processes on this machine): mean over the
   steps after the first of the step time and of each phase's share (generation,
   scoring, log-prob and value passes, reductions, updates).
2. PPO epochs 1 vs 4 at TP=1 from the same policy, the same steps: ground-truth
   helpfulness of sampled responses to held-out prompts (temperature 1, fixed seeds)
   before and after, and that gain per second of training.

Prints one JSON object; ``--out FILE`` also writes it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _config(base: dict, out_dir: str, steps: int, prompts: int, epochs: int, tp: int, max_new: int) -> dict:
    cfg = {
        "algorithm": "ppo",
        "data": {"train": base["prompts"], "tokenizer": base["tokenizer"], "template": "extra_id"},
        "optim": {"lr": 1e-4},
        "parallel": {"tp": tp},
        "trainer": {"max_steps": steps, "global_batch_size": prompts, "micro_batch_size": 8, "out_dir": out_dir,
                    "progress": False, "tensorboard": False, "save_interval": 0, "export_hf": True,
                    "resume": False, "seed": 0},
        "ppo": {"reward": {"kind": "world"}, "critic_init": "policy", "epochs": epochs,
                "mini_batch_size": prompts // 2, "critic_optim": {"lr": 1e-4},
                "generation": {"max_new_tokens": max_new}},
    }
    if base.get("policy"):
        cfg["init"] = {"hf": base["policy"]}
    else:
        from omegaconf import OmegaConf

        model = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "conf" / "model" / "tiny.yaml"))
        model["vocab_size"] = base["vocab"]
        cfg["model"] = model
    return cfg


def timed_run(base, out_dir, steps, prompts, epochs, tp, max_new):
    """One PPO run (a rank of a spawned job); per-step metrics and the wall time of fit()."""
    import torch

    from aligner.algorithms.ppo import PPOTrainer
    from aligner.parallel import ParallelConfig, initialize

    torch.set_num_threads(1)
    initialize(ParallelConfig(tp=tp, seed=0))
    t0 = time.perf_counter()
    PPOTrainer(_config(base, out_dir, steps, prompts, epochs, tp, max_new)).fit()
    wall = time.perf_counter() - t0
    import torch.distributed as dist

    if dist.get_rank() != 0:
        return None
    metrics = [json.loads(line) for line in Path(out_dir, "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": wall, "metrics": metrics}


def split(result) -> dict:
    later = result["metrics"][1:] or result["metrics"]
    keys = [k for k in later[0] if k.startswith("time/") and k.endswith("_share")]
    return {"step_s": statistics.mean(m["step_time"] for m in later),
            **{k[5:]: statistics.mean(m[k] for m in later) for k in keys}}


def judge(model_dir, prompts, tok, seed=0) -> list:
    from aligner.cli.quickstart import _generate
    from aligner.data.world import score_response

    responses = _generate(Path(model_dir), prompts, tok, max_new_tokens=48, seed=seed)
    return [score_response(p["meta"], r)["helpfulness"] for p, r in zip(prompts, responses)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="folder with world/ and sft/hf")
    parser.add_argument("--split-steps", type=int, default=4, help="steps of the TP=1 / TP=2 timing runs")
    parser.add_argument("--steps", type=int, default=20, help="steps of the epochs 1 vs 4 runs")
    parser.add_argument("--prompts", type=int, default=32, help="prompts per step")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--judge", type=int, default=200, help="held-out prompts to judge")
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    from aligner.data import load_tokenizer
    from aligner.data.world import load_prompts, synthesize
    from aligner.parallel import ParallelConfig, initialize
    from aligner.parallel.spawn import spawn_local

    work = Path(tempfile.mkdtemp(prefix="bench_ppo_"))
    if args.base:
        world = Path(args.base) / "world"
        policy = str(Path(args.base) / "sft" / "hf")
    else:
        world = synthesize(work / "world", seed=0, n_sft=600, n_regression=50, n_pairs=50, n_heldout=args.judge,
                           n_rewardbench=10)["tokenizer"].parent
        policy = None
    tok = load_tokenizer(str(world / "tokenizer.model"))
    base = {"prompts": str(world / "prompts_train.jsonl"), "tokenizer": str(world / "tokenizer.model"),
            "policy": policy, "vocab": tok.vocab_size}
    report = {"settings": vars(args)}
    for tp in (1, 2):
        result = spawn_local(timed_run, tp, base, str(work / f"tp{tp}"), args.split_steps, args.prompts, 1, tp,
                             args.max_new_tokens, timeout=3600)[0]
        report[f"tp{tp}"] = split(result)
    initialize(ParallelConfig(seed=0))
    prompts = load_prompts(str(world / "prompts_heldout.jsonl"), tok)[: args.judge]
    start = judge(policy, prompts, tok) if policy else None
    for epochs in (1, 4):
        result = spawn_local(timed_run, 1, base, str(work / f"epochs{epochs}"), args.steps, args.prompts, epochs, 1,
                             args.max_new_tokens, timeout=3600)[0]
        entry = {"train_s": result["wall_s"], **split(result)}
        if start is not None:
            after = judge(work / f"epochs{epochs}" / "hf", prompts, tok)
            gain = (sum(after) - sum(start)) / len(start)
            diffs = [b - a for a, b in zip(start, after)]
            se = statistics.stdev(diffs) / len(diffs) ** 0.5
            entry.update(helpfulness_before=sum(start) / len(start), helpfulness_after=sum(after) / len(after),
                         gain=gain, gain_standard_error=se, gain_per_s=gain / result["wall_s"])
        report[f"epochs{epochs}"] = entry
    print(json.dumps(report, indent=2, sort_keys=True))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
