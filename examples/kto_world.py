"""KTO against DPO on the embedded world, judged by its ground truth (docs/kto.md).

    python examples/world_common.py --out runs/qs          # the quickstart's world, SFT and DPO models
    python examples/kto_world.py --quickstart runs/qs --out runs/kto_world
    python examples/kto_world.py --quickstart runs/qs --out runs/kto_world \\
        --runs kto_sft1_b03=kto_sft1 --set kto_sft1_b03:kto.beta=0.3

From the quickstart's SFT model (``sft/hf``), on the world's preference pairs
(``world/pairs_train.jsonl``), with the quickstart DPO stage's steps (``--steps``), pairs
per step (``--pairs``), learning rate and β (the configs' defaults):

- ``dpo``: the quickstart's DPO model itself (``dpo/hf``, conf/dpo.yaml: β 0.1 and its SFT
  term on the chosen responses, ``dpo.sft_weight=1``), not trained again;
- ``dpo_pure``: the same without the SFT term (``dpo.sft_weight=0``);
- ``kto``: ``aligner train kto`` on the same pairs written as unpaired rows (each pair's
  chosen response a desirable row, its rejected one an undesirable row, the rows shuffled
  so that a pair's halves are apart), ``2 × --pairs`` rows per step: the same responses
  per step, λ_D = λ_U = 1 (n_D = n_U: the paper's ratio 1), no SFT term (the paper's
  objective);
- ``kto_sft1``: the same with DPO's SFT term on the desirable responses
  (``kto.sft_weight=1``, normalised as DPO's: the mean over the desirable responses of each
  one's per-token NLL).

``--runs`` names the runs (default: all of the above but ``dpo``, which is always judged);
``NAME=BASE`` is a variant of a base run in its own folder, and ``--set NAME:KEY=VALUE``
changes one of its options (e.g. ``--runs kto_lr5e-6=kto --set kto_lr5e-6:optim.lr=5e-6``).
``--train-only`` trains the named runs and judges nothing (to train runs side by side in
separate processes, then judge them all in one). Runs already trained in ``--out`` with the
same command are not trained again (one trained with another is refused, naming what
differs), and a model already judged there from the same files with the same judge is not
sampled again (examples/world_common.py, "Reuse").

Judging (as examples/preference_world.py): ``--prompts`` held-out prompts, ``--judge-samples``
responses each (default 1) at temperature 1 with fixed seeds, rated by the world's scorer;
the paired helpfulness gains over the SFT model, over DPO and (KTO variants) over ``kto``,
with standard errors, the exact-answer rates and the mean response length go to
``results.json`` (runs of earlier invocations stay, unless they were judged by another
judge: another ``--seed``, ``--prompts`` or ``--judge-samples``).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

from world_common import (add_judge_arguments, judge_from_args, mean, named_runs,  # the examples folder's own
                          paired, rate, record_run, train, trained_before)

BASES = {
    "dpo_pure": ("dpo", ["dpo.sft_weight=0"]),
    "kto": ("kto", []),
    "kto_sft1": ("kto", ["kto.sft_weight=1.0"]),
}


def write_unpaired(pairs: Path, out: Path, seed: int) -> Path:
    """The pairs as unpaired rows (chosen desirable, rejected undesirable, ties dropped as
    training on pairs drops them), shuffled so that a pair's halves are apart."""
    from aligner.data.datasets import KIND_FORMATS, read_rows
    from aligner.data.formats import parse_row

    rows = []
    for _, row, fmt in read_rows(pairs, allowed=KIND_FORMATS["pairs"]):
        pair = parse_row(row, fmt)
        if pair.is_tie:
            continue
        base = {"prompt": row["prompt"], **({"system": row["system"]} if "system" in row else {})}
        rows += [base | {"completion": pair.chosen, "label": True}, base | {"completion": pair.rejected, "label": False}]
    random.Random(seed).shuffle(rows)
    path, text = out / "unpaired_train.jsonl", "".join(json.dumps(r) + "\n" for r in rows)
    if not path.is_file() or path.read_text() != text:  # arms trained side by side read it: replaced whole
        part = path.with_suffix(f".{os.getpid()}.part")
        part.write_text(text)
        os.replace(part, path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", required=True, help="a finished quickstart folder (read only): its world,"
                        " sft/hf and dpo/hf (examples/world_common.py builds one)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", default=",".join(BASES))
    parser.add_argument("--set", action="append", default=[], metavar="NAME:KEY=VALUE")
    parser.add_argument("--steps", type=int, default=100, help="steps of each run (the quickstart's DPO stage: 100)")
    parser.add_argument("--pairs", type=int, default=32, help="pairs per step (KTO: twice as many rows)")
    add_judge_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-only", action="store_true", help="train the runs, judge nothing")
    args = parser.parse_args(argv)
    qs, out = Path(args.quickstart), Path(args.out)
    base_of, extra = named_runs(parser, args.runs, args.set, BASES, reserved=("sft", "dpo"))

    judged = judge_from_args(parser, args, qs, out)
    world = judged.world
    unpaired = write_unpaired(world / "pairs_train.jsonl", out, args.seed)
    for name, base in base_of.items():
        algorithm, options = BASES[base]
        data = ([f"data.train={world / 'pairs_train.jsonl'}", f"trainer.global_batch_size={args.pairs}"]
                if algorithm == "dpo" else
                [f"data.train={unpaired}", f"trainer.global_batch_size={2 * args.pairs}"])
        settings = options + extra.get(name, [])
        overrides = [f"init.hf={qs / 'sft' / 'hf'}", f"data.tokenizer={judged.tokenizer_path}",
                     f"model.vocab_size={judged.tokenizer.vocab_size}", f"trainer.out_dir={out / name}",
                     f"trainer.max_steps={args.steps}", f"trainer.seed={args.seed}", "trainer.micro_batch_size=8",
                     "trainer.progress=true", "trainer.tensorboard=false", "trainer.save_interval=0",
                     "trainer.val_interval=0"] + data + settings
        try:
            if trained_before(out / name, algorithm, overrides):
                continue
        except ValueError as exc:
            parser.error(str(exc))
        seconds = train(algorithm, overrides)
        record_run(out / name, algorithm, overrides)
        (out / f"train_{name}.json").write_text(json.dumps(
            {"algorithm": algorithm, "settings": settings + [f"steps={args.steps}", f"pairs={args.pairs}"],
             "seconds": seconds}, indent=2))
    if args.train_only:
        return 0

    scores = {}
    for name, folder in [("sft", qs / "sft" / "hf"), ("dpo", qs / "dpo" / "hf")] + [(r, out / r / "hf")
                                                                                   for r in base_of]:
        scores[name] = judged.judge(folder, name, reuse=True)  # read back if judged from the same model and settings
    helpful = {k: [float(s["helpfulness"]) for s in v] for k, v in scores.items()}
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    new = {
        "helpfulness": {k: mean(v) for k, v in helpful.items()},
        "correctness": {k: mean([float(s["correctness"]) for s in v]) for k, v in scores.items()},
        "exact_answer_rate": {k: rate([float(s["exact"]) for s in v]) for k, v in scores.items()},
        "response_words": {k: mean([len(json.loads(line)["response"].split()) for line in
                                    (out / f"generations_{k}.jsonl").read_text().splitlines()]) for k in scores},
        "gain_over_sft": {k: paired(helpful["sft"], v) for k, v in helpful.items() if k != "sft"},
        "gain_over_dpo": {k: paired(helpful["dpo"], v) for k, v in helpful.items() if k not in ("sft", "dpo")},
        "gain_over_kto": {k: paired(helpful["kto"], v) for k, v in helpful.items()
                          if "kto" in helpful and k.startswith("kto") and k != "kto"},
        "training": {k: json.loads((out / f"train_{k}.json").read_text()) for k in base_of
                     if (out / f"train_{k}.json").is_file()},
    }
    if args.judge_samples > 1:
        new["first_response_only"] = judged.first_response_only(
            [(f"{k}_over_{b}", b, k) for b in ("sft", "dpo") for k in helpful if k not in ("sft", b)])
    judge = {"seed": args.seed, "prompts": args.prompts, "judge_samples": args.judge_samples}
    if results.get("judge", judge) != judge:  # figures of another judge are not mixed with these
        results = {k: v for k, v in results.items() if k == "training"}
    for key, values in new.items():  # runs of earlier invocations stay (each with its own settings)
        results[key] = dict(results.get(key, {}), **values)
    results["quickstart"], results["judge"] = str(qs), judge
    results_path.write_text(json.dumps(results, indent=2, sort_keys=True))
    print(json.dumps(results, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
