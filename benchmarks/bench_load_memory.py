"""Peak resident memory per rank while loading an HF checkpoint at TP=1 and TP=2.

    python benchmarks/bench_load_memory.py [--hidden 1024 --layers 24 --vocab 32000]

Writes a random Llama checkpoint (~350M parameters by default, fp32 safetensors), then
loads it with ``aligner.models.from_pretrained`` in 1 and in 2 processes. Each rank
reports, above its memory just before the load:

- ``anon``: peak anonymous memory (``RssAnon``, sampled every 2 ms): the tensors the
  process materialised — its parameters plus whatever the loader held at once;
- ``total``: peak resident set (``VmHWM``), which also counts the pages of the
  memory-mapped safetensors files that reads touched.

Each rank reads only its own slices, so at TP=2 a rank should hold about half the
weights; the script exits non-zero if a TP=2 rank's peak anonymous growth reaches the
size of the whole checkpoint.
"""
import argparse
import os
import sys
import tempfile
import threading
import time

import torch

from aligner.parallel import ParallelConfig, initialize
from aligner.parallel.spawn import spawn_local


def _status_kib(*fields):
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name = line.split(":")[0]
            if name in fields:
                out[name] = int(line.split()[1])
    return out


class PeakSampler:
    """Highest RssAnon seen while running (a background thread polling /proc/self/status)."""

    def __init__(self, interval=0.002):
        self.interval, self.peak_anon, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak_anon = max(self.peak_anon, _status_kib("RssAnon")["RssAnon"])
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_anon = max(self.peak_anon, _status_kib("RssAnon")["RssAnon"])


def load(path, tp):
    initialize(ParallelConfig(tp=tp))
    from aligner.models import from_pretrained

    before = _status_kib("RssAnon", "VmRSS")
    # VmHWM only grows: reset it so "total" measures the load (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    with PeakSampler() as sampler:
        models, _ = from_pretrained(path)
    after = _status_kib("VmHWM", "RssAnon", "RssFile")
    local = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    return {
        "rank": int(os.environ["RANK"]),
        "params_mib": local / 2**20,
        "anon_added_mib": (sampler.peak_anon - before["RssAnon"]) / 1024,
        "total_added_mib": (after["VmHWM"] - before["VmRSS"]) / 1024,
        "file_mapped_after_mib": after["RssFile"] / 1024,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tempfile.mkdtemp()
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 128, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path)
    del model
    size_mib = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")) / 2**20
    print(f"checkpoint: {n_params / 1e6:.0f}M parameters, {size_mib:.0f} MiB of fp32 safetensors")
    worst_tp2 = 0.0
    for tp in (1, 2):
        for r in spawn_local(load, tp, path, tp, timeout=900):
            print(f"TP={tp} rank {r['rank']}: parameters {r['params_mib']:.0f} MiB;"
                  f" load added anon {r['anon_added_mib']:.0f} MiB, total RSS {r['total_added_mib']:.0f} MiB")
            if tp == 2:
                worst_tp2 = max(worst_tp2, r["anon_added_mib"])
    verdict = "below" if worst_tp2 < size_mib else "NOT below"
    print(f"TP=2: largest per-rank anonymous growth {worst_tp2:.0f} MiB is {verdict} the checkpoint's {size_mib:.0f} MiB")
    return 0 if worst_tp2 < size_mib else 1


if __name__ == "__main__":
    sys.exit(main())
