"""KTO against DPO on the embedded world, judged by its ground truth (docs/kto.md).

    python examples/kto_world.py --out runs/kto_world                      # builds the world and SFT model
    python examples/kto_world.py --quickstart runs/quickstart --out runs/kto_world

From one SFT model (the quickstart's ``sft/hf``, or one trained here as the quickstart trains
it), on the world's preference pairs:

- ``dpo``: ``aligner train dpo`` on the pairs (conf/dpo.yaml: with its SFT term on the
  chosen responses, ``dpo.sft_weight=1``), ``--pairs`` pairs per step;
- ``dpo_pure``: the same without the SFT term (``dpo.sft_weight=0``);
- ``kto``: ``aligner train kto`` on the same pairs written as unpaired rows (each pair's
  chosen response a desirable row, its rejected one an undesirable row, the rows shuffled
  so that a pair's halves are apart), ``2 × --pairs`` rows per step: the same responses
  per step, the same steps (``--steps``), λ_D = λ_U = 1 (n_D = n_U: the paper's ratio 1);
- ``kto_d133``: the same with λ_D = 1.33 (the top of the paper's range).

Every arm has the same β (``--beta``) and steps. Arms already trained in ``--out`` are
not trained again.

Judging (as examples/iterative_dpo.py): ``--prompts`` held-out prompts, one response each
at temperature 1 with fixed seeds, rated by the world's scorer; the paired helpfulness
gains over the SFT model (and KTO over DPO), with standard errors, go to
``results.json``.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from world_common import paired  # the examples folder is the script's own: the same paired statistics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", default=None, help="a finished quickstart folder (read only): its world"
                        " and sft/hf; without it the world and the SFT model are built under --out")
    parser.add_argument("--out", required=True)
    parser.add_argument("--sft-steps", type=int, default=300, help="SFT steps when the SFT model is trained here")
    parser.add_argument("--steps", type=int, default=100, help="steps of DPO and of KTO")
    parser.add_argument("--pairs", type=int, default=32, help="pairs per step (KTO: twice as many rows)")
    parser.add_argument("--beta", type=float, default=0.1, help="β of both")
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts judged")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from aligner.cli.quickstart import _generate, _train, common_overrides, train_sft
    from aligner.data import load_tokenizer
    from aligner.data.datasets import KIND_FORMATS, read_rows
    from aligner.data.formats import parse_row
    from aligner.data.world import load_prompts, score_response, synthesize
    from aligner.parallel import ParallelConfig, initialize, is_initialized

    if not is_initialized():
        initialize(ParallelConfig(seed=args.seed))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}
    t0 = time.perf_counter()
    if args.quickstart:
        qs = Path(args.quickstart)
        world = {name: qs / "world" / f"{name}.jsonl" for name in ("pairs_train", "prompts_heldout")}
        world["tokenizer"] = qs / "world" / "tokenizer.model"
        sft = qs / "sft" / "hf"
    else:
        world = synthesize(out / "world", seed=args.seed)
    tok = load_tokenizer(str(world["tokenizer"]))
    common = common_overrides(world, tok, args.seed)
    if not args.quickstart:
        sft = out / "sft" / "hf"
        if not sft.exists():
            train_sft(out, world, common, args.sft_steps)
        seconds["sft"] = time.perf_counter() - t0

    # the pairs as unpaired rows: chosen desirable, rejected undesirable, shuffled apart
    rows = []
    for number, row, fmt in read_rows(world["pairs_train"], allowed=KIND_FORMATS["pairs"]):
        pair = parse_row(row, fmt)
        if pair.is_tie:
            continue  # as training on pairs drops them
        base = {"prompt": row["prompt"], **({"system": row["system"]} if "system" in row else {})}
        rows += [base | {"completion": pair.chosen, "label": True}, base | {"completion": pair.rejected, "label": False}]
    random.Random(args.seed).shuffle(rows)
    unpaired = out / "unpaired_train.jsonl"
    unpaired.write_text("".join(json.dumps(r) + "\n" for r in rows))

    dpo = [f"data.train={world['pairs_train']}", f"trainer.global_batch_size={args.pairs}", f"dpo.beta={args.beta}"]
    kto = [f"data.train={unpaired}", f"trainer.global_batch_size={2 * args.pairs}", f"kto.beta={args.beta}"]
    runs = {"dpo": ("dpo", dpo), "dpo_pure": ("dpo", dpo + ["dpo.sft_weight=0"]), "kto": ("kto", kto),
            "kto_d133": ("kto", kto + ["kto.desirable_weight=1.33"])}
    trained = {}
    for name, (algorithm, overrides) in runs.items():
        t1 = time.perf_counter()
        trained[name] = _train(algorithm, common + [
            f"init.hf={sft}", f"trainer.out_dir={out / name}", f"trainer.max_steps={args.steps}",
            "trainer.micro_batch_size=8", "trainer.save_interval=0", "trainer.val_interval=0"] + overrides)
        seconds[name] = time.perf_counter() - t1

    heldout = load_prompts(str(world["prompts_heldout"]), tok)[:args.prompts]
    helpful = {}
    for name, folder in [("sft", sft)] + [(name, out / name / "hf") for name in runs]:
        responses = _generate(folder, heldout, tok, max_new_tokens=48, seed=args.seed)
        scores = [score_response(p["meta"], r) for p, r in zip(heldout, responses)]
        with open(out / f"generations_{name}.jsonl", "w") as f:
            for p, r, s in zip(heldout, responses, scores):
                f.write(json.dumps({"prompt": p["prompt"], "response": r, "scores": s}) + "\n")
        helpful[name] = [s["helpfulness"] for s in scores]
    results = {
        "settings": vars(args), "sft": str(sft), "seconds": seconds,
        "helpfulness": {name: sum(v) / len(v) for name, v in helpful.items()},
        **{f"{name}_minus_sft": paired(helpful["sft"], helpful[name]) for name in runs},
        "kto_minus_dpo_pure": paired(helpful["dpo_pure"], helpful["kto"]),
        "kto_minus_dpo": paired(helpful["dpo"], helpful["kto"]),
        "last_train": {name: {k: v for k, v in trained[name]["train"].items()
                              if k.startswith(("loss", "kl", "rewards/", "logps/"))} for name in trained},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
