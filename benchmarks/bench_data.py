"""Data prepared once and mapped, against every rank reading and tokenising every row.

    python benchmarks/bench_data.py [--rows 1000000] [--raw-rows 200000] [--work DIR]

Synthesises ``--rows`` SFT conversations (OpenAI ``messages``; user turns of ~25 and
answers of ~65 words drawn from the embedded world's vocabulary, log-normal lengths: ~330
tokens a row with the world's tokenizer), prepares them once (``aligner data prepare``:
time, size of the folder), then runs SFT for one step at DP=2 (two local ranks, a tiny
model) and reports, per rank, the time from the rank's start to the end of its first step
and its resident memory then (``VmRSS`` of ``/proc/self/status``, and of it ``RssAnon``: what
the rank holds itself; the rest is mapped file pages, the page cache the ranks share):

- ``empty``: a prepared folder of one global batch of rows (the baseline);
- ``prepared``: the ``--rows`` prepared folder, mapped;
- ``raw``: the first ``--raw-rows`` rows as a jsonl file read and tokenised by every rank
  into memory, as training read data before (``read_samples``: a list of tensors per rank).

RSS growth is each run's RSS minus the empty run's. Prints a markdown table (the one in
docs/data_formats.md). Files stay in ``--work`` and are reused when run again.
"""
import argparse
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

from aligner.algorithms.trainers import SFTTrainer
from aligner.parallel.spawn import spawn_local
from aligner.training.algorithm import StepHook


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class FirstStep(StepHook):
    """Records the time since the rank started and the RSS when the first step has run."""

    name = "first_step"

    def __init__(self, started: float, record: dict):
        self.started, self.record = started, record

    def after_step(self, loop):
        if loop.step == 1:
            self.record.update(seconds=time.monotonic() - self.started, rss_mib=status_kib("VmRSS") / 1024,
                               anon_mib=status_kib("RssAnon") / 1024)
        return None


class BenchTrainer(SFTTrainer):
    """SFT with the first-step probe; ``in_memory`` reads the data as training did before
    (every rank reads and tokenises every row into a list of tensors)."""

    def __init__(self, cfg, started, record, in_memory=False):
        super().__init__(cfg)
        self.started, self.record, self.in_memory = started, record, in_memory

    def hooks(self, algo):
        return [FirstStep(self.started, self.record)]

    def load_data(self, path):
        if not self.in_memory or not path:
            return super().load_data(path)
        from aligner.data import read_samples

        d = self.cfg.data
        samples = read_samples(path, kind="sft", tokenizer=self.tokenizer(), template=d.template,
                               max_length=d.max_length)
        return [dict(s, index=i) for i, s in enumerate(samples)]


def rank(cfg, in_memory):
    started = time.monotonic()
    record = {"rank": int(os.environ["RANK"]), "rss_start_mib": status_kib("VmRSS") / 1024}
    BenchTrainer(cfg, started, record, in_memory).fit()
    return record


def config(train, tokenizer, out_dir, vocab_size):
    return {
        "model": {"vocab_size": vocab_size, "hidden_size": 64, "ffn_hidden_size": 128, "num_layers": 2,
                  "num_attention_heads": 4, "max_position_embeddings": 2048},
        "data": {"train": str(train), "tokenizer": str(tokenizer), "template": "extra_id", "max_length": 2048},
        "trainer": {"max_steps": 1, "global_batch_size": 8, "micro_batch_size": 4, "out_dir": str(out_dir),
                    "export_hf": False, "progress": False, "tensorboard": False, "save_interval": 0,
                    "resume": False},
    }


def synthesise(path: Path, rows: int, words, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            user = " ".join(rng.choice(words) for _ in range(max(1, int(rng.lognormvariate(3.2, 0.5)))))
            answer = " ".join(rng.choice(words) for _ in range(max(1, int(rng.lognormvariate(4.0, 0.6)))))
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": answer}]}) + "\n")


def head(src: Path, dst: Path, rows: int):
    with open(src) as f, open(dst, "w") as g:
        for _, line in zip(range(rows), f):
            g.write(line)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--raw-rows", type=int, default=200_000)
    ap.add_argument("--work", default="/tmp/bench_data")
    args = ap.parse_args()
    from aligner.data import load_tokenizer
    from aligner.data.prepare import prepare_dataset
    from aligner.data.world import synthesize

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    world = synthesize(work / "world")
    tokenizer_path = world["tokenizer"]
    tok = load_tokenizer(tokenizer_path)
    vocab = int(math.ceil(tok.vocab_size / 128) * 128)
    words = sorted(set(re.findall(r"[A-Za-z]+", Path(world["sft_train"]).read_text())))
    rows = work / f"sft_{args.rows}.jsonl"
    if not rows.exists():
        t = time.monotonic()
        synthesise(rows, args.rows, words)
        print(f"synthesised {args.rows} rows ({rows.stat().st_size / 2**20:.0f} MiB) in {time.monotonic() - t:.0f} s")
    table = []
    prepared = work / f"sft_{args.rows}.prepared"
    if not prepared.exists():
        t = time.monotonic()
        manifest = prepare_dataset([rows], prepared, "sft", tok, template="extra_id", max_length=2048)
        seconds = time.monotonic() - t
        (work / "prepare_seconds").write_text(f"{seconds}")
        lengths = manifest["fields"]["tokens"]
        print(f"prepared in {seconds:.0f} s: {folder_bytes(prepared) / 2**20:.0f} MiB, {manifest['samples']} samples,"
              f" {lengths['bin_bytes'] / 2 / manifest['samples']:.0f} tokens per sample")
    prepare_s = float((work / "prepare_seconds").read_text())
    empty_rows = work / "sft_8.jsonl"
    head(rows, empty_rows, 8)
    empty = work / "sft_8.prepared"
    if not empty.exists():
        prepare_dataset([empty_rows], empty, "sft", tok, template="extra_id", max_length=2048, progress=False)
    raw = work / f"sft_{args.raw_rows}.jsonl"
    if not raw.exists():
        head(rows, raw, args.raw_rows)
    results = {}
    for name, train, in_memory in (("empty", empty, False), ("prepared", prepared, False), ("raw", raw, True)):
        cfg = config(train, tokenizer_path, work / f"run_{name}", vocab)
        results[name] = spawn_local(rank, 2, cfg, in_memory, timeout=3600)
        print(name, json.dumps(results[name]), flush=True)
    base = {r["rank"]: r for r in results["empty"]}
    print("\n| data | rows | prepare once | files | time to first step (rank 0 / 1) | RSS per rank | RSS growth"
          " over empty (rank 0 / 1) | of it anonymous |")
    print("|---|---|---|---|---|---|---|---|")
    for name, n, prep, size in (("prepared, mapped", args.rows, f"{prepare_s:.0f} s", folder_bytes(prepared)),
                                ("raw jsonl, read by every rank", args.raw_rows, "-", raw.stat().st_size)):
        res = results["prepared" if name.startswith("prepared") else "raw"]
        t = " / ".join(f"{r['seconds']:.1f} s" for r in res)
        rss = " / ".join(f"{r['rss_mib']:.0f} MiB" for r in res)
        growth = " / ".join(f"{r['rss_mib'] - base[r['rank']]['rss_mib']:.0f} MiB" for r in res)
        anon = " / ".join(f"{r['anon_mib'] - base[r['rank']]['anon_mib']:.0f} MiB" for r in res)
        table.append(f"| {name} | {n:,} | {prep} | {size / 2**20:.0f} MiB | {t} | {rss} | {growth} | {anon} |")
    t = " / ".join(f"{r['seconds']:.1f} s" for r in results["empty"])
    rss = " / ".join(f"{r['rss_mib']:.0f} MiB" for r in results["empty"])
    table.append(f"| empty (one global batch) | 8 | - | - | {t} | {rss} | 0 | 0 |")
    print("\n".join(table))
    growth = max(r["rss_mib"] - base[r["rank"]]["rss_mib"] for r in results["prepared"])
    first = max(r["seconds"] for r in results["prepared"])
    return 0 if growth < 100 and first < 10 else 1


if __name__ == "__main__":
    sys.exit(main())
