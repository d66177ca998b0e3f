"""Peak resident memory per rank while loading an HF checkpoint at TP=1 and TP=2.

    python benchmarks/bench_load_memory.py [--hidden 1024 --layers 24 --vocab 32000]

Writes a random Llama checkpoint (~300M parameters by default, fp32 safetensors), then
loads it with ``aligner.models.from_pretrained`` in 1 and in 2 processes, reporting each
rank's peak RSS (``ru_maxrss``) above its RSS before loading. Each rank reads only its
own slices, so at TP=2 a rank holds about half the weights.
"""
import argparse
import os
import resource
import tempfile

import torch

from aligner.parallel import ParallelConfig, initialize
from aligner.parallel.spawn import spawn_local


def _rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024


def load(path, tp):
    initialize(ParallelConfig(tp=tp))
    from aligner.models import from_pretrained

    before = _rss_mb()
    models, cfg = from_pretrained(path)
    local = sum(p.numel() for m in models for p in m.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rank": int(os.environ["RANK"]), "params_local": local, "rss_before_mb": before, "peak_mb": peak}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tempfile.mkdtemp()
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    LlamaForCausalLM(cfg).save_pretrained(path)
    size_mb = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")) / 2**20
    print(f"checkpoint: {n_params / 1e6:.0f}M parameters, {size_mb:.0f} MiB of safetensors")
    for tp in (1, 2):
        for r in spawn_local(load, tp, path, tp, timeout=900):
            print(f"TP={tp} rank {r['rank']}: {r['params_local'] / 1e6:.0f}M local parameters,"
                  f" RSS before load {r['rss_before_mb']:.0f} MiB, peak {r['peak_mb']:.0f} MiB,"
                  f" load added {r['peak_mb'] - r['rss_before_mb']:.0f} MiB")


if __name__ == "__main__":
    main()
