"""``aligner export CHECKPOINT OUT``: a training checkpoint -> a Hugging Face folder.

CHECKPOINT is a run's ``checkpoints`` root (its latest complete step) or one step
directory. The architecture comes from the checkpoint's ``model_config.json`` (written
by training), or from ``--model-config`` (a HF ``config.json`` / folder or a preset name).
A checkpoint holding a score head is exported as ``*ForSequenceClassification`` with
``num_labels`` read from the head's saved shape (``--head`` / ``--num-outputs`` only
confirm it). Runs at world size 1 (the checkpoint is resharded on load);
``--tokenizer DIR`` copies the tokenizer files.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

HEAD_KEY = "head.weight"


def _saved_head_outputs(path: Path) -> Optional[int]:
    """Rows of the saved score head (None: the checkpoint is a causal LM)."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(path))
    for key, tensor in meta.items():
        if key == HEAD_KEY or key.endswith("." + HEAD_KEY):
            return int(tensor.global_shape[0]) if hasattr(tensor, "global_shape") else int(tensor.shape[0])
    return None


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="aligner export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoints root or one step_XXXXXXX directory")
    parser.add_argument("out", help="output folder (replaced if it exists)")
    parser.add_argument("--model-config", default=None,
                        help="architecture when the checkpoint has no model_config.json: HF config.json / folder or preset")
    parser.add_argument("--head", choices=["reward", "value"], default=None)
    parser.add_argument("--num-outputs", type=int, default=None)
    parser.add_argument("--tokenizer", default=None, help="folder whose tokenizer files are copied")
    args = parser.parse_args(argv)

    from aligner.models import ModelConfig, build_model, export_hf, find_latest, load_checkpoint
    from aligner.parallel import ParallelConfig, initialize

    def fail(msg: str) -> int:
        print(f"aligner export: error: {msg}", file=sys.stderr)
        return 2

    path = Path(args.checkpoint)
    if not (path / "extra.json").is_file():
        found = find_latest(path) if path.is_dir() else None
        if found is None:
            return fail(f"{path}: no complete training checkpoint (no extra.json, no latest)")
        path = found
    fingerprint = json.loads((path / "extra.json").read_text()).get("base_fingerprint")
    if fingerprint:
        return fail(f"{path}: holds LoRA adapters only (base fingerprint {fingerprint}), not a whole model; the"
                    " run's hf/ (merged) and hf_peft/ (PEFT adapters) exports are its model")
    cfg_file = path / "model_config.json"
    if args.model_config:
        cfg = ModelConfig.load(args.model_config)
    elif cfg_file.is_file():
        cfg = ModelConfig.from_dict(json.loads(cfg_file.read_text()), source=str(cfg_file))
    else:
        return fail(f"{cfg_file} not found; pass --model-config (HF config.json or preset name)")

    saved_outputs = _saved_head_outputs(path)
    if saved_outputs is None and (args.head or args.num_outputs is not None):
        given = f"--head {args.head}" if args.head else f"--num-outputs {args.num_outputs}"
        return fail(f"{path}: {given} given, but the checkpoint has no score head ({HEAD_KEY})")
    if saved_outputs is not None and args.num_outputs not in (None, saved_outputs):
        return fail(f"{path}: --num-outputs {args.num_outputs}, but the saved head has {saved_outputs} outputs")
    head = None if saved_outputs is None else (args.head or "reward")

    initialize(ParallelConfig())
    model = build_model(cfg, head=head, num_outputs=saved_outputs or 1)
    extra = load_checkpoint(path, [model])
    out = export_hf([model], cfg, args.out, tokenizer_dir=args.tokenizer, head=head)
    kind = f"{head} model, {saved_outputs} outputs" if head else "causal LM"
    print(f"exported {path} (step {extra['step']}, {kind}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
