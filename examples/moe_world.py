"""A small mixture-of-experts policy on the embedded world: SFT from scratch, then GRPO with
routing replay, judged by the world's ground truth (docs/moe.md).

    python examples/moe_world.py --out runs/moe_world

Stages (each skipped when its run folder already holds an export):

- ``sft``: ``aligner train sft`` of a tiny Qwen3-MoE (4 layers, hidden 128, 4 experts of
  width 128, top 2 renormalised) from scratch on the world's conversations, with the
  load-balancing loss (``moe.aux_loss_coeff``);
- ``grpo``: ``aligner train grpo`` from that model with the exact-answer reward, the
  load-balancing loss and ``moe.routing_replay=true``.

Then both answer the world's held-out prompts greedily and the world's scorer rates them.
``results.json`` holds the exact-answer rates, each stage's first and last router metrics
(``moe/...``), GRPO's rewards and its largest ``logprob_mismatch``, and wall times.

``--kill-check`` runs the GRPO stage (``--grpo-steps`` steps, a checkpoint every
``--save-interval``) from the SFT model as command-line runs (``aligner train grpo``, one
process per rank) instead, four times: uninterrupted at EP=1; at EP=1 killed with SIGKILL
(every rank) a few seconds after its checkpoint of step ``--save-interval`` is complete,
then the same command again (a resume); from that killed run's checkpoint resumed at EP=2
(two processes, the experts split over them); and uninterrupted at EP=2. It prints, per
step, the largest absolute difference over every logged metric (timings aside) of each
run against the uninterrupted EP=1 run, and writes them to ``kill_check.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

MOE_MODEL = ["model.arch=qwen3_moe", "model.hidden_size=128", "model.num_layers=4", "model.num_attention_heads=4",
             "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.num_experts=4", "model.moe_router_topk=2",
             "model.moe_norm_topk_prob=true"]


def train(config, overrides):
    from aligner.cli.train import compose

    trainer_cls, cfg = compose(config, overrides)
    return trainer_cls(cfg).fit()


def rows(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("split") == "train"]


def router(row):
    return {k: v for k, v in row.items() if k.startswith("moe/")}


def exact_rate(model_dir: Path, prompts, tokenizer) -> float:
    from aligner.data.world import score_response
    from aligner.models import from_pretrained
    from aligner.rollout.engine import GenerationConfig, RolloutEngine

    models, cfg = from_pretrained(str(model_dir))
    engine = RolloutEngine(models, cfg, tokenizer=tokenizer, max_batch=64)
    result = engine.generate([p["prompt_tokens"].tolist() for p in prompts],
                             GenerationConfig(max_new_tokens=48, greedy=True, stop_token_ids=[tokenizer.eos_id]))
    texts = [tokenizer.decode(result.response_tokens(i)) for i in range(len(prompts))]
    return sum(float(score_response(p["meta"], t)["exact"]) for p, t in zip(prompts, texts)) / len(prompts)


def grpo_overrides(common, sft: Path, prompts, run: Path, steps: int, save_interval: int, ep: int):
    """The GRPO stage's overrides (the same as the example's stage) for run folder ``run``."""
    return common + [f"init.hf={sft}", f"data.train={prompts}", f"trainer.out_dir={run}",
                     f"trainer.max_steps={steps}", "trainer.global_batch_size=16", "trainer.micro_batch_size=16",
                     f"trainer.save_interval={save_interval}", "pg.reward.kind=exact_answer", "pg.samples_per_prompt=4",
                     "optim.lr=1e-4", "pg.generation.max_new_tokens=48", "moe.routing_replay=true",
                     f"parallel.ep={ep}"]


def launch(overrides, world: int, log: Path):
    """``aligner train grpo OVERRIDES`` on ``world`` local ranks (the variables torchrun
    sets), each its own process group; their output appended to ``log``."""
    from aligner.parallel.spawn import start_python
    from aligner.parallel.state import free_port

    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(start_python(["-W", "ignore", "-m", "aligner.cli.main", "train", "grpo", *overrides],
                                  env=env, stdout=log, stderr=log))
    return procs


def finish(procs, log: Path, timeout: float = 3600) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.wait(max(1.0, deadline - time.monotonic()))
    codes = [p.returncode for p in procs]
    if any(codes):
        raise SystemExit(f"a GRPO run failed (exit codes {codes}); see {log}")


def kill_after_checkpoint(procs, run: Path, step: int, settle: float, timeout: float = 3600) -> int:
    """SIGKILL every rank of ``procs`` ``settle`` seconds after the run's checkpoint of
    step >= ``step`` is marked latest; the latest checkpoint's step."""
    latest = run / "checkpoints" / "latest"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if latest.exists() and json.loads(latest.read_text())["step"] >= step:
            break
        time.sleep(0.05)
    time.sleep(settle)
    for p in procs:
        p.kill()  # SIGKILL to the rank's process group
    for p in procs:
        p.wait(30)
    if (run / "result.json").exists() or not latest.exists():
        raise SystemExit(f"{run}: the run was not killed between its checkpoint of step {step} and its end;"
                         " use more --grpo-steps or a smaller --kill-settle")
    return json.loads(latest.read_text())["step"]


# metrics that depend on the layout by definition: token positions of the update micro-batches,
# padding included (each data-parallel rank pads its rows to its own longest)
LAYOUT_METRICS = ("update_positions",)


def metric_diffs(reference, other, skip=()):
    """Per step of ``reference``: the largest |difference| over every metric both runs
    logged (timings, clocks and ``skip`` aside), with its metric's name (None: all equal);
    steps ``other`` lacks are left out."""
    skip = ("step_time", "timestamp", "wall_time") + tuple(skip)
    theirs = {r["step"]: r for r in other}
    out = {}
    for r in reference:
        o = theirs.get(r["step"])
        if o is None:
            continue
        keys = [k for k in r if k not in skip and k != "step" and not k.startswith("time/")
                and isinstance(r[k], (int, float)) and k in o]
        worst = max(keys, key=lambda k: abs(float(r[k]) - float(o[k])))
        diff = abs(float(r[worst]) - float(o[worst]))
        out[r["step"]] = {"max_abs_diff": diff, "metric": worst if diff else None, "metrics_compared": len(keys)}
    return out


def kill_check(args, out: Path, common, sft: Path, prompts) -> dict:
    """The GRPO stage uninterrupted, killed and resumed, resumed at EP=2, and at EP=2 (module docstring)."""
    runs = out / "kill_check"
    if runs.exists():
        shutil.rmtree(runs)
    runs.mkdir(parents=True)
    log = runs / "runs.log"
    steps, save = args.grpo_steps, args.save_interval

    def overrides(name, ep):
        return grpo_overrides(common, sft, prompts, runs / name, steps, save, ep) + ["trainer.export_hf=false"]

    seconds = {}
    t0 = time.perf_counter()
    finish(launch(overrides("whole_ep1", 1), 1, log), log)
    seconds["whole_ep1"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    killed_at = kill_after_checkpoint(launch(overrides("killed_ep1", 1), 1, log), runs / "killed_ep1", save,
                                      args.kill_settle)
    seconds["killed_ep1_until_kill"] = time.perf_counter() - t0
    # the killed run's folder as the kill left it, to resume at the other layout
    shutil.copytree(runs / "killed_ep1", runs / "resumed_at_ep2")
    t0 = time.perf_counter()
    finish(launch(overrides("killed_ep1", 1), 1, log), log)
    seconds["killed_ep1_resume"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    finish(launch(overrides("resumed_at_ep2", 2), 2, log), log)
    seconds["resumed_at_ep2"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    finish(launch(overrides("whole_ep2", 2), 2, log), log)
    seconds["whole_ep2"] = time.perf_counter() - t0
    whole = rows(runs / "whole_ep1")
    report = {"steps": steps, "save_interval": save, "killed_after_checkpoint": killed_at, "seconds": seconds,
              "layout_metrics_left_out": list(LAYOUT_METRICS),
              "killed_and_resumed_ep1": metric_diffs(whole, rows(runs / "killed_ep1")),
              "resumed_at_ep2": metric_diffs(whole, rows(runs / "resumed_at_ep2"), LAYOUT_METRICS),
              "whole_ep2": metric_diffs(whole, rows(runs / "whole_ep2"), LAYOUT_METRICS)}
    for name in ("killed_and_resumed_ep1", "resumed_at_ep2", "whole_ep2"):
        if sorted(report[name]) != list(range(1, steps + 1)):
            raise SystemExit(f"{name}: logged steps {sorted(report[name])}, expected 1..{steps}")
    (out / "kill_check.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    print(f"GRPO on the SFT'd MoE, {steps} steps, killed after its checkpoint of step {killed_at}; per step the"
          f" largest |difference| over {report['killed_and_resumed_ep1'][1]['metrics_compared']} metrics"
          f" (at EP=2 without {', '.join(LAYOUT_METRICS)}) against the uninterrupted EP=1 run:")
    print("step | killed+resumed (EP=1) | resumed at EP=2 | whole EP=2")
    for step in range(1, steps + 1):
        cells = []
        for n in ("killed_and_resumed_ep1", "resumed_at_ep2", "whole_ep2"):
            d = report[n][step]
            cells.append("identical" if d["metric"] is None else f"{d['max_abs_diff']:.3g} ({d['metric']})")
        print(f"{step} | " + " | ".join(cells))
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--grpo-steps", type=int, default=20)
    parser.add_argument("--aux-loss-coeff", type=float, default=0.01)
    parser.add_argument("--kill-check", action="store_true",
                        help="the GRPO stage uninterrupted, killed and resumed, resumed at EP=2 and at EP=2, compared")
    parser.add_argument("--save-interval", type=int, default=2, help="--kill-check: GRPO checkpoint interval")
    parser.add_argument("--kill-settle", type=float, default=3.0,
                        help="--kill-check: seconds after the checkpoint before the kill")
    args = parser.parse_args(argv)
    if args.kill_check and not 0 < args.save_interval < args.grpo_steps:
        parser.error(f"--save-interval = {args.save_interval}: --kill-check needs 0 < --save-interval < --grpo-steps"
                     f" = {args.grpo_steps} (a checkpoint before the end to resume from)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from aligner.data import load_tokenizer
    from aligner.data.world import load_prompts, synthesize
    from aligner.parallel import ParallelConfig, initialize, is_initialized

    world = synthesize(out / "world", seed=args.seed)
    tok = load_tokenizer(str(world["tokenizer"]))
    if not is_initialized():
        initialize(ParallelConfig(seed=args.seed))
    common = [f"trainer.seed={args.seed}", f"data.tokenizer={world['tokenizer']}", "trainer.progress=true",
              "trainer.tensorboard=false", f"moe.aux_loss_coeff={args.aux_loss_coeff}"]
    seconds = {}
    if not (out / "sft" / "hf").is_dir():
        t0 = time.perf_counter()
        train("sft", common + MOE_MODEL + [f"model.vocab_size={tok.vocab_size}", f"data.train={world['sft_train']}",
                                           f"trainer.out_dir={out / 'sft'}", f"trainer.max_steps={args.sft_steps}"])
        seconds["sft"] = time.perf_counter() - t0
    if args.kill_check:
        sft = rows(out / "sft")
        print(f"SFT: {sft[-1]['step']} steps, loss {sft[0]['loss']:.3f} -> {sft[-1]['loss']:.3f}")
        kill_check(args, out, common, out / "sft" / "hf", world["prompts_train"])
        return 0
    if not (out / "grpo" / "hf").is_dir():
        t0 = time.perf_counter()
        train("grpo", grpo_overrides(common, out / "sft" / "hf", world["prompts_train"], out / "grpo", args.grpo_steps,
                                     0, 1))
        seconds["grpo"] = time.perf_counter() - t0
    prompts = load_prompts(str(world["prompts_heldout"]), tok)
    sft, grpo = rows(out / "sft"), rows(out / "grpo")
    results = {
        "settings": vars(args),
        "train_seconds": seconds,
        "sft": {"steps": sft[-1]["step"], "loss_first": sft[0]["loss"], "loss_last": sft[-1]["loss"],
                "router_first": router(sft[0]), "router_last": router(sft[-1])},
        "grpo": {"steps": grpo[-1]["step"], "reward_first": grpo[0]["reward/mean"], "reward_last": grpo[-1]["reward/mean"],
                 "logprob_mismatch_max": max(r["logprob_mismatch"] for r in grpo),
                 "router_first": router(grpo[0]), "router_last": router(grpo[-1])},
        "exact_answer_rate_heldout_greedy": {"sft": exact_rate(out / "sft" / "hf", prompts, tok),
                                             "grpo": exact_rate(out / "grpo" / "hf", prompts, tok),
                                             "prompts": len(prompts)},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    print(json.dumps(results, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
