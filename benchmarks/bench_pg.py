"""aligner's GRPO against TRL's ``GRPOTrainer`` on the same work, in one run (docs/benchmarks_pg.md).

    OMP_NUM_THREADS=1 python benchmarks/bench_pg.py [--repeats 3] [--steps 3] [--prompts 16] [--samples 4]
                                                    [--max-new-tokens 64] [--out FILE]

Both sides train the same tiny Llama (random weights, ``save_pretrained``) in fp32 on one
thread, from the same prompts (``data.template = raw``: the plain prompt text, TRL's
standard format), with the same G, max new tokens, temperature 1 (no top-k / top-p), reward
function, KL coefficient (k3 as a loss term, so both run the reference pass), advantages
(group-normalised), clipped loss (ε = 0.2) averaged over the batch's tokens, AdamW at a
constant learning rate with gradient clipping 1.0, micro-batches of ``--prompts`` rows and
one optimizer step per batch of prompts x G responses. Generation: aligner's rollout
engine; TRL: ``transformers.generate`` (no vLLM), the whole batch at once on both sides.

Two models, the same weights but for the end-of-sequence logit:

- ``stops``: the EOS logit is biased so a response stops after ~24 tokens on average
  (lengths vary from 1 to the limit);
- ``never``: the EOS logit is pushed down by ~20 nats: every response runs to the limit.

The bias rides on one hidden dimension held constant through the network (embedding column
= c, the rows of every layer's output projections that write to it = 0), which the final
norm turns into a near-constant feature; only the EOS row of the output layer reads it.

Each side runs in a fresh process for ``--steps`` + 1 steps (the first is a warm-up, not
counted); repeats alternate the sides so all see the same machine load. Reported per side
(median over repeats of the mean over counted steps): samples/s and generated tokens/s by
the wall clock, the same per CPU-second of the side's process (``time.process_time``: on a
machine shared with other work the wall clock mostly measures the scheduler's share), the
step's split (generation, scoring, log-prob passes, updates; wall shares and CPU seconds)
and the model FLOP rate (benchmarks/flops.py: generation + reference forward + training
forward/backward at the responses' mean prompt and response length) against the fp32
matmul peak measured in the same run on one thread, by the wall clock and per CPU-second.
``aligner-unpacked`` (``--sides``) is aligner with ``pg.packed = false``: the update passes
on padded rows; ``aligner-pass`` is aligner with ``pg.old_logps_pass = always``: the
forward pass for the old log-probs runs before the update although the update's own
forward gives them.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 128, 4, 4, 2, 352, 256
WORDS = 500
EOS_BIAS = {"stops": 0.28, "never": -2.0}  # x ~11.3 (the constant feature after the final norm): nats
KL_COEF, LR, CLIP = 0.04, 1e-5, 0.2


# ------------------------------------------------------------------------------ the task
def score(response: str) -> float:
    """The reward: distinct words over words + 1 (a function of the text alone)."""
    words = response.split()
    return len(set(words)) / (len(words) + 1.0)


def aligner_reward(prompts, responses, metadata):
    return [score(r) for r in responses]


def trl_reward(prompts, completions, **kwargs):
    return [score(c) for c in completions]


def make_assets(work: Path, prompts: int) -> dict:
    """A word-level tokenizer, ``prompts`` x 4 prompt rows and the two models (HF folders)."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(WORDS)]
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", *words])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=CONTEXT,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    out = {}
    for name, bias in EOS_BIAS.items():
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        d = HIDDEN - 1  # the constant feature
        with torch.no_grad():
            model.model.embed_tokens.weight[:, d] = 1.0
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight[d] = 0.0
                layer.mlp.down_proj.weight[d] = 0.0
            model.lm_head.weight[:, d] = 0.0
            model.lm_head.weight[3] = 0.0
            model.lm_head.weight[3, d] = bias
        folder = work / name
        model.save_pretrained(folder)
        fast.save_pretrained(folder)
        out[name] = str(folder)
    rng = random.Random(0)
    path = work / "prompts.jsonl"
    with open(path, "w") as f:
        for _ in range(prompts * 4):
            f.write(json.dumps({"prompt": " ".join(rng.choice(words) for _ in range(rng.randint(8, 32)))}) + "\n")
    out["prompts"] = str(path)
    return out


# ------------------------------------------------------------------------------ aligner
def aligner_run(model: str, prompts: str, out_dir: str, steps: int, P: int, G: int, max_new: int, extra: dict):
    """One aligner GRPO run (a spawned rank); per-step metrics."""
    import torch

    torch.set_num_threads(1)
    from aligner.algorithms.online import ExperienceMaker
    from aligner.algorithms.pg import PGAlgorithm, PGTrainer
    from aligner.parallel import ParallelConfig, initialize

    initialize(ParallelConfig(seed=0))
    cpu = []
    step = PGAlgorithm.train_step

    def timed_step(self, context):  # the process's CPU seconds of each step
        t0 = time.process_time()
        try:
            return step(self, context)
        finally:
            cpu.append(time.process_time() - t0)

    PGAlgorithm.train_step = timed_step
    phases = {"update": [], "score_passes": [], "generate": []}
    for name, owner in (("update", PGAlgorithm), ("score_passes", ExperienceMaker), ("generate", ExperienceMaker)):
        def cpu_timed(fn, name=name):
            def wrapper(*a, **k):
                t0 = time.process_time()
                try:
                    return fn(*a, **k)
                finally:
                    phases[name].append(time.process_time() - t0)
            return wrapper
        setattr(owner, name, cpu_timed(getattr(owner, name)))
    cfg = {
        "algorithm": "pg",
        "init": {"hf": model},
        "data": {"train": prompts, "tokenizer": model, "template": "raw", "max_length": CONTEXT},
        "optim": {"lr": LR, "clip_grad": 1.0, "weight_decay": 0.0},
        "trainer": {"max_steps": steps, "global_batch_size": P, "micro_batch_size": P, "out_dir": out_dir,
                    "progress": False, "tensorboard": False, "save_interval": 0, "export_hf": False,
                    "resume": False, "seed": 0},
        "pg": {"reward": {"kind": "function", "function": "bench_pg:aligner_reward"},
               "advantage": "grpo", "loss": "clipped", "aggregation": "token_mean", "clip_eps": CLIP,
               "kl_coef": KL_COEF, "kl_mode": "loss", "kl_estimator": "k3", "samples_per_prompt": G,
               "generation": {"max_new_tokens": max_new, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                              "max_batch": P * G}, **extra},
    }
    PGTrainer(cfg).fit()
    metrics = [json.loads(line) for line in Path(out_dir, "metrics.jsonl").read_text().splitlines()]
    return [dict(m, cpu_s=c, cpu_updates=u, cpu_logprob_passes=lp, cpu_generation=g)
            for m, c, u, lp, g in zip(metrics, cpu, phases["update"], phases["score_passes"], phases["generate"])]


def aligner_steps(metrics: list) -> list:
    out = []
    for m in metrics[1:]:
        t = m["step_time"]
        gen = m["time/generation"]
        out.append({"step_s": t, "cpu_s": m["cpu_s"], "cpu_updates": m["cpu_updates"],
                    "cpu_logprob_passes": m["cpu_logprob_passes"], "cpu_generation": m["cpu_generation"],
                    "samples": m["samples"], "response_length": m["response_length/mean"],
                    "eos_rate": m["eos_rate"], "update_positions": m["update_positions"], "generation": gen, "scoring": m["time/scoring"],
                    "logprob_passes": m["time/logprob_passes"], "updates": m["time/updates"],
                    "other": t - gen - m["time/scoring"] - m["time/logprob_passes"] - m["time/updates"]})
    return out


# ------------------------------------------------------------------------------ TRL
def trl_run(model: str, prompts: str, out_dir: str, steps: int, P: int, G: int, max_new: int, result_file: str):
    """One TRL GRPOTrainer run (a fresh process); per-step timings from a callback and
    wrappers around its generation, reward and log-prob methods."""
    import torch

    torch.set_num_threads(1)
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(line) for line in Path(prompts).read_text().splitlines()]
    args = GRPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, report_to=[], save_strategy="no",
        logging_steps=1, max_steps=steps, per_device_train_batch_size=P, gradient_accumulation_steps=G,
        num_generations=G, max_completion_length=max_new, temperature=1.0, top_k=0, top_p=1.0, beta=KL_COEF,
        epsilon=CLIP, loss_type="dapo", scale_rewards="group", learning_rate=LR, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=1.0, shuffle_dataset=False, seed=0, dataloader_num_workers=0,
        model_init_kwargs={"dtype": torch.float32}, disable_tqdm=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(model)
    trainer = GRPOTrainer(model=model, reward_funcs=[trl_reward], args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    timers = {"generation": 0.0, "scoring": 0.0, "logprob_passes": 0.0, "forward_backward_logps": 0.0}
    timers.update({f"cpu_{k}": 0.0 for k in list(timers)})

    def timed(name, fn, grad_split=False):
        def wrapper(*a, **k):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                key = name if not (grad_split and torch.is_grad_enabled()) else "forward_backward_logps"
                timers[key] += time.perf_counter() - t0
                timers[f"cpu_{key}"] += time.process_time() - c0
        return wrapper

    trainer._generate_single_turn = timed("generation", trainer._generate_single_turn)
    trainer._calculate_rewards = timed("scoring", trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = timed("logprob_passes", trainer._get_per_token_logps_and_entropies,
                                                       grad_split=True)
    steps_out = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            for key in timers:
                timers[key] = 0.0
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            steps_out.append({"step_s": time.perf_counter() - self.t0, "cpu_s": time.process_time() - self.c0,
                              **timers})

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "completions/mean_length" in logs and steps_out:
                steps_out[-1]["response_length"] = logs["completions/mean_length"]
                steps_out[-1]["eos_rate"] = 1.0 - logs.get("completions/clipped_ratio", float("nan"))

    trainer.add_callback(Clock())
    trainer.train()
    out = []
    for s in steps_out[1:]:
        gen, sc, lp = s["generation"], s["scoring"], s["logprob_passes"]
        out.append({"step_s": s["step_s"], "cpu_s": s["cpu_s"],
                    "cpu_generation": s["cpu_generation"] + s["cpu_scoring"],
                    "cpu_logprob_passes": s["cpu_logprob_passes"],
                    "cpu_updates": s["cpu_s"] - s["cpu_generation"] - s["cpu_scoring"] - s["cpu_logprob_passes"],
                    "samples": float(P * G), "response_length": s.get("response_length"),
                    "eos_rate": s.get("eos_rate"), "generation": gen, "scoring": sc, "logprob_passes": lp,
                    "updates": s["step_s"] - gen - sc - lp, "other": 0.0})
    Path(result_file).write_text(json.dumps(out))


# ------------------------------------------------------------------------------ the run
def summarise(steps: list, flops_per_sample, peak: float, cpu_peak: float) -> dict:
    mean = lambda k: statistics.mean(s[k] for s in steps)  # noqa: E731
    t = mean("step_s")
    n = mean("samples")
    length = mean("response_length")
    cpu = mean("cpu_s")
    out = {"step_s": t, "samples_per_s": n / t, "generated_tokens_per_s": n * length / t,
           "cpu_step_s": cpu, "samples_per_cpu_s": n / cpu, "generated_tokens_per_cpu_s": n * length / cpu,
           "response_length": length, "eos_rate": mean("eos_rate")}
    for k in ("generation", "scoring", "logprob_passes", "updates"):
        out[f"{k}_s"] = mean(k)
        out[f"{k}_share"] = mean(k) / t
    for k in ("cpu_generation", "cpu_logprob_passes", "cpu_updates", "update_positions"):
        if k in steps[0]:
            out[k] = mean(k)
    out["model_tflops"] = n * flops_per_sample(length) / t / 1e12
    out["mfu"] = out["model_tflops"] * 1e12 / peak
    out["model_tflops_per_cpu_s"] = n * flops_per_sample(length) / cpu / 1e12
    out["mfu_cpu"] = out["model_tflops_per_cpu_s"] * 1e12 / cpu_peak
    return out


def model_flops_fn(model_dir: str, prompt_len: float):
    """Model FLOPs of one sample's step work: generation, the reference forward, training
    forward + backward (benchmarks/flops.py), at the mean prompt and response length."""
    from transformers import AutoConfig

    from flops import forward_flops, generation_flops, training_flops

    cfg = AutoConfig.from_pretrained(model_dir)

    def per_sample(response_len: float) -> float:
        p, r = round(prompt_len), max(1, round(response_len))
        return (generation_flops(cfg, 1, p, r) + forward_flops(cfg, [p + r]) + training_flops(cfg, [p + r]))

    return per_sample


def median_dict(runs: list) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="counted steps per run (one more warms up)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4, help="G")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--models", default="stops,never")
    parser.add_argument("--sides", default="aligner,trl",
                        help="aligner, trl, aligner-unpacked (packed=false: the update passes on padded rows),"
                             " aligner-pass (old_logps_pass=always: the old-log-prob pass runs)")
    parser.add_argument("--aligner-pg", default="{}", help="JSON: extra pg options for the aligner side")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(Path(__file__).parent))

    import torch

    from flops import matmul_peak

    torch.set_num_threads(1)
    from aligner.parallel.spawn import spawn_local

    work = Path(tempfile.mkdtemp(prefix="bench_pg_"))
    assets = make_assets(work, args.prompts)
    rows = [json.loads(line) for line in Path(assets["prompts"]).read_text().splitlines()]
    P, G, T = args.prompts, args.samples, args.max_new_tokens
    extra = json.loads(args.aligner_pg)
    report = {"settings": vars(args), "load_before": os.getloadavg(), "threads": 1}
    peaks = [matmul_peak(threads=1)]
    cpu_peaks = [matmul_peak(threads=1, clock=time.process_time)]
    sides = args.sides.split(",")
    for name in args.models.split(","):
        model = assets[name]
        runs = {side: [] for side in sides}
        # every run reads prompts 0..P·(steps+1) in order; their mean length over the counted steps
        counted = rows[P:P * (args.steps + 1)] if len(rows) >= P * (args.steps + 1) else rows
        prompt_len = statistics.mean(len(r["prompt"].split()) for r in counted)
        for rep in range(args.repeats):
            for side in (sides if rep % 2 == 0 else sides[::-1]):
                out = work / f"{name}_{side}_{rep}"
                if side.startswith("aligner"):
                    options = dict(extra, packed=side != "aligner-unpacked")
                    if side == "aligner-pass":
                        options["old_logps_pass"] = "always"
                    metrics = spawn_local(aligner_run, 1, model, assets["prompts"], str(out), args.steps + 1, P, G, T,
                                          options, timeout=3600, threads_per_rank=1)[0]
                    runs[side].append(aligner_steps(metrics))
                else:
                    result = out / "steps.json"
                    out.mkdir(parents=True)
                    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
                    code = ("import sys; sys.path.insert(0, %r); import bench_pg; bench_pg.trl_run(*sys.argv[1:4],"
                            " *map(int, sys.argv[4:8]), sys.argv[8])" % str(Path(__file__).parent))
                    subprocess.run([sys.executable, "-c", code, model, assets["prompts"], str(out),
                                    str(args.steps + 1), str(P), str(G), str(T), str(result)], check=True, env=env,
                                   stdout=subprocess.DEVNULL)
                    runs[side].append(json.loads(result.read_text()))
            peaks.append(matmul_peak(threads=1))
            cpu_peaks.append(matmul_peak(threads=1, clock=time.process_time))
        peak = max(peaks)
        per_sample = model_flops_fn(model, prompt_len)
        entry = {side: median_dict([summarise(r, per_sample, peak, max(cpu_peaks)) for r in runs[side]])
                 for side in sides}
        if "aligner" in sides and "trl" in sides:
            entry["speedup_samples_per_s"] = entry["aligner"]["samples_per_s"] / entry["trl"]["samples_per_s"]
            entry["speedup_samples_per_cpu_s"] = (entry["aligner"]["samples_per_cpu_s"]
                                                  / entry["trl"]["samples_per_cpu_s"])
        entry["prompt_length"] = prompt_len
        entry["runs"] = runs
        report[name] = entry
    report["matmul_peak_tflops"] = max(peaks) / 1e12
    report["matmul_peak_tflops_per_cpu_s"] = max(cpu_peaks) / 1e12
    report["load_after"] = os.getloadavg()
    print(json.dumps({k: v for k, v in report.items()}, indent=1, default=str))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
