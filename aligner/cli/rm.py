"""``aligner rm``: reward-model utilities.

- ``aligner rm score MODEL INPUT OUTPUT``: score every response of a jsonl file (any
  reward-bearing format of the data layer: HelpSteer2 regression rows, pairs,
  HelpSteer2-Preference, RewardBench rows) with an HF-format reward model, batched, any
  TP / PP (run under torchrun for more than one process). Each output row is the input
  row with ``scores`` (attribute name -> head output) and ``reward`` (the scalar
  ``r = w · ŷ``) added; a row with two responses gets both keyed by its response fields
  (``{"chosen": {...}, "rejected": {...}}``, or ``response_1`` / ``response_2``).
- ``aligner rm bon POLICY PROMPTS --proxy RM --gold world --n 16 --out DIR``: best-of-n
  by the proxy, judged by the gold reward, against KL_bon (:mod:`aligner.cli.bon`).
- ``aligner rm expo WEAK STRONG OUTPUT --alpha A``: ExPO extrapolation
  ``θ = θ_w + α (θ_s − θ_w)`` between two HF-format checkpoints of the same architecture
  (weak: e.g. the regression model; strong: the BT model trained from it).
- ``aligner rm label MODEL INPUT OUTPUT``: SteerLM attribute labels on every Assistant
  turn of a conversation file, predicted by a regression reward model
  (:mod:`aligner.cli.rm_label`).

How a model's outputs are read (:func:`aligner.rewards.readout.reward_readout`, shared with ``aligner eval`` and
``aligner generate``; docs/reward_models.md): the output names are those the export
recorded (config.json ``id2label``), the weights those its training used
(``aligner_config.json``: ``rm.attribute_weights``, or BT's one-hot on
``rm.reward_attribute``), HelpSteer2's RewardBench weights for a head of the HelpSteer2
attributes that records none, the single output of a one-output head; the rows are
rendered with the template training recorded (``auto`` for a model that records none,
which is ``extra_id`` for reward rows). ``--attributes``, ``--reward-attribute``,
``--attribute-weights`` and ``--template`` override them; names or weights that do not
match the head are refused.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from aligner.rewards.readout import (  # noqa: F401  (used by the rm / eval / generate commands)
    RewardReadout,
    ScoringError,
    load_reward_model,
    reward_readout,
)
from aligner.files import write_jsonl
from aligner.runtime import UserError, is_rank0


def _response_fields(row: dict, fmt: str):
    """The input row's field names of (chosen, rejected) for a two-response row."""
    if fmt == "helpsteer2_preference":  # strength <= 0: response_1 is (at least as) good
        return ("response_1", "response_2") if int(row["preference_strength"]) <= 0 else ("response_2", "response_1")
    return "chosen", "rejected"


def score_samples(model_dir: str, input_path: str, *, tp: int = 1, pp: int = 1, micro_batch_size: int = 8,
                  tokenizer: Optional[str] = None, template: Optional[str] = None,
                  attributes: Optional[Sequence[str]] = None, reward_attribute: Optional[str] = None,
                  attribute_weights: Optional[Sequence[float]] = None):
    """Score every response of ``input_path``: ``(readout, scored)`` with one entry per
    input row, in file order: ``{"line", "row", "format", "outputs": {key: [N]},
    "reward": {key: r}}`` where key is ``tokens`` (one response) or ``chosen`` /
    ``rejected``; ``subset`` kept for pairs."""
    from aligner.training.scoring import score_sequences
    from aligner.data import load_dataset, load_tokenizer
    from aligner.data.datasets import KIND_FORMATS, read_rows

    models, cfg, n = load_reward_model(model_dir, tp, pp)
    readout = reward_readout(model_dir, n, attributes=attributes, reward_attribute=reward_attribute,
                             attribute_weights=attribute_weights, template=template)
    tok = load_tokenizer(tokenizer or model_dir)
    rows = {line: (row, fmt) for line, row, fmt in read_rows(input_path, "auto", KIND_FORMATS["any_scored"])}
    # truncate_left as training does; a row that cannot fit even so is an error, not a gap
    samples = load_dataset(input_path, kind="any_scored", tokenizer=tok, template=readout.template,
                           max_length=cfg.max_position_embeddings, overlong="truncate_left")
    missing = sorted(set(rows) - {s["line"] for s in samples})
    if missing:
        raise ScoringError(f"{input_path}:{missing[0]}: the response does not fit the model's"
                           f" {cfg.max_position_embeddings} positions" + (f" ({len(missing)} rows)" if len(missing) > 1 else ""))
    seqs, where = [], []
    for i, s in enumerate(samples):
        for key in ("tokens", "chosen", "rejected"):
            if key in s:
                where.append((i, key))
                seqs.append(s[key])
    outputs = score_sequences(models, seqs, cfg.pad_token_id if cfg.pad_token_id is not None else 0,
                              micro_batch_size)
    rewards = readout.rewards(outputs).tolist()
    scored = []
    for s in samples:
        row, fmt = rows[s["line"]]
        entry = {"line": s["line"], "row": row, "format": fmt, "outputs": {}, "reward": {}}
        if "subset" in s:
            entry["subset"] = s["subset"]
        scored.append(entry)
    for (i, key), out, r in zip(where, outputs.tolist(), rewards):
        scored[i]["outputs"][key] = out
        scored[i]["reward"][key] = r
    return readout, scored


def scored_rows(readout: RewardReadout, scored: List[dict]) -> List[dict]:
    """The output rows of ``aligner rm score``: each input row plus ``scores`` and ``reward``."""
    out = []
    for entry in scored:
        row = dict(entry["row"])
        named = {key: dict(zip(readout.names, values)) for key, values in entry["outputs"].items()}
        if "tokens" in named:
            row["scores"], row["reward"] = named["tokens"], entry["reward"]["tokens"]
        else:
            fields = _response_fields(entry["row"], entry["format"])
            row["scores"] = {f: named[k] for f, k in zip(fields, ("chosen", "rejected"))}
            row["reward"] = {f: entry["reward"][k] for f, k in zip(fields, ("chosen", "rejected"))}
        out.append(row)
    return out


def score_file(model_dir: str, input_path: str, **options) -> List[dict]:
    """``aligner rm score`` as a function: the output rows (see :func:`scored_rows`)."""
    readout, scored = score_samples(model_dir, input_path, **options)
    return scored_rows(readout, scored)


def expo(weak: str, strong: str, out: str, alpha: float) -> Path:
    from safetensors.torch import load_file

    from aligner.algorithms.losses import expo_extrapolate
    from aligner.models.hf import save_safetensors

    def state(folder):
        folder = Path(folder)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder}: no *.safetensors files")
        sd = {}
        for f in files:
            sd.update(load_file(str(f)))
        return sd

    from aligner.cli.options import finite

    finite("--alpha", alpha)
    try:
        merged = expo_extrapolate(state(weak), state(strong), alpha)
    except (KeyError, ValueError) as exc:  # checkpoints of other architectures or heads
        message = exc.args[0] if exc.args else str(exc)
        raise UserError(f"{weak} and {strong}: {message}",
                        hint="ExPO extrapolates between two checkpoints of one architecture and head (the"
                             " regression reward model and the BT model trained from it)") from None
    out_dir = Path(out)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(strong, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"),
                    copy_function=shutil.copyfile)  # file modes follow the umask, not the source's
    save_safetensors({k: v.contiguous() for k, v in merged.items()}, tmp / "model.safetensors")
    (tmp / "expo.json").write_text(json.dumps({"weak": str(weak), "strong": str(strong), "alpha": alpha}, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def _add_readout_options(p) -> None:
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    p.add_argument("--template", choices=("auto", "extra_id", "chat"), default=None,
                   help="rendering of (prompt, response); default: what training recorded, else auto")
    p.add_argument("--attributes", nargs="*", default=None,
                   help="names of the head outputs, in order (default: those the model records)")
    p.add_argument("--reward-attribute", default=None, help="use this output as the scalar reward")
    p.add_argument("--attribute-weights", type=float, nargs="*", default=None,
                   help="one weight per head output: reward = w · outputs")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=8)


def readout_options(args) -> dict:
    """The reward-model options of ``args`` as keyword arguments (a batch of no rows is
    refused here, before any model is loaded; names and weights by :func:`reward_readout`)."""
    from aligner.cli.options import at_least

    at_least("--micro-batch-size", args.micro_batch_size, 1)
    return dict(tp=args.tp, pp=args.pp, micro_batch_size=args.micro_batch_size, tokenizer=args.tokenizer,
                template=args.template, attributes=args.attributes, reward_attribute=args.reward_attribute,
                attribute_weights=args.attribute_weights)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="aligner rm", description="Reward-model utilities.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("score", help="score a jsonl file with an HF-format reward model")
    p.add_argument("model")
    p.add_argument("input")
    p.add_argument("output")
    _add_readout_options(p)
    e = sub.add_parser("expo", help="ExPO: weak + alpha (strong - weak)")
    e.add_argument("weak")
    e.add_argument("strong")
    e.add_argument("output")
    e.add_argument("--alpha", type=float, required=True)
    from aligner.cli import bon, rm_label

    rm_label.add_parser(sub)
    bon.add_arguments(sub.add_parser("bon", help="best-of-n by a proxy reward, judged by a gold reward"))
    args = parser.parse_args(argv)
    if args.cmd == "label":
        return rm_label.run(args)
    if args.cmd == "bon":
        bon.run(args)
        return 0
    if args.cmd == "expo":
        print(f"wrote {expo(args.weak, args.strong, args.output, args.alpha)}")
        return 0
    from aligner.data import DataFormatError
    from aligner.models import CheckpointError

    try:
        rows = score_file(args.model, args.input, **readout_options(args))
    except (ScoringError, DataFormatError, CheckpointError, FileNotFoundError) as exc:
        print(f"aligner rm score: error: {exc}", file=sys.stderr)
        return 2

    if is_rank0():
        write_jsonl(args.output, rows)
        print(f"scored {len(rows)} rows -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
