"""``aligner eval``: evaluate reward models.

- ``aligner eval rewardbench MODEL FILE``: RewardBench-format rows (prompt, chosen,
  rejected, subset; also plain pairs and HelpSteer2-Preference rows, whose ties are
  counted and left out) scored by an HF-format reward model; per-subset accuracy, section
  scores and the overall score as RewardBench computes them (docs/reward_models.md),
  printed as a table and written with ``--out`` as JSON. Rows are rendered and the
  scalar reward read exactly as ``aligner rm score`` does (same options and defaults:
  the template and weights the model's training recorded).
- ``aligner eval regression MODEL FILE``: HelpSteer2-format rows; MSE and Pearson per
  attribute.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from aligner.runtime import is_rank0


def rewardbench(model: str, path: str, *, tp=1, pp=1, micro_batch_size=8, tokenizer=None, template=None,
                attributes=None, reward_attribute=None, attribute_weights=None) -> dict:
    from aligner.evaluation.rewardbench import rewardbench_report
    from aligner.cli.rm import ScoringError, score_samples

    readout, scored = score_samples(model, path, tp=tp, pp=pp, micro_batch_size=micro_batch_size,
                                    tokenizer=tokenizer, template=template, attributes=attributes,
                                    reward_attribute=reward_attribute, attribute_weights=attribute_weights)
    judged, ties = [], 0
    for entry in scored:
        if "chosen" not in entry["reward"]:
            raise ScoringError(f"{path}:{entry['line']}: a {entry['format']} row has one response;"
                               " RewardBench needs chosen / rejected pairs")
        if entry["format"] == "helpsteer2_preference" and int(entry["row"]["preference_strength"]) == 0:
            ties += 1  # no preferred response to get right
            continue
        judged.append({"subset": entry.get("subset") or "", "chosen_score": entry["reward"]["chosen"],
                       "rejected_score": entry["reward"]["rejected"]})
    for row in judged:
        row["subset"] = row["subset"] or "pairs"
    report = rewardbench_report(judged, source=path)
    report["reward"] = {"names": readout.names, "weights": readout.weights, "weights_from": readout.source,
                        "template": readout.template}
    if ties:
        report["ties_left_out"] = ties
    return report


def regression(model: str, path: str, *, attributes: Optional[List[str]] = None, tp=1, pp=1, micro_batch_size=8,
               tokenizer=None, template=None) -> dict:
    import torch

    from aligner.evaluation.regression_metrics import regression_metrics
    from aligner.training.scoring import score_sequences
    from aligner.rewards.readout import ScoringError, load_reward_model, reward_readout
    from aligner.data import load_dataset, load_tokenizer

    models, cfg, n = load_reward_model(model, tp, pp)
    # the names must match the head (recorded, or given); the weights play no part here
    readout = reward_readout(model, n, attributes=attributes, attribute_weights=[0.0] * n, template=template)
    if readout.names == [f"LABEL_{i}" for i in range(n)]:
        raise ScoringError(f"{model} does not name its {n} outputs: pass --attributes (the rows' attribute fields)")
    tok = load_tokenizer(tokenizer or model)
    samples = load_dataset(path, kind="regression", tokenizer=tok, attributes=readout.names,
                           template=readout.template, max_length=cfg.max_position_embeddings)
    pred = score_sequences(models, [s["tokens"] for s in samples], cfg.pad_token_id or 0, micro_batch_size)
    labels = torch.stack([torch.as_tensor(s["labels"], dtype=torch.float32) for s in samples])
    mask = torch.stack([torch.as_tensor(s["label_mask"], dtype=torch.float32) for s in samples])
    return regression_metrics(pred, labels, mask, readout.names)


def main(argv: Optional[List[str]] = None) -> int:
    from aligner.cli.rm import ScoringError, _add_readout_options, readout_options
    from aligner.data import DataFormatError
    from aligner.models import CheckpointError

    parser = argparse.ArgumentParser(prog="aligner eval", description="Evaluate reward models.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("rewardbench", "regression"):
        p = sub.add_parser(name)
        p.add_argument("model", help="HF-format reward model folder")
        p.add_argument("file")
        p.add_argument("--out", help="write the report as JSON here")
        _add_readout_options(p)
    args = parser.parse_args(argv)
    options = readout_options(args)  # checked before any model is loaded
    try:
        if args.cmd == "rewardbench":
            from aligner.evaluation.rewardbench import format_report

            report = rewardbench(args.model, args.file, **options)
            text = format_report(report) + f"\n\nreward: {report['reward']['weights_from']}" \
                f" ({report['reward']['template']} template)"
        else:
            if args.reward_attribute is not None or args.attribute_weights is not None:
                raise ScoringError("--reward-attribute / --attribute-weights play no part in regression metrics")
            report = regression(args.model, args.file, attributes=args.attributes, tp=args.tp, pp=args.pp,
                                micro_batch_size=args.micro_batch_size, tokenizer=args.tokenizer,
                                template=args.template)
            text = "\n".join(f"{k}: {v:.4f}" for k, v in sorted(report.items()))
    except (ScoringError, DataFormatError, CheckpointError, FileNotFoundError) as exc:
        print(f"aligner eval {args.cmd}: error: {exc}", file=sys.stderr)
        return 2

    if is_rank0():
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
