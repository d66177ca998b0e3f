"""SPIN and knowledge distillation on the embedded world, judged by its ground truth
(docs/spin.md, docs/distill.md).

    python examples/spin_distill_world.py spin --quickstart runs/quickstart --out runs/spin_world
    python examples/spin_distill_world.py distill --quickstart runs/quickstart --out runs/distill_world

``spin``: ``aligner train spin`` from the quickstart's SFT model on ``--rows`` of the world's
SFT rows (no preference data), ``--iterations`` iterations; the paired ground-truth
helpfulness gain of the result over the SFT model.

``distill``: a ``--layers``-layer student (the tiny architecture, random initialisation)
trained twice on the same SFT rows for the same steps: by SFT on their responses, and by
distillation from the quickstart's DPO model (``--divergence``); the paired gain of the
distilled student over the SFT student (and each one's over the SFT teacher's level).

Judging (as examples/iterative_dpo.py): ``--prompts`` held-out prompts, one response each at
temperature 1 with fixed seeds, rated by the world's scorer; paired differences with their
standard errors go to ``results.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from iterative_dpo import paired  # the examples folder is the script's own: the same paired statistics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method", choices=("spin", "distill"))
    parser.add_argument("--quickstart", required=True, help="a finished quickstart folder (read only)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=1024, help="SFT rows to train on (the first of sft_train.jsonl)")
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts judged")
    parser.add_argument("--iterations", type=int, default=2, help="spin: iterations")
    parser.add_argument("--epochs", type=int, default=2, help="spin: epochs per iteration")
    parser.add_argument("--beta", type=float, default=0.1, help="spin: β")
    parser.add_argument("--layers", type=int, default=2, help="distill: the student's layers")
    parser.add_argument("--steps", type=int, default=300, help="distill: steps of each student")
    parser.add_argument("--divergence", default="forward_kl", help="distill: distill.divergence")
    parser.add_argument("--lr", type=float, default=None, help="default: the config's (spin 2e-5, distill 1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from aligner.cli.quickstart import _generate
    from aligner.cli.train import compose
    from aligner.data import load_tokenizer
    from aligner.data.world import load_prompts, score_response
    from aligner.parallel import ParallelConfig, initialize, is_initialized

    if not is_initialized():
        initialize(ParallelConfig(seed=args.seed))
    qs, out = Path(args.quickstart), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world = qs / "world"
    tok = load_tokenizer(str(world / "tokenizer.model"))
    heldout = load_prompts(str(world / "prompts_heldout.jsonl"), tok)[:args.prompts]
    rows = out / "sft_rows.jsonl"
    with open(world / "sft_train.jsonl") as f:
        rows.write_text("".join(line for _, line in zip(range(args.rows), f)))
    common = [f"data.train={rows}", f"data.tokenizer={world / 'tokenizer.model'}", f"trainer.seed={args.seed}",
              "trainer.progress=true", "trainer.tensorboard=false", "trainer.save_interval=0"]
    common += [f"optim.lr={args.lr}"] if args.lr is not None else []

    def judge(folder, name):
        responses = _generate(folder, heldout, tok, max_new_tokens=48, seed=args.seed)
        scores = [score_response(p["meta"], r) for p, r in zip(heldout, responses)]
        with open(out / f"generations_{name}.jsonl", "w") as f:
            for p, r, s in zip(heldout, responses, scores):
                f.write(json.dumps({"prompt": p["prompt"], "response": r, "scores": s}) + "\n")
        return [s["helpfulness"] for s in scores]

    def train(config, name, overrides):
        t0 = time.perf_counter()
        trainer_cls, cfg = compose(config, common + [f"trainer.out_dir={out / name}"] + overrides)
        trainer_cls(cfg).fit()
        return time.perf_counter() - t0

    results = {"settings": vars(args), "seconds": {}}
    if args.method == "spin":
        sft = qs / "sft" / "hf"
        start = judge(sft, "sft")
        results["seconds"]["spin"] = train("spin", "spin", [
            f"init.hf={sft}", f"spin.iterations={args.iterations}", f"spin.epochs={args.epochs}",
            f"spin.beta={args.beta}"])
        final = judge(out / "spin" / "hf", "spin")
        results.update(sft_helpfulness=sum(start) / len(start), spin_helpfulness=sum(final) / len(final),
                       gain_over_sft=paired(start, final))
    else:
        student = [f"model.num_layers={args.layers}", f"model.vocab_size={tok.vocab_size}",
                   f"trainer.max_steps={args.steps}"]
        results["seconds"]["sft_student"] = train("sft", "sft_student", student)
        results["seconds"]["distilled_student"] = train("distill", "distilled_student", student + [
            f"distill.teacher={qs / 'dpo' / 'hf'}", f"distill.divergence={args.divergence}"])
        sft_student = judge(out / "sft_student" / "hf", "sft_student")
        distilled = judge(out / "distilled_student" / "hf", "distilled_student")
        teacher = judge(qs / "dpo" / "hf", "teacher")
        results.update(sft_student_helpfulness=sum(sft_student) / len(sft_student),
                       distilled_student_helpfulness=sum(distilled) / len(distilled),
                       teacher_helpfulness=sum(teacher) / len(teacher),
                       gain_over_sft_student=paired(sft_student, distilled))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
