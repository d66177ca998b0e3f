"""``aligner eval``: evaluate reward models.

- ``aligner eval rewardbench MODEL FILE``: RewardBench-format rows (prompt, chosen,
  rejected, subset) scored by an HF-format reward model; per-subset accuracy, section
  scores and the overall score as RewardBench computes them (REFERENCE section 1), printed
  as a table and written with ``--out`` as JSON.
- ``aligner eval regression MODEL FILE``: HelpSteer2-format rows; MSE and Pearson per
  attribute.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def rewardbench(model: str, path: str, *, tp=1, pp=1, micro_batch_size=8, tokenizer=None,
                attributes=None, reward_attribute=None, attribute_weights=None) -> dict:
    from aligner.algorithms.rewardbench import rewardbench_report
    from aligner.cli.rm import score_file

    rows = score_file(model, path, tp=tp, pp=pp, micro_batch_size=micro_batch_size, tokenizer=tokenizer,
                      attributes=attributes, reward_attribute=reward_attribute)
    judged = []
    for row in rows:
        if attribute_weights:
            rc = sum(w * v for w, v in zip(attribute_weights, row["chosen"]["scores"].values()))
            rr = sum(w * v for w, v in zip(attribute_weights, row["rejected"]["scores"].values()))
        else:
            rc, rr = row["chosen"]["reward"], row["rejected"]["reward"]
        judged.append({"subset": row.get("subset", ""), "chosen_score": rc, "rejected_score": rr})
    return rewardbench_report(judged)


def regression(model: str, path: str, *, attributes: List[str], tp=1, pp=1, micro_batch_size=8, tokenizer=None) -> dict:
    import torch

    from aligner.algorithms.regression_metrics import regression_metrics
    from aligner.algorithms.scoring import score_sequences
    from aligner.cli.rm import _load_rm
    from aligner.data import load_dataset, load_tokenizer

    models, cfg, n = _load_rm(model, tp, pp)
    if n != len(attributes):
        raise ValueError(f"{model}: the head has {n} outputs but {len(attributes)} attributes were named")
    tok = load_tokenizer(tokenizer or model)
    samples = load_dataset(path, kind="regression", tokenizer=tok, attributes=attributes)
    pred = score_sequences(models, [s["tokens"] for s in samples], cfg.pad_token_id or 0, micro_batch_size)
    labels = torch.stack([torch.as_tensor(s["labels"], dtype=torch.float32) for s in samples])
    mask = torch.stack([torch.as_tensor(s["label_mask"], dtype=torch.float32) for s in samples])
    return regression_metrics(pred, labels, mask, attributes)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="aligner eval", description="Evaluate reward models.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("rewardbench", "regression"):
        p = sub.add_parser(name)
        p.add_argument("model", help="HF-format reward model folder")
        p.add_argument("file")
        p.add_argument("--tokenizer")
        p.add_argument("--attributes", nargs="*", default=None)
        p.add_argument("--tp", type=int, default=1)
        p.add_argument("--pp", type=int, default=1)
        p.add_argument("--micro-batch-size", type=int, default=8)
        p.add_argument("--out", help="write the report as JSON here")
        if name == "rewardbench":
            p.add_argument("--reward-attribute", default=None)
            p.add_argument("--attribute-weights", type=float, nargs="*", default=None)
    args = parser.parse_args(argv)
    if args.cmd == "rewardbench":
        from aligner.algorithms.rewardbench import format_report

        report = rewardbench(args.model, args.file, tp=args.tp, pp=args.pp, micro_batch_size=args.micro_batch_size,
                             tokenizer=args.tokenizer, attributes=args.attributes,
                             reward_attribute=args.reward_attribute, attribute_weights=args.attribute_weights)
        text = format_report(report)
    else:
        attrs = args.attributes or ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]
        report = regression(args.model, args.file, attributes=attrs, tp=args.tp, pp=args.pp,
                            micro_batch_size=args.micro_batch_size, tokenizer=args.tokenizer)
        text = "\n".join(f"{k}: {v:.4f}" for k, v in sorted(report.items()))
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
