"""Iterative DPO / RPO on on-policy pairs, judged by the world's ground truth (docs/monitor.md).

    python examples/iterative_dpo.py --quickstart runs/quickstart --out runs/iterative_dpo --iterations 2

Each iteration: the current policy samples ``--n`` responses for ``--prompts`` training
prompts, the reward model scores them and the best and worst make a pair
(``aligner data pairs``); DPO (or RPO with ``--loss rpo_sq``, which reads the pairs'
rewards) trains the policy on those pairs starting from the current policy; the result is
the next iteration's policy (the Nemotron-4 340B recipe's loop). After every iteration
the policy samples for the world's held-out prompts (temperature 1, fixed seeds, the
quickstart's judge; ``--judge-samples K``: K responses per prompt, each prompt's scores
their means) and the world's scorer rates the responses: the paired ground-truth
helpfulness gain over the starting policy and over the previous iteration, with
standard errors, go to ``results.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from world_common import add_judge_arguments, judge_from_args, paired  # the examples folder is the script's own


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", required=True, help="a finished quickstart folder (read only)")
    parser.add_argument("--policy", default=None, help="the starting policy (default: the quickstart's dpo/hf)")
    parser.add_argument("--reward", default=None, help="pair reward (default: the quickstart's rm_bt/hf); 'world' uses"
                        " the ground truth itself")
    parser.add_argument("--out", required=True)
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument("--n", type=int, default=4, help="responses per prompt")
    parser.add_argument("--prompts", type=int, default=1024, help="training prompts per iteration")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--loss", default="dpo", help="dpo.loss_type (dpo, rpo_sq, margin_dpo, ...)")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--seed", type=int, default=0)
    add_judge_arguments(parser, prompts=False)  # --judge-samples: the held-out judge's responses per prompt
    args = parser.parse_args(argv)

    from aligner.cli import pairs as pairs_cli
    from aligner.cli.train import compose

    qs, out = Path(args.quickstart), Path(args.out)
    judged = judge_from_args(parser, args, qs, out, prompts=200)
    world = judged.world
    policy = Path(args.policy or qs / "dpo" / "hf")
    reward = args.reward or str(qs / "rm_bt" / "hf")

    def judge(folder, name):
        return [s["helpfulness"] for s in judged.judge(folder, name)]

    helpful = {"start": judge(policy, "start")}
    results = {"settings": vars(args), "start_policy": str(policy), "pair_reward": reward, "iterations": []}
    previous = "start"
    for it in range(1, args.iterations + 1):
        folder = out / f"iter{it}"
        t0 = time.perf_counter()
        ns = argparse.Namespace(policy=str(policy), prompts=str(world / "prompts_train.jsonl"),
                                out=str(folder / "pairs.jsonl"), reward=reward, reward_attribute=None, n=args.n,
                                all_pairs=False, min_gap=None, num_prompts=args.prompts, max_new_tokens=48,
                                seed=args.seed + it, template="extra_id", tokenizer=None, micro_batch_size=16)
        summary = pairs_cli.make_pairs(ns)
        t1 = time.perf_counter()
        batch = min(32, summary["pairs"])  # pairs per step: conf/dpo.yaml's 32, or every pair when fewer
        steps = max(1, args.epochs * summary["pairs"] // batch)
        trainer_cls, cfg = compose("dpo", [
            f"init.hf={policy}", f"data.train={folder / 'pairs.jsonl'}", f"data.tokenizer={world / 'tokenizer.model'}",
            f"trainer.out_dir={folder / 'dpo'}", f"trainer.max_steps={steps}", "trainer.progress=true",
            f"trainer.global_batch_size={batch}", f"trainer.micro_batch_size={math.gcd(8, batch)}",
            "trainer.tensorboard=false", f"trainer.seed={args.seed}", "trainer.save_interval=0",
            f"dpo.loss_type={args.loss}", f"dpo.beta={args.beta}", f"optim.lr={args.lr}"])
        trainer_cls(cfg).fit()
        t2 = time.perf_counter()
        policy = folder / "dpo" / "hf"
        name = f"iter{it}"
        helpful[name] = judge(policy, name)
        results["iterations"].append({
            "iteration": it, "pairs": summary, "dpo_steps": steps, "seconds": {"pairs": t1 - t0, "dpo": t2 - t1},
            "helpfulness": sum(helpful[name]) / len(helpful[name]),
            "gain_over_start": paired(helpful["start"], helpful[name]),
            "gain_over_previous": paired(helpful[previous], helpful[name]),
        })
        previous = name
        (out / "results.json").write_text(json.dumps(results, indent=2))
    results["start_helpfulness"] = sum(helpful["start"]) / len(helpful["start"])
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
