"""``aligner export CHECKPOINT OUT``: a training checkpoint -> a Hugging Face folder.

CHECKPOINT is a run's ``checkpoints`` root (its latest complete step) or one step
directory; the architecture comes from the checkpoint's ``model_config.json``. A reward
model (``--head reward``) is written as ``*ForSequenceClassification``. Runs at world size
1 (the checkpoint is resharded on load); ``--tokenizer DIR`` copies tokenizer files.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="aligner export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--head", choices=["reward", "value"], default=None)
    parser.add_argument("--num-outputs", type=int, default=1)
    parser.add_argument("--tokenizer", default=None)
    args = parser.parse_args(argv)

    from aligner.models import ModelConfig, build_model, export_hf, find_latest, load_checkpoint
    from aligner.parallel import ParallelConfig, initialize

    path = Path(args.checkpoint)
    if (path / "latest").is_file():
        path = find_latest(path)
    cfg_file = path / "model_config.json"
    if not cfg_file.is_file():
        print(f"aligner export: {cfg_file} not found (not an aligner training checkpoint?)", file=sys.stderr)
        return 2
    cfg = ModelConfig.from_dict(json.loads(cfg_file.read_text()), source=str(cfg_file))
    initialize(ParallelConfig())
    model = build_model(cfg, head=args.head, num_outputs=args.num_outputs)
    load_checkpoint(path, [model])
    out = export_hf([model], cfg, args.out, tokenizer_dir=args.tokenizer, head=args.head)
    print(f"exported {path} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
