"""``aligner data``: the embedded world and data-file tools.

- ``synth --out DIR [--seed S] [--styles standard|steerable]``: write the embedded
  instruction world (aligner.data.world).
- ``validate FILE [--format F] [--kind K] [--tokenizer T]``: check every row (file:line
  errors); with a tokenizer also render and count over-length samples.
- ``stats FILE --tokenizer T [--kind K] [--template T]``: sample count and token-length
  percentiles. Pair files count pairs (``pairs``) and report the lengths of ``chosen``,
  ``rejected`` and the whole ``pair`` (both responses: what a step processes).
- ``pairs POLICY PROMPTS OUT --reward R --n N``: on-policy preference pairs (best vs worst
  of N samples by a reward; :mod:`aligner.cli.pairs`).
- ``pack FILE --tokenizer T --capacity C [--kind K]``: pack the file's samples (a pair's
  chosen and rejected share one bin, so a pair's length is both responses') and report bins
  and the share of capacity filled; unpacked, a pair is two padded rows.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import List, Optional


def _percentiles(values, qs=(50, 90, 99, 100)):
    values = sorted(values)
    return {f"p{q}": values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] for q in qs}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="aligner data", description="Embedded world and data-file tools.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="write the embedded instruction world")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--table", action="store_true", help="print the scorer's mean attributes per response style")
    s.add_argument("--styles", default="standard", choices=("standard", "steerable"),
                   help="steerable: add responses whose verbosity and complexity span 0..4 (docs/steerlm.md)")
    for name in ("validate", "stats", "pack"):
        p = sub.add_parser(name)
        p.add_argument("file")
        p.add_argument("--format", default="auto")
        p.add_argument("--kind", default=None, help="sft | regression | pairs | prompts (default: from the format)")
        p.add_argument("--tokenizer", required=name != "validate")
        p.add_argument("--max-length", type=int, default=4096)
        p.add_argument("--template", default="auto", choices=("auto", "extra_id", "chat", "raw"))
        p.add_argument("--skip-invalid", action="store_true")
        if name == "pack":
            p.add_argument("--capacity", type=int, required=True)
    from aligner.cli import pairs as pairs_cli

    pairs_cli.add_arguments(sub.add_parser("pairs", help="on-policy preference pairs: sample, score, best vs worst"))
    args = parser.parse_args(argv)
    if args.cmd == "pairs":
        print(json.dumps(pairs_cli.make_pairs(args), indent=2))
        return 0

    if args.cmd == "synth":
        from aligner.data.world import attribute_table, synthesize

        paths = synthesize(args.out, seed=args.seed, styles=args.styles)
        for k, v in paths.items():
            print(f"{k:<17} {v}")
        if args.table:
            for style, row in attribute_table(args.seed).items():
                print(f"{style:<12} " + "  ".join(f"{a} {v:.2f}" for a, v in row.items()))
        return 0

    from aligner.cli.options import at_least
    from aligner.data.datasets import KIND_FORMATS, DataFormatError, load_dataset, read_jsonl

    at_least("--max-length", args.max_length, 1)
    at_least("--capacity", getattr(args, "capacity", None), 1)

    counts: Counter = Counter()
    if args.kind is not None and args.kind not in KIND_FORMATS:
        print(f"aligner data {args.cmd}: error: --kind {args.kind!r}; expected one of {', '.join(KIND_FORMATS)}",
              file=sys.stderr)
        return 2
    allowed = KIND_FORMATS[args.kind] if args.kind else ()  # a file of another kind is invalid here
    try:
        rows = list(read_jsonl(args.file, args.format, allowed, skip_invalid=args.skip_invalid, counts=counts))
    except DataFormatError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    fmt = rows[0][2] if rows else args.format
    kind = args.kind or next((k for k, fs in KIND_FORMATS.items() if fmt in fs and k != "any_scored"), None)
    report = {"file": args.file, "format": fmt, "kind": kind, "valid_rows": len(rows), **dict(counts)}
    if args.tokenizer:
        from aligner.data import load_tokenizer
        from aligner.data.datasets import last_report

        samples = load_dataset(args.file, kind=kind, tokenizer=load_tokenizer(args.tokenizer), fmt=args.format,
                               template=args.template, max_length=args.max_length, skip_invalid=args.skip_invalid)
        report.update({k: v for k, v in last_report.items() if k not in report})
        pairs = "chosen" in samples[0]
        if pairs:
            report["pairs"] = report.pop("samples", len(samples))
            report["token_length"] = {
                "chosen": _percentiles([int(s["chosen"].numel()) for s in samples]),
                "rejected": _percentiles([int(s["rejected"].numel()) for s in samples]),
                "pair": _percentiles([int(s["chosen"].numel() + s["rejected"].numel()) for s in samples]),
            }
        else:
            key = next(k for k in ("tokens", "prompt_tokens") if k in samples[0])
            report["token_length"] = _percentiles([int(s[key].numel()) for s in samples])
        if args.cmd == "pack":
            from aligner.data.packing import efficiency, pack_lengths

            lengths = [sum(int(s[k].numel()) for k in ("tokens", "chosen", "rejected", "prompt_tokens") if k in s)
                       for s in samples]
            unit = "pairs" if pairs else "samples"
            too_long = sum(n > args.capacity for n in lengths)
            if too_long:
                print(f"aligner data pack: {too_long} {unit} exceed --capacity {args.capacity}"
                      f" (the longest needs --capacity >= {max(lengths)}"
                      + ("; a pair's chosen and rejected share one bin)" if pairs else ")"), file=sys.stderr)
                return 1
            bins = pack_lengths(lengths, args.capacity)
            report["pack"] = {"capacity": args.capacity, "bins": len(bins), unit: len(lengths),
                              "efficiency": round(efficiency(lengths, bins, args.capacity), 4),
                              "padded_rows_without_packing": len(lengths) * (2 if pairs else 1)}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
