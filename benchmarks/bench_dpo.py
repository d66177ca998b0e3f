"""DPO training throughput: aligner vs TRL's DPOTrainer on the same work, in one run.

Same tiny HF Llama (random weights, saved with save_pretrained), same preference pairs
(token ids; TRL sees them through a word-level tokenizer whose token ``tK`` is id K, so
both tokenise identically), same global batch, steps, learning rate, beta, fp32, same
number of CPU threads. Both precompute the reference log-probs; the timed region is the
whole ``train`` call of each (reference pass included). Tokens/s counts every prompt +
response token of both sides of every pair processed by the training steps.

    python benchmarks/bench_dpo.py [--pairs 128] [--steps 8] [--batch 16] [--threads 2] [--repeats 2]
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
    ds = Dataset.from_list([{"prompt": words(p), "chosen": " " + words(c), "rejected": " " + words(r)} for p, c, r in pairs])
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    out = tempfile.mkdtemp()
    cfg = DPOConfig(
        output_dir=out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, max_steps=args.steps,
        learning_rate=1e-4, beta=0.1, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        precompute_ref_log_probs=True, max_length=None, dataloader_num_workers=0, seed=0, bf16=False, fp16=False,
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
    models, cfg = from_pretrained(str(model_dir))
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp())
    make_model(work / "model", args.hidden, args.layers)
    make_tokenizer(work / "tok")
    pairs = make_pairs(args.pairs, args.prompt_len, args.resp_len)
    # the timed steps see steps x batch pairs; the reference pass sees every pair once
    tokens = args.steps * args.batch * 2 * (args.prompt_len + args.resp_len)
    # alternate the two and keep each one's fastest run: robust to other load on the machine
    trl_runs, al_runs = [], []
    for _ in range(args.repeats):
        trl_runs.append(run_trl(work / "model", work / "tok", pairs, args))
        al_runs.append(run_aligner(work / "model", pairs, args))
    t_trl, l_trl = min(trl_runs, key=lambda r: r[0])
    t_al, l_al = min(al_runs, key=lambda r: r[0])
    print("all runs (s): TRL", [round(r[0], 1) for r in trl_runs], "aligner", [round(r[0], 1) for r in al_runs])
    rows = [("TRL DPOTrainer", t_trl, tokens / t_trl, l_trl[:1]), ("aligner", t_al, tokens / t_al, l_al[:1])]
    print(f"DPO, tiny Llama hidden {args.hidden} x {args.layers} layers, {args.pairs} pairs, global batch {args.batch},"
          f" {args.steps} steps, {args.threads} threads, fp32")
    print(f"{'trainer':<16} {'seconds':>8} {'tokens/s':>10}  first loss")
    for name, t, tps, l0 in rows:
        print(f"{name:<16} {t:8.2f} {tps:10.0f}  {l0}")
    print(f"ratio aligner / TRL tokens/s: {t_trl / t_al:.2f}x")
    print(json.dumps({"trl_s": t_trl, "aligner_s": t_al, "ratio": t_trl / t_al}))


if __name__ == "__main__":
    main()
