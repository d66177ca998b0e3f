"""DPO, ORPO and SimPO on the world's preference pairs from the same SFT model, judged by
the world's ground truth (docs/dpo.md).

    python examples/preference_world.py --quickstart runs/qs --out runs/preference_world

Each run is ``aligner train dpo`` from the quickstart's SFT model on the world's
HelpSteer2-Preference-format pairs (``world/pairs_train.jsonl``) with the quickstart DPO
stage's steps, batch and learning rate; only the loss (and its own β, γ, SFT weight)
changes:

- ``dpo``: the quickstart's DPO model itself (``dpo/hf``: β 0.1, SFT weight 1), not trained
  again;
- ``orpo``: ``dpo.loss_type=orpo`` (β 0.1: the odds-ratio term's weight, SFT weight 1, the
  paper's NLL + λ·OR form), no reference;
- ``simpo``: ``dpo.loss_type=simpo`` (β 2, γ 0.5, no SFT term, the paper's settings), no
  reference.

``--runs`` names the runs; ``NAME=LOSS`` is a variant of ``orpo`` or ``simpo`` in its own folder,
and ``--set NAME:KEY=VALUE`` changes one run's option (e.g. ``--runs simpo_lr5e-6=simpo
--set simpo_lr5e-6:optim.lr=5e-6``).
The SFT model and every run answer the world's held-out prompts (``--prompts``,
``--judge-samples`` responses each, temperature 1, fixed seeds); the paired helpfulness
gains over SFT and over DPO (and the exact-answer rates) go to ``results.json``. Runs
already trained in ``--out`` with the same command are judged again, not retrained (one
trained with another is refused, naming what differs); a model judged there before from the
same files by the same judge is read back (examples/world_common.py, "Reuse").
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from world_common import (add_judge_arguments, judge_from_args, mean, named_runs,  # the examples folder's own
                          paired, rate, record_run, train, trained_before)

RUNS = {
    "orpo": ["dpo.loss_type=orpo", "dpo.beta=0.1", "dpo.sft_weight=1.0"],
    "simpo": ["dpo.loss_type=simpo", "dpo.beta=2.0", "dpo.gamma=0.5", "dpo.sft_weight=0.0"],
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", required=True, help="a finished quickstart folder (read only)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--steps", type=int, default=100, help="steps of each run (the quickstart's DPO stage: 100)")
    add_judge_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="NAME:KEY=VALUE")
    args = parser.parse_args(argv)
    qs, out = Path(args.quickstart), Path(args.out)
    loss_of, extra = named_runs(parser, args.runs, args.set, RUNS, what="LOSS")
    runs = list(loss_of)
    judged = judge_from_args(parser, args, qs, out)
    world = judged.world
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name in runs:
        overrides = [f"init.hf={qs / 'sft' / 'hf'}", f"data.train={world / 'pairs_train.jsonl'}",
                     f"data.tokenizer={judged.tokenizer_path}", f"model.vocab_size={judged.tokenizer.vocab_size}",
                     f"trainer.out_dir={out / name}", f"trainer.max_steps={args.steps}", f"trainer.seed={args.seed}",
                     "trainer.progress=true", "trainer.tensorboard=false", "trainer.save_interval=0"]
        overrides += RUNS[loss_of[name]] + extra.get(name, [])
        try:
            if trained_before(out / name, "dpo", overrides):
                continue
        except ValueError as exc:
            parser.error(str(exc))
        results.setdefault("train_seconds", {})[name] = train("dpo", overrides)
        record_run(out / name, "dpo", overrides)
        results.setdefault("settings", {})[name] = RUNS[loss_of[name]] + extra.get(name, []) + [f"steps={args.steps}"]
    scores = {name: judged.judge(folder, name, reuse=True) for name, folder in
              [("sft", qs / "sft" / "hf"), ("dpo", qs / "dpo" / "hf")] + [(r, out / r / "hf") for r in runs]}
    helpful = {k: [float(s["helpfulness"]) for s in v] for k, v in scores.items()}
    exact = {k: [float(s["exact"]) for s in v] for k, v in scores.items()}
    words = {k: mean([len(json.loads(line)["response"].split()) for line in
                      (out / f"generations_{k}.jsonl").read_text().splitlines()]) for k in scores}
    new = {
        "helpfulness": {k: mean(v) for k, v in helpful.items()},
        "exact_answer_rate": {k: rate(v) for k, v in exact.items()},
        "response_words": words,
        "gain_over_sft": {k: paired(helpful["sft"], v) for k, v in helpful.items() if k != "sft"},
        "gain_over_dpo": {k: paired(helpful["dpo"], v) for k, v in helpful.items() if k not in ("sft", "dpo")},
    }
    if args.judge_samples > 1:
        new["first_response_only"] = judged.first_response_only(
            [(f"{k}_over_{b}", b, k) for b in ("sft", "dpo") for k in helpful if k not in ("sft", b)])
    judge = {"seed": args.seed, "prompts": args.prompts, "judge_samples": args.judge_samples}
    if results.get("judge", judge) != judge:  # figures of another judge are not mixed with these
        results = {k: v for k, v in results.items() if k in ("train_seconds", "settings")}
    for key, values in new.items():  # runs of earlier invocations stay (each with its own settings)
        results[key] = dict(results.get(key, {}), **values)
    results["quickstart"], results["judge"] = str(qs), judge
    results_path.write_text(json.dumps(results, indent=2, sort_keys=True))
    print(json.dumps(results, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
