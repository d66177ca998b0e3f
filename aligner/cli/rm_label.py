"""``aligner rm label MODEL INPUT OUTPUT``: SteerLM attribute labels from a regression reward model.

Every Assistant turn of a conversation file (NeMo-style ``sft`` rows, or ``steerlm`` rows
whose labels are replaced) is scored by the regression reward model (docs/reward_models.md)
as the model reads a (prompt, response) row: the conversation up to that turn, then the
turn, rendered with the template its training recorded (``extra_id``) and read at the
last token. Each predicted attribute ``ŷ`` becomes the level ``clip(floor(ŷ + 0.5), 0, 4)``
(rounded half up, clipped to HelpSteer2's 0..4 scale), and the levels are written as the
turn's SteerLM attribute string ``label`` (``helpfulness:4,correctness:3,...``, the
HelpSteer2 attributes first in their order, any other head outputs after, sorted) —
the field the templates render after the assistant header (docs/data_formats.md,
``steerlm``). Everything else in the row is kept as it is. The output trains SteerLM with
``aligner train sft`` (docs/steerlm.md).

The attribute names are the head's outputs as training recorded them (config.json
``id2label``), or ``--attributes`` (one name per output). A malformed row, a file of
another format, or a turn that cannot fit the model's positions is an error naming the
file, the line and the field.
"""
from __future__ import annotations

import json
import math
from typing import List, Optional, Sequence

LABEL_FORMATS = ("sft", "steerlm")


def attribute_levels(values: Sequence[float], low: int = 0, high: int = 4) -> List[int]:
    """Predicted attributes -> integer levels: rounded half up, clipped to ``low..high``."""
    return [min(high, max(low, int(math.floor(float(v) + 0.5)))) for v in values]


def label_rows(model_dir: str, input_path: str, *, tp: int = 1, pp: int = 1, micro_batch_size: int = 8,
               tokenizer: Optional[str] = None, template: Optional[str] = None,
               attributes: Optional[Sequence[str]] = None) -> List[dict]:
    """The rows of ``input_path`` with a ``label`` on every Assistant turn (module docstring)."""
    import torch

    from aligner.training.scoring import score_sequences
    from aligner.rewards.readout import ScoringError, load_reward_model, reward_readout
    from aligner.data import load_tokenizer
    from aligner.data.datasets import DataFormatError, read_rows, render_reward
    from aligner.data.formats import ASSISTANT, Conversation, Turn, format_attribute_label, parse_row

    models, cfg, n_out = load_reward_model(model_dir, tp, pp)
    readout = reward_readout(model_dir, n_out, attributes=attributes, reward_attribute=None,
                             attribute_weights=[1.0] * n_out, template=template)
    if any(name == f"LABEL_{i}" for i, name in enumerate(readout.names)):
        raise ScoringError(f"{model_dir}: the head's outputs have no attribute names ({readout.names}); name them"
                           " with --attributes (one per output, in order)")
    tok = load_tokenizer(tokenizer or model_dir)
    limit = cfg.max_position_embeddings
    rows, sequences, where = [], [], []
    for lineno, row, _ in read_rows(input_path, "auto", LABEL_FORMATS):
        conv = parse_row(row, "sft")
        plain = [Turn(t.role, t.content) for t in conv.turns]  # the reward model reads no labels
        rows.append(row)
        for i, turn in enumerate(plain):
            if turn.role != ASSISTANT:
                continue
            if i == 0:
                raise DataFormatError(f"{input_path}:{lineno}: conversations[0] is an Assistant turn with no User"
                                      " turn before it to score it against")
            tokens, mask = render_reward(tok, readout.template, Conversation(plain[:i], conv.system), turn.content)
            if len(tokens) > limit:
                first_target = next(k for k, m in enumerate(mask) if m > 0)
                if len(tokens) - limit > first_target:
                    raise DataFormatError(f"{input_path}:{lineno}: conversations[{i}] field 'value' does not fit the"
                                          f" reward model's {limit} positions ({len(tokens)} tokens with its prompt)")
                tokens = tokens[len(tokens) - limit:]  # keep the response, cut the prompt's start
            sequences.append(torch.tensor(tokens, dtype=torch.long))
            where.append((len(rows) - 1, i))
    if not rows:
        raise DataFormatError(f"{input_path}: no rows to label")
    outputs = score_sequences(models, sequences, cfg.pad_token_id if cfg.pad_token_id is not None else 0,
                              micro_batch_size)
    out = [json.loads(json.dumps(r)) for r in rows]  # deep copies: the input rows stay as read
    for (r, i), values in zip(where, outputs.tolist()):
        levels = dict(zip(readout.names, attribute_levels(values)))
        out[r]["conversations"][i]["label"] = format_attribute_label(levels)
    return out


def label_file(model_dir: str, input_path: str, output_path: str, **options) -> int:
    """``aligner rm label`` as a function: writes ``output_path`` atomically (rank 0); the row count."""
    from aligner.files import write_jsonl
    from aligner.runtime import is_rank0

    rows = label_rows(model_dir, input_path, **options)
    if is_rank0():
        write_jsonl(output_path, rows, ensure_ascii=False)
    return len(rows)


def add_parser(sub) -> None:
    """The ``label`` subcommand of ``aligner rm``."""
    p = sub.add_parser("label", help="write SteerLM attribute labels predicted by a regression reward model")
    p.add_argument("model", help="HF folder of a regression reward model")
    p.add_argument("input", help="conversation file (sft / steerlm rows)")
    p.add_argument("output", help="labelled jsonl to write")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    p.add_argument("--template", choices=("auto", "extra_id", "chat"), default=None,
                   help="rendering of (prompt, response); default: what training recorded, else auto")
    p.add_argument("--attributes", nargs="*", default=None,
                   help="names of the head outputs, in order (default: those the model records)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=8)


def run(args) -> int:
    import sys

    from aligner.rewards.readout import ScoringError
    from aligner.data import DataFormatError
    from aligner.models import CheckpointError
    from aligner.runtime import is_rank0

    from aligner.cli.options import at_least

    at_least("--micro-batch-size", args.micro_batch_size, 1)
    try:
        n = label_file(args.model, args.input, args.output, tp=args.tp, pp=args.pp,
                       micro_batch_size=args.micro_batch_size, tokenizer=args.tokenizer, template=args.template,
                       attributes=args.attributes)
    except (ScoringError, DataFormatError, CheckpointError, FileNotFoundError) as exc:
        print(f"aligner rm label: error: {exc}", file=sys.stderr)
        return 2
    if is_rank0():
        print(f"labelled {n} rows -> {args.output}")
    return 0
