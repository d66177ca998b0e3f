"""``aligner data``: the embedded world and data-file tools.

- ``synth --out DIR [--seed S] [--styles standard|steerable]``: write the embedded
  instruction world (aligner.data.world).
- ``prepare INPUT... --tokenizer T --out DIR [--kind K] [--template X] [...]``: render and
  tokenise the rows of the inputs (``.jsonl``, ``.jsonl.gz``, ``.parquet``, Arrow folders;
  one dataset, in order) once, in worker processes, into a prepared folder that training
  maps (aligner.data.prepare; docs/data_formats.md). Prints the manifest's summary.
- ``validate FILE [--format F] [--kind K] [--tokenizer T]``: check every row (file:line
  errors); with a tokenizer also render and count over-length samples. A prepared folder:
  its files and sources against its manifest.
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

from aligner.data.formats import HELPSTEER2_ATTRIBUTES


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
    prep = sub.add_parser("prepare", help="tokenise data files once into a prepared (memory-mapped) folder")
    prep.add_argument("inputs", nargs="+", metavar="INPUT", help=".jsonl, .jsonl.gz, .parquet or an Arrow folder")
    prep.add_argument("--out", required=True, help="the prepared folder to write")
    prep.add_argument("--tokenizer", required=True)
    prep.add_argument("--kind", default=None,
                      help="sft | regression | pairs | unpaired | prompts | any_scored | steerlm2 (default: from the format)")
    prep.add_argument("--template", default="auto", choices=("auto", "extra_id", "chat", "raw"))
    prep.add_argument("--format", default="auto")
    prep.add_argument("--max-length", type=int, default=4096)
    prep.add_argument("--overlong", default="truncate_left", choices=("truncate_left", "drop", "error"),
                      help="a sample (prompts: a prompt) longer than --max-length: truncate_left, drop or error")
    prep.add_argument("--skip-invalid", action="store_true")
    prep.add_argument("--attributes", default=",".join(HELPSTEER2_ATTRIBUTES),
                      help="regression: the attribute names, in the head's order (comma-separated)")
    prep.add_argument("--reward-model", action="store_true", help="pairs: render them for a reward model")
    prep.add_argument("--packing", action="store_true", help="pairs: fit a pair into one bin of --max-length")
    prep.add_argument("--workers", type=int, default=None,
                      help="rendering processes (default: one per core, up to 8, for inputs of 32 MiB or more)")
    prep.add_argument("--overwrite", action="store_true", help="replace a prepared folder at --out")
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
    from aligner.data.datasets import KIND_FORMATS, DataFormatError, read_rows
    from aligner.data.loading import load_dataset, source_format
    from aligner.data.prepared import PreparedDataset, is_prepared

    at_least("--max-length", args.max_length, 1)
    at_least("--capacity", getattr(args, "capacity", None), 1)

    counts: Counter = Counter()
    if args.kind is not None and args.kind not in KIND_FORMATS:
        print(f"aligner data {args.cmd}: error: --kind {args.kind!r}; expected one of {', '.join(KIND_FORMATS)}",
              file=sys.stderr)
        return 2
    allowed = KIND_FORMATS[args.kind] if args.kind else ()  # a file of another kind is invalid here
    if args.cmd == "prepare":
        return _prepare(args, allowed)
    if args.cmd == "validate" and is_prepared(args.file):
        try:
            data = PreparedDataset(args.file)
        except DataFormatError as exc:
            print(f"invalid: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(_summary(args.file, data.manifest), indent=2))
        return 0
    if is_prepared(args.file):  # stats / pack of a prepared folder: its samples, its kind
        fmt = source_format(args.file)
        kind = args.kind or PreparedDataset(args.file).kind
        report = {"file": args.file, "format": fmt, "kind": kind}
    else:
        try:
            rows = list(read_rows(args.file, args.format, allowed, skip_invalid=args.skip_invalid, counts=counts))
        except DataFormatError as exc:
            print(f"invalid: {exc}", file=sys.stderr)
            return 1
        fmt = rows[0][2] if rows else args.format
        kind = args.kind or _kind_of(fmt)
        report = {"file": args.file, "format": fmt, "kind": kind, "valid_rows": len(rows), **dict(counts)}
    if args.tokenizer:
        from aligner.data import load_tokenizer

        samples = load_dataset(args.file, kind=kind, tokenizer=load_tokenizer(args.tokenizer), fmt=args.format,
                               template=args.template, max_length=args.max_length, skip_invalid=args.skip_invalid)
        report.update({k: v for k, v in samples.report.items() if k not in report})
        pairs = "chosen" in samples[0]
        if pairs:
            report["pairs"] = report.pop("samples", len(samples))
            report["token_length"] = {
                "chosen": _percentiles([int(s["chosen"].numel()) for s in samples]),
                "rejected": _percentiles([int(s["rejected"].numel()) for s in samples]),
                "pair": _percentiles([int(s["chosen"].numel() + s["rejected"].numel()) for s in samples]),
            }
        elif "responses" in samples[0]:  # unpaired (KTO) and SteerLM 2.0 groups: every response
            report["responses"] = sum(len(s["responses"]) for s in samples)
            if "labels" in samples[0]:
                report["desirable"] = sum(int(s["labels"].sum()) for s in samples)
            report["token_length"] = _percentiles([int(t.numel()) for s in samples for t, _ in s["responses"]])
        else:
            key = next(k for k in ("tokens", "prompt_tokens") if k in samples[0])
            report["token_length"] = _percentiles([int(s[key].numel()) for s in samples])
        if args.cmd == "pack":
            from aligner.data.packing import efficiency, pack_lengths

            lengths = [sum(int(s[k].numel()) for k in ("tokens", "chosen", "rejected", "prompt_tokens") if k in s)
                       + sum(int(t.numel()) for t, _ in s.get("responses", ())) for s in samples]
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


def _kind_of(fmt: str) -> Optional[str]:
    """The kind a file of format ``fmt`` is read as by default (the first that reads it)."""
    from aligner.data.datasets import KIND_FORMATS

    return next((k for k, fs in KIND_FORMATS.items() if fmt in fs and k != "any_scored"), None)


def _summary(out, manifest: dict) -> dict:
    """What ``prepare`` and ``validate`` print of a prepared folder's manifest."""
    return {"prepared": str(out), "kind": manifest["kind"], "samples": manifest["samples"],
            "template": manifest["template"], "tokenizer": manifest["tokenizer"]["path"],
            "sources": [{k: s[k] for k in ("path", "format", "rows", "sha256")} for s in manifest["sources"]],
            "report": manifest["report"],
            "bytes": sum(f["bin_bytes"] + f["idx_bytes"] for f in manifest["fields"].values()),
            "seconds": manifest["seconds"]}


def _prepare(args, allowed) -> int:
    """``aligner data prepare``: the kind from the first input's format unless named."""
    from aligner.data import load_tokenizer
    from aligner.data.loading import source_format
    from aligner.data.prepare import prepare_dataset

    kind = args.kind or _kind_of(source_format(args.inputs[0], args.format, allowed) or "")
    if kind is None:
        print(f"aligner data prepare: error: {args.inputs[0]}: no rows to tell the kind from; name it with --kind",
              file=sys.stderr)
        return 2
    manifest = prepare_dataset(
        args.inputs, args.out, kind, load_tokenizer(args.tokenizer), fmt=args.format, template=args.template,
        max_length=args.max_length, overlong=args.overlong, skip_invalid=args.skip_invalid,
        attributes=[a.strip() for a in args.attributes.split(",") if a.strip()], reward_model=args.reward_model,
        packing=args.packing, workers=args.workers, progress=True, overwrite=args.overwrite)
    print(json.dumps(_summary(args.out, manifest), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
