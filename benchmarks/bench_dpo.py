"""DPO training throughput: aligner vs TRL's DPOTrainer on the same work, in one run.

Same tiny HF Llama (random weights, saved with save_pretrained), same preference pairs
(token ids; TRL sees them through a word-level tokenizer whose token ``tK`` is id K, so
both tokenise identically), same global batch, steps, learning rate, beta, fp32, same
number of CPU threads. Both precompute the reference log-probs; the timed region is the
whole ``train`` call of each (reference pass included). Tokens/s counts every prompt +
response token of both sides of every pair processed by the training steps. Model FLOPs
(``benchmarks/flops.py``): 3 x forward over those tokens for the policy plus 1 x forward
for the reference pass over every pair, reported as a rate against the fp32 matmul peak
measured in the same run (before and after the timed runs, the better one).

    python benchmarks/bench_dpo.py [--pairs 128] [--steps 8] [--batch 16] [--threads 2] [--repeats 2]
    python benchmarks/bench_dpo.py --device cuda --bf16 --hidden 1024 --layers 8 ...   (GPU suite)

On a GPU (``--device cuda``) the peak is the bf16 (``--bf16``) or fp32 matmul rate on the
device; ``--bf16``: aligner trains bf16 parameters with fp32 main parameters, TRL uses
transformers' bf16 mixed precision. ``--json PATH`` also writes the result there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops import forward_flops, matmul_peak  # noqa: E402

VOCAB = 1024


def make_model(path: Path, hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 8 * 8,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                      max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return cfg


def make_tokenizer(path: Path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(WordLevel(vocab, unk_token="t3"))
    tok.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3")
    fast.save_pretrained(path)
    return fast


def make_pairs(n: int, prompt_len: int, resp_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        p = torch.randint(4, VOCAB, (prompt_len,), generator=g)
        c = torch.randint(4, VOCAB, (resp_len,), generator=g)
        r = torch.randint(4, VOCAB, (resp_len,), generator=g)
        pairs.append((p, c, r))
    return pairs


def run_trl(model_dir, tok_dir, pairs, args):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    words = lambda t: " ".join(f"t{int(i)}" for i in t)  # noqa: E731
    import pyarrow as pa

    rows = [{"prompt": words(p), "chosen": " " + words(c), "rejected": " " + words(r)} for p, c, r in pairs]
    # an explicit fingerprint: datasets' own hashing of the table pickles pyarrow types,
    # which fails with some dill / pyarrow combinations (and costs time we do not measure)
    ds = Dataset(pa.Table.from_pylist(rows), fingerprint=f"bench-dpo-{len(rows)}")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    if args.device != "cpu":
        model = model.to(args.device)
    out = tempfile.mkdtemp()
    cfg = DPOConfig(
        output_dir=out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, max_steps=args.steps,
        learning_rate=1e-4, beta=0.1, logging_steps=1, save_strategy="no", report_to=[], use_cpu=args.device == "cpu",
        precompute_ref_log_probs=True, max_length=None, dataloader_num_workers=0, seed=0, bf16=args.bf16, fp16=False,
    )
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    t0 = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return elapsed, losses


def run_aligner(model_dir, pairs, args):
    from aligner.algorithms.dpo import DPOAlgorithm
    from aligner.models import from_pretrained
    from aligner.parallel import ParallelConfig, initialize, is_initialized
    from aligner.training.config import OptimSection, TrainerSection
    from aligner.training.loop import TrainingLoop

    if not is_initialized():
        initialize(ParallelConfig(seed=0))
    models, cfg = from_pretrained(str(model_dir), params_dtype=torch.bfloat16 if args.bf16 else torch.float32)
    samples = []
    for i, (p, c, r) in enumerate(pairs):
        zeros = torch.zeros(len(p))
        samples.append({
            "chosen": torch.cat([p, c]), "chosen_loss_mask": torch.cat([zeros, torch.ones(len(c))]),
            "rejected": torch.cat([p, r]), "rejected_loss_mask": torch.cat([zeros, torch.ones(len(r))]),
            "index": i,
        })
    trainer = TrainingLoop(
        DPOAlgorithm(pad_id=0, beta=0.1, packing=args.packing, capacity=2 * (len(pairs[0][0]) + len(pairs[0][1]))),
        models, samples,
        optim=OptimSection(lr=1e-4, clip_grad=1.0),
        trainer=TrainerSection(max_steps=args.steps, global_batch_size=args.batch, micro_batch_size=args.batch,
                               out_dir=tempfile.mkdtemp(), export_hf=False, progress=False, tensorboard=False,
                               resume=False, save_interval=0),
    )
    trainer.save = lambda: None
    t0 = time.perf_counter()
    trainer.algorithm.setup(trainer)
    trainer.algorithm.setup = lambda t: None
    losses = []
    while trainer.step < trainer.max_steps:
        losses.append(trainer.train_step()["loss"])
    elapsed = time.perf_counter() - t0
    return elapsed, losses


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--resp-len", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--packing", action="store_true")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the fastest counts")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--json", help="also write the result JSON to this path")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp())
    hf_cfg = make_model(work / "model", args.hidden, args.layers)
    make_tokenizer(work / "tok")
    pairs = make_pairs(args.pairs, args.prompt_len, args.resp_len)
    # the timed steps see steps x batch pairs; the reference pass sees every pair once
    tokens = args.steps * args.batch * 2 * (args.prompt_len + args.resp_len)
    seq = args.prompt_len + args.resp_len
    flops = 3 * forward_flops(hf_cfg, [seq] * (args.steps * args.batch * 2)) + forward_flops(hf_cfg, [seq] * (2 * args.pairs))
    peak_of = lambda: matmul_peak(args.threads, n=1024 if args.device == "cpu" else 8192, device=args.device,  # noqa: E731
                                  dtype=torch.bfloat16 if args.bf16 and args.device != "cpu" else torch.float32)
    peak = peak_of()
    # alternate the two and keep each one's fastest run: robust to other load on the machine
    trl_runs, al_runs = [], []
    for _ in range(args.repeats):
        trl_runs.append(run_trl(work / "model", work / "tok", pairs, args))
        al_runs.append(run_aligner(work / "model", pairs, args))
    t_trl, l_trl = min(trl_runs, key=lambda r: r[0])
    t_al, l_al = min(al_runs, key=lambda r: r[0])
    print("all runs (s): TRL", [round(r[0], 1) for r in trl_runs], "aligner", [round(r[0], 1) for r in al_runs])
    rows = [("TRL DPOTrainer", t_trl, tokens / t_trl, l_trl[:1]), ("aligner", t_al, tokens / t_al, l_al[:1])]
    print(f"DPO, Llama hidden {args.hidden} x {args.layers} layers, {args.pairs} pairs, global batch {args.batch},"
          f" {args.steps} steps, {args.device} ({args.threads} threads), {'bf16' if args.bf16 else 'fp32'}")
    print(f"{'trainer':<16} {'seconds':>8} {'tokens/s':>10}  first loss")
    for name, t, tps, l0 in rows:
        print(f"{name:<16} {t:8.2f} {tps:10.0f}  {l0}")
    print(f"ratio aligner / TRL tokens/s: {t_trl / t_al:.2f}x")
    peak = max(peak, peak_of())
    print(f"model FLOPs per run: {flops / 1e9:.1f} GFLOP (policy 3 x forward, reference 1 x forward);"
          f" measured matmul peak (fastest of 20): {peak / 1e9:.1f} GFLOP/s")
    for name, t in (("aligner", t_al), ("TRL", t_trl)):
        print(f"{name}: {flops / t / 1e9:.1f} GFLOP/s = {100 * flops / t / peak:.0f}% of peak")
    result = {"trl_s": t_trl, "aligner_s": t_al, "ratio": t_trl / t_al, "model_flops": flops, "peak_flops": peak,
              "aligner_flops_per_s": flops / t_al, "trl_flops_per_s": flops / t_trl, "device": args.device,
              "bf16": args.bf16, "hidden": args.hidden, "layers": args.layers}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
