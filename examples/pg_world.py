"""The REINFORCE family on the embedded world, judged by its ground truth (docs/reinforce.md).

    python examples/pg_world.py --quickstart runs/quickstart --out runs/pg_world

From the quickstart's SFT model, runs of ``aligner train pg`` (``--runs``, default all):

- ``grpo_exact`` and ``rloo_exact``: GRPO and RLOO with the verifiable exact-answer reward
  (``pg.reward.kind=exact_answer``: 1 for the exact stated answer of the prompt row);
- ``gspo_exact`` and ``cispo_exact``: GRPO's estimator and settings with the GSPO and the
  CISPO policy loss (``pg.loss=gspo`` / ``cispo``), the same exact-answer reward;
- ``rloo_rm``: RLOO against the quickstart's regression reward model (helpfulness output).

``--mini-batch-size`` (``pg.mini_batch_size``, responses per update) below a step's
responses gives several updates per step, so that the later ones are off-policy and the
policy losses (clipped, GSPO, CISPO) differ; at one update per step they all reduce to the
same on-policy gradient.

Then the SFT model and each policy answer the world's held-out prompts, greedily and
sampled (temperature 1, fixed seeds), and the world's scorer rates every response:
the exact-answer rate (with its standard error and the paired gain over SFT) and the
paired ground-truth helpfulness gain over SFT (as examples/ppo_world.py reports for PPO)
go to ``results.json``, with steps and wall times. ``--judge-samples K`` samples K responses
per prompt (each prompt's scores their means; greedy decoding stays one). Runs already
trained in ``--out`` with the same command are evaluated again, not retrained (one trained
with another is refused, naming what differs); each run keeps the settings it was trained
with, and a model judged there before from the same files by the same judge is read back
(examples/world_common.py, "Reuse").
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from world_common import (add_judge_arguments, judge_from_args, paired, rate,  # the examples folder's own
                          record_run, train, trained_before)

RUNS = {
    "grpo_exact": ("grpo", ["pg.reward.kind=exact_answer"]),
    "gspo_exact": ("grpo", ["pg.reward.kind=exact_answer", "pg.loss=gspo"]),
    "cispo_exact": ("grpo", ["pg.reward.kind=exact_answer", "pg.loss=cispo"]),
    "rloo_exact": ("rloo", ["pg.reward.kind=exact_answer"]),
    "rloo_rm": ("rloo", ["pg.reward.kind=model"]),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", required=True, help="a finished `aligner quickstart --out DIR` folder (read only)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--kl", type=float, default=0.01)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--mini-batch-size", type=int, default=None,
                        help="pg.mini_batch_size: responses per update (default: one update per step)")
    add_judge_arguments(parser)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(args.quickstart)
    world = base / "world"
    judge = judge_from_args(parser, args, base, out)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    runs = [r for r in args.runs.split(",") if r]
    timings = results.get("train_seconds", {})
    for name in runs:
        config, extra = RUNS[name]
        run = out / name
        if name.endswith("_rm"):
            extra = extra + [f"pg.reward.path={base / 'rm_regression' / 'hf'}"]
        overrides = ([f"init.hf={base / 'sft' / 'hf'}", f"data.train={world / 'prompts_train.jsonl'}",
                      f"data.tokenizer={world / 'tokenizer.model'}", f"trainer.out_dir={run}",
                      f"trainer.max_steps={args.steps}", f"trainer.global_batch_size={args.prompts_per_step}",
                      # global batch: prompts; micro-batch: rows (docs/online_core.md), no more than a step has
                      f"trainer.micro_batch_size={min(16, args.prompts_per_step * args.samples_per_prompt)}",
                      "trainer.save_interval=0", "trainer.progress=true",
                      "trainer.tensorboard=false", f"trainer.seed={args.seed}", f"optim.lr={args.lr}",
                      f"pg.kl_coef={args.kl}", f"pg.samples_per_prompt={args.samples_per_prompt}",
                      f"pg.generation.max_new_tokens={args.max_new_tokens}"] + extra
                     + ([f"pg.mini_batch_size={args.mini_batch_size}"] if args.mini_batch_size else []))
        try:
            if trained_before(run, config, overrides):
                continue
        except ValueError as exc:
            parser.error(str(exc))
        timings[name] = train(config, overrides)
        record_run(run, config, overrides)
        results.setdefault("settings", {})[name] = dict(vars(args), runs=name)
    scores = {}
    for name, folder in [("sft", base / "sft" / "hf")] + [(r, out / r / "hf") for r in runs]:
        for mode in ("greedy", "sampled"):
            scores[(name, mode)] = judge.judge(folder, f"{name}_{mode}", greedy=mode == "greedy", reuse=True)
    exact = {k: [float(s["exact"]) for s in v] for k, v in scores.items()}
    helpful = {k: [float(s["helpfulness"]) for s in v] for k, v in scores.items()}
    steps = {}
    for name in runs:
        lines = (out / name / "metrics.jsonl").read_text().splitlines()
        last = json.loads(lines[-1])
        steps[name] = {"steps": last["step"], "final_reward_mean": last.get("reward/mean"),
                       "final_kl_ref": last.get("kl_ref"),
                       "step_time_mean": sum(json.loads(x).get("step_time", 0.0) for x in lines) / len(lines)}
    new = {
        "train_seconds": timings,
        "runs": steps,
        "exact_answer_rate": {f"{n}/{m}": rate(v) for (n, m), v in exact.items()},
        "exact_gain_over_sft": {f"{n}/{m}": paired(exact[("sft", m)], v) for (n, m), v in exact.items() if n != "sft"},
        "helpfulness": {f"{n}/{m}": sum(v) / len(v) for (n, m), v in helpful.items()},
        "helpfulness_gain_over_sft": {f"{n}/{m}": paired(helpful[("sft", m)], v) for (n, m), v in helpful.items()
                                      if n != "sft"},
    }
    if args.judge_samples > 1:
        new["first_response_only"] = judge.first_response_only(
            [(f"{n}/sampled", "sft_sampled", f"{n}_sampled") for n in runs])
    judged_by = {"seed": args.seed, "prompts": args.prompts, "judge_samples": args.judge_samples}
    if results.get("judge", judged_by) != judged_by:  # figures of another judge are not mixed with these
        results = {k: v for k, v in results.items() if k in ("train_seconds", "settings")}
    results["base"], results["judge"] = str(base), judged_by
    for key, values in new.items():  # runs of earlier invocations stay (each with its own settings)
        results[key] = dict(results.get(key, {}), **values)
    results_path.write_text(json.dumps(results, indent=2, sort_keys=True))
    print(json.dumps(results, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
