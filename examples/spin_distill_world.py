"""SPIN and knowledge distillation on the embedded world, judged by its ground truth
(docs/spin.md, docs/distill.md).

    python examples/spin_distill_world.py spin --quickstart runs/quickstart --out runs/spin_world
    python examples/spin_distill_world.py distill --quickstart runs/quickstart --out runs/distill_world

``spin``: ``aligner train spin`` from the quickstart's SFT model on ``--rows`` of the world's
SFT rows (no preference data), ``--iterations`` iterations (further ``spin.*`` keys with
``--set``); the paired ground-truth helpfulness gain of the result over the SFT model, and
the world's scores of every iteration's pairs (the SFT responses, SPIN's chosen, against the
model's own samples, its rejected). ``--sft-control`` also continues SFT from the SFT model
on the same rows for SPIN's steps at its learning rate and reports SPIN's gain over that. A
SPIN run already trained in ``--out`` is judged again, not retrained.

``distill``: a ``--layers``-layer student (the tiny architecture, random initialisation)
trained twice on the same SFT rows for the same steps: by SFT on their responses, and by
distillation from the quickstart's DPO model (``--divergence``, further ``distill.*`` keys
with ``--set``), into ``--out/<--name>``; the paired gain of the distilled student over the
SFT student and over the teacher, and the teacher's over the SFT student. Students already
trained in ``--out`` are judged again, not retrained (only under the settings they were
trained with), so variants of the distilled student (each its own ``--name``) share
one SFT student and accumulate in ``results.json``.

Judging (examples/world_common.py): ``--prompts`` held-out prompts, ``--judge-samples``
responses each (default 1) at temperature 1 with fixed seeds, rated by the world's scorer
(with more than one response, per prompt the mean of the scores); paired differences with
their standard errors go to ``results.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from world_common import add_judge_arguments, judge_from_args, mean, paired, train  # the examples folder's own


def spin_data_quality(out: Path, rows: Path, iterations: int) -> dict:
    """The world's scores of SPIN's pairs: per iteration, the helpfulness of the chosen (the
    SFT rows' responses) and of the rejected (the model's own samples, read from the run's
    ``spin_samples/iteration_<t>.jsonl``), paired over the rows. SPIN pushes the model
    towards the chosen and away from its samples: it can only help where the chosen are
    the better ones."""
    from aligner.data.world import score_response

    train_rows = [json.loads(line) for line in rows.read_text().splitlines()]

    def meta(row):
        return {"family": row["family"], "answer": row["answer"], "args": row["args"]}

    chosen = [float(score_response(meta(r), r["conversations"][1]["value"])["helpfulness"]) for r in train_rows]
    report = {"chosen_helpfulness": mean(chosen), "iterations": []}
    for t in range(iterations):
        path = out / "spin" / "spin_samples" / f"iteration_{t}.jsonl"
        if not path.is_file():
            break
        # the iteration's own generations (with spin.keep_previous the file also holds earlier ones)
        samples = {int(r["index"]): r for r in map(json.loads, path.read_text().splitlines())
                   if int(r["iteration"]) == t}
        rejected = [float(score_response(meta(r), samples[i]["rejected"])["helpfulness"])
                    for i, r in enumerate(train_rows)]
        report["iterations"].append({"iteration": t, "rejected_helpfulness": mean(rejected),
                                     "chosen_minus_rejected": paired(rejected, chosen),
                                     "chosen_better": mean([float(c > r) for c, r in zip(chosen, rejected)]),
                                     "rejected_better": mean([float(r > c) for c, r in zip(chosen, rejected)])})
    return report


def check_distill_reuse(results: dict, sft_student: dict, name: str, variant: dict) -> None:
    """A student already trained in ``--out`` is reused only under the settings it was
    trained with: the SFT student under the same rows, steps, learning rate, layers and seed
    as the distilled student (the comparison is on the same prompts and steps), a variant
    ``name`` under its own divergence, overrides, learning rate and steps. ValueError, one
    line, otherwise."""
    trained = results.get("sft_student_settings")
    if trained is not None and trained != sft_student:
        changed = ", ".join(f"--{k} {trained.get(k)} -> {v}" for k, v in sft_student.items() if trained.get(k) != v)
        raise ValueError(f"the SFT student in --out was trained with other settings ({changed}): the distilled"
                         " student must see its prompts and steps; use another --out")
    previous = results.get("variants", {}).get(name)
    if previous is not None and previous != variant:
        changed = ", ".join(f"{k} {previous.get(k)} -> {v}" for k, v in variant.items() if previous.get(k) != v)
        raise ValueError(f"--name {name}: already trained in --out with other settings ({changed}); use another --name")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method", choices=("spin", "distill"))
    parser.add_argument("--quickstart", required=True, help="a finished quickstart folder (read only)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=1024, help="SFT rows to train on (the first of sft_train.jsonl)")
    add_judge_arguments(parser)
    parser.add_argument("--iterations", type=int, default=2, help="spin: iterations")
    parser.add_argument("--epochs", type=int, default=2, help="spin: epochs per iteration")
    parser.add_argument("--beta", type=float, default=0.1, help="spin: β")
    parser.add_argument("--layers", type=int, default=2, help="distill: the student's layers")
    parser.add_argument("--steps", type=int, default=300, help="distill: steps of each student")
    parser.add_argument("--divergence", default="forward_kl", help="distill: distill.divergence")
    parser.add_argument("--name", default="distilled_student", help="distill: the distilled student's run folder")
    parser.add_argument("--lr", type=float, default=None, help="default: the config's (spin 5e-6, distill 1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="further overrides of the SPIN run or the distilled student (e.g. spin.loss_type=ipo)")
    parser.add_argument("--sft-control", action="store_true",
                        help="spin: also continue SFT from the SFT model on the same rows, for SPIN's steps at SPIN's"
                        " learning rate, and report SPIN's paired gain over it")
    args = parser.parse_args(argv)

    qs, out = Path(args.quickstart), Path(args.out)
    judged = judge_from_args(parser, args, qs, out)
    world = judged.world
    rows = out / "sft_rows.jsonl"
    with open(world / "sft_train.jsonl") as f:
        rows.write_text("".join(line for _, line in zip(range(args.rows), f)))
    common = [f"data.train={rows}", f"data.tokenizer={judged.tokenizer_path}", f"trainer.seed={args.seed}",
              "trainer.progress=true", "trainer.tensorboard=false", "trainer.save_interval=0"]
    common += [f"optim.lr={args.lr}"] if args.lr is not None else []

    def judge(folder, name):
        return [float(s["helpfulness"]) for s in judged.judge(folder, name)]

    results = {"settings": vars(args), "seconds": {}}
    if args.method == "spin":
        sft = qs / "sft" / "hf"
        start = judge(sft, "sft")
        previous = out / "results.json"
        if previous.is_file():  # a SPIN run already trained in --out is judged again, not retrained
            results["seconds"] = json.loads(previous.read_text()).get("seconds", {})
        if not (out / "spin" / "hf").is_dir():
            results["seconds"]["spin"] = train("spin", common + [
                f"trainer.out_dir={out / 'spin'}", f"init.hf={sft}", f"spin.iterations={args.iterations}",
                f"spin.epochs={args.epochs}", f"spin.beta={args.beta}"] + args.set)
        final = judge(out / "spin" / "hf", "spin")
        results.update(sft_helpfulness=mean(start), spin_helpfulness=mean(final),
                       gain_over_sft=paired(start, final),
                       pairs=spin_data_quality(out, rows, args.iterations))
        if args.sft_control and not (out / "sft_control" / "hf").is_dir():
            # the same chosen responses, as many steps of as many rows, the SPIN run's learning rate
            # (trainer.max_epochs as SPIN derived it: iterations x epochs, more with spin.keep_previous)
            steps = OmegaConf.load(out / "spin" / "config.yaml").trainer.max_epochs * (args.rows // 32)
            results["seconds"]["sft_control"] = train("sft", common + [
                f"trainer.out_dir={out / 'sft_control'}", f"init.hf={sft}", f"trainer.max_steps={steps}",
                "trainer.global_batch_size=32", "trainer.micro_batch_size=16", "trainer.val_interval=0",
                "optim.warmup_steps=0", "optim.schedule=constant", "optim.min_lr=0",
                f"optim.lr={OmegaConf.load(out / 'spin' / 'config.yaml').optim.lr}"])
        if args.sft_control:
            control = judge(out / "sft_control" / "hf", "sft_control")
            results.update(sft_control_helpfulness=mean(control), sft_control_gain_over_sft=paired(start, control),
                           spin_gain_over_sft_control=paired(control, final))
    else:
        # runs already trained in --out are judged again, not retrained: variants of the
        # distilled student (--name, --divergence, --set) are compared with the one SFT student
        previous = out / "results.json"
        results = dict(json.loads(previous.read_text()), settings=vars(args)) if previous.is_file() else results
        results.setdefault("seconds", {})
        student = common + [f"model.num_layers={args.layers}", f"model.vocab_size={judged.tokenizer.vocab_size}",
                            f"trainer.max_steps={args.steps}"]
        sft_settings = {"rows": args.rows, "steps": args.steps, "lr": args.lr, "layers": args.layers, "seed": args.seed}
        variant = {"divergence": args.divergence, "set": args.set, "lr": args.lr, "steps": args.steps}
        try:
            check_distill_reuse(results, sft_settings, args.name, variant)
        except ValueError as exc:
            parser.error(str(exc))
        if not (out / "sft_student" / "hf").is_dir():
            results["seconds"]["sft_student"] = train("sft", student + [f"trainer.out_dir={out / 'sft_student'}"])
        results["sft_student_settings"] = sft_settings
        if not (out / args.name / "hf").is_dir():
            results["seconds"][args.name] = train("distill", student + [
                f"trainer.out_dir={out / args.name}",
                f"distill.teacher={qs / 'dpo' / 'hf'}", f"distill.divergence={args.divergence}"] + args.set)
            results.setdefault("variants", {})[args.name] = variant
        sft_student = judge(out / "sft_student" / "hf", "sft_student")
        distilled = judge(out / args.name / "hf", args.name)
        teacher = judge(qs / "dpo" / "hf", "teacher")  # the same prompts, seeds and temperature as the students
        results.update(sft_student_helpfulness=mean(sft_student), teacher_helpfulness=mean(teacher),
                       teacher_gain_over_sft_student=paired(sft_student, teacher))
        results.setdefault("helpfulness", {})[args.name] = mean(distilled)
        results.setdefault("gain_over_sft_student", {})[args.name] = paired(sft_student, distilled)
        results.setdefault("gain_over_teacher", {})[args.name] = paired(teacher, distilled)
    if args.judge_samples > 1:
        # the same comparisons judged by each model's first response per prompt alone
        pairs = ([("gain_over_sft", "sft", "spin"), ("sft_control_gain_over_sft", "sft", "sft_control"),
                  ("spin_gain_over_sft_control", "sft_control", "spin")] if args.method == "spin" else
                 [("gain_over_sft_student", "sft_student", args.name),
                  ("teacher_gain_over_sft_student", "sft_student", "teacher"),
                  ("gain_over_teacher", "teacher", args.name)])
        results["first_response_only"] = judged.first_response_only(pairs)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
