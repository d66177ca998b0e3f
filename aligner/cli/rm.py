"""``aligner rm``: reward-model utilities.

- ``aligner rm score MODEL INPUT OUTPUT``: score every response of a jsonl file (any
  reward-bearing format of the data layer: regression rows, pairs, RewardBench rows) with
  an HF-format reward model; writes one jsonl row per input row with the head outputs
  (``scores``: attribute name -> value, ``reward``: the scalar), batched, any TP / PP
  (run under torchrun for more than one process).
- ``aligner rm expo WEAK STRONG OUTPUT --alpha A``: ExPO extrapolation
  ``θ = θ_w + α (θ_s − θ_w)`` between two HF-format checkpoints of the same architecture
  (weak: e.g. the regression model; strong: the BT model trained from it).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import List, Optional


def _load_rm(path: str, tp: int, pp: int):
    from aligner.models import ModelConfig, from_pretrained
    from aligner.parallel import ParallelConfig, initialize, is_initialized

    cfg = ModelConfig.from_hf(path)
    if not is_initialized():
        initialize(
            ParallelConfig(tp=tp, pp=pp),
            num_layers=cfg.num_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_query_groups=cfg.num_query_groups,
        )
    num_labels = json.loads((Path(path) / "config.json").read_text()).get("num_labels", 1)
    models, cfg = from_pretrained(path, head="reward", num_outputs=num_labels)
    return models, cfg, num_labels


def score_file(model_dir: str, input_path: str, *, tp: int = 1, pp: int = 1, micro_batch_size: int = 8,
               tokenizer: Optional[str] = None, attributes: Optional[List[str]] = None, reward_attribute=None):
    """Scores of every response in ``input_path``: list of dicts (row index, kind, scores)."""
    from aligner.algorithms.scoring import score_sequences
    from aligner.data import load_dataset, load_tokenizer

    models, cfg, n = _load_rm(model_dir, tp, pp)
    tok = load_tokenizer(tokenizer or model_dir)
    samples = load_dataset(input_path, kind="any_scored", tokenizer=tok)
    seqs, where = [], []
    for i, s in enumerate(samples):
        for key in ("tokens", "chosen", "rejected"):
            if key in s:
                where.append((i, key))
                seqs.append(s[key])
    scores = score_sequences(models, seqs, cfg.pad_token_id or 0, micro_batch_size)
    names = attributes or [f"output_{j}" for j in range(n)]
    ridx = names.index(reward_attribute) if reward_attribute in names else 0
    rows = [dict(index=i) for i in range(len(samples))]
    for (i, key), sc in zip(where, scores.tolist()):
        rows[i][key] = {"scores": dict(zip(names, sc)), "reward": sc[ridx]}
        if "subset" in samples[i]:
            rows[i]["subset"] = samples[i]["subset"]
    return rows


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

    merged = expo_extrapolate(state(weak), state(strong), alpha)
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


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="aligner rm", description="Reward-model utilities.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("score", help="score a jsonl file with an HF-format reward model")
    p.add_argument("model")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--tokenizer")
    p.add_argument("--attributes", nargs="*", help="names of the head outputs, in order")
    p.add_argument("--reward-attribute", default=None, help="output used as the scalar reward")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=8)
    e = sub.add_parser("expo", help="ExPO: weak + alpha (strong - weak)")
    e.add_argument("weak")
    e.add_argument("strong")
    e.add_argument("output")
    e.add_argument("--alpha", type=float, required=True)
    args = parser.parse_args(argv)
    if args.cmd == "expo":
        print(f"wrote {expo(args.weak, args.strong, args.output, args.alpha)}")
        return 0
    rows = score_file(args.model, args.input, tp=args.tp, pp=args.pp, micro_batch_size=args.micro_batch_size,
                      tokenizer=args.tokenizer, attributes=args.attributes, reward_attribute=args.reward_attribute)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(args.output, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"scored {len(rows)} rows -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
