"""``aligner quickstart``: the embedded end-to-end recipe, offline, on a CPU, in minutes.

Stages (each is the same code path as its stand-alone command; the quickstart only
composes the top-level configs in ``conf/`` with overrides):

1. ``world``: synthesise the embedded instruction world (``aligner data synth``) and its
   SentencePiece tokenizer.
2. ``sft``: train a tiny Llama-shaped model from scratch (``aligner train sft``) on the
   world's conversations (a stated share of them flawed).
3. ``rm_regression``: a 5-attribute regression reward model initialised from the SFT
   model (``aligner train rm_regression``).
4. ``rm_bt``: Scaled Bradley-Terry initialised from the regression model, head included
   (``aligner train rm_bt``).
5. ``eval``: both reward models on the world's RewardBench-format file
   (``aligner eval rewardbench``), and regression metrics on held-out HelpSteer2 rows.
6. ``dpo``: DPO from the SFT model on the world's preference pairs (``aligner train dpo``),
   with the gold-vs-proxy monitor on (proxy: the BT reward model; gold: the world's scorer).
7. ``rl``: RLOO (``aligner train rloo``; ``--rl grpo`` or ``--rl ppo`` for the others) from
   the DPO model against the BT reward model, the monitor on (docs/monitor.md).
8. ``bon``: best-of-n from the SFT model by the BT reward model, judged by the world's
   scorer (``aligner rm bon``).
9. ``judge``: SFT, DPO and RL sample (temperature 1, fixed seeds) for held-out prompts (the
   rollout engine); the world's ground-truth scorer rates every response.

Writes ``<out>/report.md`` (results table, plots), ``<out>/results.json``, per-stage run
folders (composed ``config.yaml``, ``metrics.jsonl``, HF-format ``hf/`` checkpoints) and
``<out>/quickstart.json`` (the seed and scale the folder belongs to, the rl stage's algorithm).

Running again into the same ``--out`` continues that run: a stage that completed with the
same training config (its ``result.json`` at the stage's last step, its ``hf/`` export, its
recorded ``config.yaml``) is not trained again, an interrupted one resumes from its last
checkpoint. A folder that holds a run of another seed or scale is refused (every stage
depends on them; its checkpoints would be resumed as if they were this run's); ``--fresh``
deletes the quickstart's outputs there first. Another ``--rl`` trains the rl stage again
(nothing else depends on it); a stage whose recorded config differs otherwise is refused,
naming the keys.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from aligner.files import write_jsonl
from aligner.runtime import UserError


def _log(msg: str) -> None:
    print(f"[quickstart] {msg}", file=sys.stderr, flush=True)


STAGES = ("sft", "rm_regression", "rm_bt", "dpo", "rl")
JUDGED = ("sft", "dpo", "rl")
RUN_FILE = "quickstart.json"
# what a quickstart writes into its folder (all that --fresh deletes)
OUTPUTS = STAGES + ("world", "bon", "results.json", "report.md", "loss_curves.png", "helpfulness_sft_vs_dpo.png",
                    "gold_proxy_vs_d.png", RUN_FILE) + tuple(f"generations_{n}.jsonl" for n in JUDGED)


class RunFolderError(ValueError):
    """The --out folder holds another run."""


def claim_folder(out: Path, seed: int, scale: float, fresh: bool = False) -> None:
    """Make ``out`` this run's folder: refuse one that holds a quickstart of another seed
    or scale (or of unknown seed) unless ``fresh``, which deletes the quickstart's outputs.
    (Every stage depends on the seed and the scale; the RL algorithm shapes only the rl
    stage, which is trained again when it changes: :func:`record_rl`.)"""
    record = out / RUN_FILE
    previous = None
    if record.is_file():
        previous = json.loads(record.read_text())
    elif (out / "results.json").is_file():  # written before the record existed
        previous = {"seed": json.loads((out / "results.json").read_text()).get("seed"), "scale": None}
    elif any((out / name).exists() for name in STAGES + ("world",)):
        previous = {"seed": None, "scale": None}
    if previous is not None and (previous.get("seed"), previous.get("scale")) != (seed, scale):
        if not fresh:
            def show(key, value):
                return f"{key} unknown" if value is None else f"{key} {value}"
            raise RunFolderError(
                f"{out} holds a quickstart run of {show('seed', previous.get('seed'))},"
                f" {show('scale', previous.get('scale'))}; this one is seed {seed}, scale {scale}."
                " Its stages would resume the old checkpoints: pass another --out, or --fresh to delete"
                f" the old run's outputs in {out} first")
        for name in OUTPUTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    kept = {k: v for k, v in (previous or {}).items() if k not in ("seed", "scale")}
    record.write_text(json.dumps({"seed": seed, "scale": scale, **kept}, indent=2))


def record_rl(out: Path, algorithm: str) -> Optional[str]:
    """Record the rl stage's algorithm in the run record; returns the one recorded before
    (None if none). The rl stage itself sees the change in its recorded config."""
    record = out / RUN_FILE
    data = json.loads(record.read_text())
    previous = data.get("rl")
    data["rl"] = algorithm
    record.write_text(json.dumps(data, indent=2))
    return previous


def _train(config: str, overrides: List[str], retrain_if_changed: bool = False) -> dict:
    """Stage ``config`` with ``overrides``: not trained again when its folder holds it
    complete with the same training config. A stage whose recorded config differs in
    training-relevant keys (``aligner.training.run_folder.config_diff``) is trained again
    from scratch when ``retrain_if_changed`` (a stage nothing later depends on), else
    refused by the run folder's resume check, naming the keys."""
    from aligner.cli.train import compose
    from aligner.training.config import plain
    from aligner.training.run_folder import config_diff, recorded_config

    trainer_cls, cfg = compose(config, overrides)
    out_dir = Path(cfg.trainer.out_dir)
    recorded = recorded_config(out_dir)
    changed = config_diff(recorded, plain(cfg)) if recorded is not None else []
    done = out_dir / "result.json"
    if not changed and done.is_file() and (out_dir / "hf" / "config.json").is_file():
        result = json.loads(done.read_text())
        if result.get("step") == cfg.trainer.max_steps:
            _log(f"{out_dir.name}: complete (step {result['step']}), not trained again")
            return result
    if changed and retrain_if_changed:
        keys = ", ".join(key for key, _, _ in changed[:4]) + (", ..." if len(changed) > 4 else "")
        _log(f"{out_dir.name}: its options changed ({keys}): trained again from the start")
        trainer_cls, cfg = compose(config, overrides + ["trainer.resume=false"])
    return trainer_cls(cfg).fit()


def _generate(model_dir: Path, prompts: List[dict], tokenizer, max_new_tokens: int, seed: int) -> List[str]:
    from aligner.models import from_pretrained
    from aligner.rollout.engine import GenerationConfig, RolloutEngine

    models, cfg = from_pretrained(str(model_dir))
    engine = RolloutEngine(models, cfg, tokenizer=tokenizer, max_batch=64)
    result = engine.generate(
        [p["prompt_tokens"].tolist() for p in prompts],
        # the policy's own distribution (temperature 1, seeded per prompt): what alignment changes
        GenerationConfig(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed,
                         stop_token_ids=[tokenizer.eos_id]),
    )
    return [tokenizer.decode(result.response_tokens(i)) for i in range(len(prompts))]


def common_overrides(world: dict, tokenizer, seed: int) -> List[str]:
    """The overrides every training stage of a run on the world ``world`` shares."""
    return [f"trainer.seed={seed}", f"data.tokenizer={world['tokenizer']}", f"model.vocab_size={tokenizer.vocab_size}",
            "trainer.progress=true", "trainer.tensorboard=false"]


def train_sft(out: Path, world: dict, common: List[str], steps: int = 300) -> dict:
    """Stage ``sft``: the tiny model from scratch on the world's conversations, into ``out/sft``."""
    return _train("sft", common + [
        f"data.train={world['sft_train']}", f"data.validation={world['sft_val']}",
        f"trainer.out_dir={out / 'sft'}", f"trainer.max_steps={steps}", "trainer.val_interval=100",
    ])


def train_rm_regression(out: Path, world: dict, common: List[str], steps: int = 150) -> dict:
    """Stage ``rm_regression``: the 5-attribute regression reward model from ``out/sft``."""
    return _train("rm_regression", common + [
        f"init.hf={out / 'sft' / 'hf'}", f"data.train={world['regression_train']}",
        f"data.validation={world['regression_val']}", f"trainer.out_dir={out / 'rm_regression'}",
        f"trainer.max_steps={steps}",
    ])


RL_STEPS = 8  # steps of the rl stage at scale 1 (sized for README command 1 within 15 minutes)
RL_ALGORITHMS = ("rloo", "grpo", "ppo")


def rl_overrides(algorithm: str, reward_model: Path) -> List[str]:
    """The rl stage's settings for ``algorithm``: RLOO / GRPO (``aligner train pg``: 16 prompts
    x 4 responses per step) or PPO (32 prompts x 1 response, critic from the reward model)."""
    if algorithm == "ppo":
        return ["trainer.global_batch_size=32", f"ppo.reward.path={reward_model}", "optim.lr=1e-4",
                "ppo.critic_optim.lr=1e-4", "ppo.epochs=2", "ppo.mini_batch_size=16"]
    return ["trainer.global_batch_size=16", f"pg.reward.path={reward_model}", "optim.lr=3e-5",
            "pg.samples_per_prompt=4"]


def default_rl_algorithm() -> str:
    """RLOO where this installation has ``aligner train pg``, else PPO."""
    from aligner.algorithms.catalog import TRAINERS

    return "rloo" if "pg" in TRAINERS else "ppo"


def _best_of_n(out: Path, world: dict, seed: int, n: int, num_prompts: int) -> dict:
    """``aligner rm bon`` from the SFT model by the BT reward model, gold = the world's helpfulness."""
    import argparse

    from aligner.cli import bon

    done = out / "bon" / "bon.json"
    if done.is_file():
        previous = json.loads(done.read_text())
        if previous["settings"].get("n") == n and previous["settings"].get("num_prompts") == num_prompts:
            _log("bon: complete, not sampled again")
            return previous
    args = argparse.Namespace(policy=str(out / "sft" / "hf"), prompts=str(world["prompts_heldout"]),
                              proxy=[str(out / "rm_bt" / "hf")], ensemble="mean", ensemble_lambda=1.0,
                              reward_attribute=None, gold="world:helpfulness", n=n, num_prompts=num_prompts,
                              max_new_tokens=48, seed=seed, template="extra_id", tokenizer=None, micro_batch_size=16,
                              out=str(out / "bon"))
    return bon.run(args)


def run(out: Path, seed: int = 0, scale: float = 1.0, fresh: bool = False, rl_algorithm: Optional[str] = None) -> dict:
    claim_folder(out, seed, scale, fresh)  # before anything heavy: a refusal comes at once
    from aligner.cli.eval import regression as eval_regression
    from aligner.cli.eval import rewardbench as eval_rewardbench
    from aligner.data import load_tokenizer
    from aligner.data.world import load_prompts, score_response, synthesize
    from aligner.parallel import ParallelConfig, initialize, is_initialized
    from aligner.evaluation.reporting import (
        markdown_table,
        monitor_curve,
        plot_curves,
        plot_distributions,
        plot_gold_proxy,
        write_report,
    )

    rl_algorithm = rl_algorithm or default_rl_algorithm()
    t_start = time.perf_counter()
    timings: Dict[str, float] = {}

    def steps(n: int) -> int:
        return max(2, int(round(n * scale)))

    def stage(name):
        timings[name] = time.perf_counter()
        _log(f"stage {name} (elapsed {time.perf_counter() - t_start:.0f} s)")

    stage("world")
    world = synthesize(out / "world", seed=seed)
    tok = load_tokenizer(str(world["tokenizer"]))
    if not is_initialized():
        initialize(ParallelConfig(seed=seed))
    common = common_overrides(world, tok, seed)

    stage("sft")
    sft = train_sft(out, world, common, steps(300))
    stage("rm_regression")
    reg = train_rm_regression(out, world, common, steps(150))
    stage("rm_bt")
    bt = _train("rm_bt", common + [
        f"init.hf={out / 'rm_regression' / 'hf'}", f"data.train={world['pairs_train']}",
        f"data.validation={world['pairs_val']}", f"trainer.out_dir={out / 'rm_bt'}",
        f"trainer.max_steps={steps(80)}", "rm.bt_kind=scaled",
    ])
    stage("eval")
    # the regression RM's helpfulness output (the reward the BT stage goes on to train); the
    # BT model's reward as its training recorded it (also helpfulness); the template both recorded
    rb = {"rm_regression": eval_rewardbench(str(out / "rm_regression" / "hf"), str(world["rewardbench"]),
                                            reward_attribute="helpfulness"),
          "rm_bt": eval_rewardbench(str(out / "rm_bt" / "hf"), str(world["rewardbench"]))}
    regm = eval_regression(str(out / "rm_regression" / "hf"), str(world["regression_val"]))
    # the gold-vs-proxy monitor (docs/monitor.md): held-out prompts, the BT model as proxy,
    # the world's helpfulness as gold; sized so that it costs a few seconds per evaluation
    monitor_prompts = 64 if scale >= 0.5 else 8

    def monitor(n_steps: int, proxy: bool) -> List[str]:
        return (["monitor.enabled=true", f"monitor.prompts={world['prompts_heldout']}",
                 f"monitor.num_prompts={monitor_prompts}", f"monitor.interval={max(1, n_steps // 4)}",
                 f"monitor.seed={seed}", "monitor.gold.kind=world", "monitor.gold.reward_attribute=helpfulness"]
                + ([f"monitor.proxy=[{{kind: model, path: '{out / 'rm_bt' / 'hf'}'}}]"] if proxy else []))

    stage("dpo")
    dpo = _train("dpo", common + [
        f"init.hf={out / 'sft' / 'hf'}", f"data.train={world['pairs_train']}",
        f"data.validation={world['pairs_val']}", f"trainer.out_dir={out / 'dpo'}",
        f"trainer.max_steps={steps(100)}",
    ] + monitor(steps(100), proxy=True))
    stage("rl")
    rl_steps = steps(RL_STEPS)
    before = record_rl(out, rl_algorithm)
    if before is not None and before != rl_algorithm:
        _log(f"rl: the folder's rl stage ran {before.upper()}; this run asks for {rl_algorithm.upper()}")
    # nothing later depends on the rl stage: another algorithm (or other options) trains it again
    rl = _train(rl_algorithm, common + [
        f"init.hf={out / 'dpo' / 'hf'}", f"data.train={world['prompts_train']}", f"trainer.out_dir={out / 'rl'}",
        f"trainer.max_steps={rl_steps}", "trainer.micro_batch_size=16", "trainer.save_interval=0",
    ] + rl_overrides(rl_algorithm, out / "rm_bt" / "hf") + monitor(rl_steps, proxy=False), retrain_if_changed=True)
    stage("bon")
    bon = _best_of_n(out, world, seed, n=8 if scale >= 0.5 else 4, num_prompts=monitor_prompts)
    stage("judge")
    prompts = load_prompts(str(world["prompts_heldout"]), tok)
    judged = {}
    for name in JUDGED:
        responses = _generate(out / name / "hf", prompts, tok, max_new_tokens=48, seed=seed)
        scores = [score_response(p["meta"], r) for p, r in zip(prompts, responses)]
        judged[name] = {"responses": responses, "scores": scores}
        write_jsonl(out / f"generations_{name}.jsonl",
                    ({"prompt": p["prompt"], "response": r, "scores": s} for p, r, s in zip(prompts, responses, scores)))
    timings["end"] = time.perf_counter()

    attrs = ["helpfulness", "correctness", "coherence", "verbosity"]

    def mean(name, attr):
        vals = [s[attr] for s in judged[name]["scores"]]
        return sum(vals) / len(vals)

    def exact(name):
        vals = [s.get("exact", s["correctness"] == 4) for s in judged[name]["scores"]]
        return sum(bool(v) for v in vals) / len(vals)

    def paired(base, new):
        diffs = [d["helpfulness"] - s["helpfulness"] for s, d in zip(judged[base]["scores"], judged[new]["scores"])]
        mean_diff = sum(diffs) / len(diffs)
        se = math.sqrt(sum((x - mean_diff) ** 2 for x in diffs) / (len(diffs) - 1) / len(diffs)) \
            if len(diffs) > 1 else float("nan")
        return {"mean": mean_diff, "standard_error": se, "prompts": len(diffs)}

    gains = {"dpo_minus_sft_helpfulness": paired("sft", "dpo"), "rl_minus_dpo_helpfulness": paired("dpo", "rl"),
             "rl_minus_sft_helpfulness": paired("sft", "rl")}
    mean_diff, se = gains["dpo_minus_sft_helpfulness"]["mean"], gains["dpo_minus_sft_helpfulness"]["standard_error"]
    diffs = [None] * gains["dpo_minus_sft_helpfulness"]["prompts"]
    curves = {name.upper(): monitor_curve(out / name / "metrics.jsonl") for name in ("dpo", "rl")}
    curves["best-of-n (SFT)"] = [{"d": r["d_bon"], "proxy": r["proxy"], "gold": r["gold"], "step": r["n"]}
                                 for r in bon["table"]]
    results = {
        "seed": seed,
        "sft": {"val_loss": sft["val"].get("loss")},
        "rm_regression": {"rewardbench": rb["rm_regression"], "val": reg["val"], "heldout_regression": regm},
        "rm_bt": {"rewardbench": rb["rm_bt"], "val": bt["val"]},
        "dpo": {"val": dpo["val"], "monitor": curves["DPO"]},
        "rl": {"algorithm": rl_algorithm, "monitor": curves["RL"], "best_gold": _best_gold(out / "rl"),
               "train": {k: v for k, v in rl["train"].items() if not k.startswith("time/")}},
        "bon": {"table": bon["table"], "fit_bon": bon["fit_bon"]},
        "judge": {name: {a: mean(name, a) for a in attrs} | {"exact_answer_rate": exact(name)} for name in judged},
        **gains,
        "stage_seconds": {k: round(timings[n] - timings[k], 1) for k, n in zip(list(timings)[:-1], list(timings)[1:])},
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))

    plot_curves({s: str(out / s / "metrics.jsonl") for s in ("sft", "rm_regression", "rm_bt", "dpo")},
                out / "loss_curves.png")
    plot_distributions({n.upper(): [s["helpfulness"] for s in judged[n]["scores"]] for n in JUDGED},
                       out / "helpfulness_sft_vs_dpo.png", "ground-truth helpfulness (0..4)",
                       bins=[x - 0.5 for x in range(6)])
    plot_gold_proxy(curves, out / "gold_proxy_vs_d.png")
    def overall(report):  # accuracy over all rows of the world's subsets
        subsets = report["subsets"].values()
        return sum(v["correct"] for v in subsets) / max(1, sum(v["n"] for v in subsets))

    table = markdown_table(
        ["stage", "metric", "value"],
        [
            ["SFT", "validation loss (nats/token)", results["sft"]["val_loss"]],
            ["RM regression", "embedded RewardBench-format accuracy (all rows)", overall(rb["rm_regression"])],
            ["RM regression", "held-out Pearson (helpfulness)", regm.get("pearson/helpfulness", float("nan"))],
            ["Scaled BT from regression", "embedded RewardBench-format accuracy (all rows)", overall(rb["rm_bt"])],
            ["DPO", "held-out implicit-reward accuracy", dpo["val"].get("rewards/accuracy", float("nan"))],
        ]
        + [[name, f"embedded RewardBench {sub} accuracy", rb[key]["subsets"][sub]["accuracy"]]
           for name, key in (("RM regression", "rm_regression"), ("Scaled BT from regression", "rm_bt"))
           for sub in sorted(rb[key]["subsets"])]
        + [["DPO - SFT", f"paired ground-truth helpfulness gain (± standard error, {len(diffs)} prompts)",
            f"{mean_diff:+.3f} ± {se:.3f}"]],
    )
    ground_truth = markdown_table(
        ["", "SFT", "DPO", f"RL ({rl_algorithm.upper()})"],
        [[f"ground-truth {a} of generations"] + [results["judge"][n][a] for n in JUDGED] for a in attrs]
        + [["exact-answer rate"] + [results["judge"][n]["exact_answer_rate"] for n in JUDGED]]
        + [[f"paired helpfulness gain over the previous stage (± SE, {len(diffs)} prompts)", "",
            _pm(gains["dpo_minus_sft_helpfulness"]), _pm(gains["rl_minus_dpo_helpfulness"])],
           [f"paired helpfulness gain over SFT (± SE, {len(diffs)} prompts)", "",
            _pm(gains["dpo_minus_sft_helpfulness"]), _pm(gains["rl_minus_sft_helpfulness"])]],
    )
    bon_table = markdown_table(
        ["n", "KL_bon", "d", "proxy (BT RM)", "gold (helpfulness)", "± SE"],
        [[r["n"], r["kl_bon"], r["d_bon"], r["proxy"], r["gold"], r["gold_se"]] for r in bon["table"]])
    monitor_table = markdown_table(
        ["run", "step", "d = sqrt(KL)", "proxy", "gold (helpfulness)", "± SE"],
        [[name, p["step"], p["d"], p["proxy"], p["gold"], p["gold_se"]] for name in ("DPO", "RL")
         for p in curves[name]])
    from aligner.evaluation.rewardbench import format_report

    write_report(out / "report.md", "aligner quickstart: the embedded world", [
        ("Ground truth: SFT -> DPO -> RL", ground_truth),
        ("Results", table),
        ("Gold and proxy reward against d = sqrt(KL to the initial model)",
         "![gold and proxy vs d](gold_proxy_vs_d.png)\n\nDPO's d is its distance from the SFT model, RL's from"
         " the DPO model it starts from, best-of-n's is sqrt(KL_bon) from the SFT model (docs/monitor.md).\n\n"
         + monitor_table + "\n\nBest-of-n from the SFT model, picked by the BT reward model:\n\n" + bon_table),
        ("Ground truth: SFT vs DPO vs RL", "![helpfulness](helpfulness_sft_vs_dpo.png)"),
        ("Loss curves", "![loss curves](loss_curves.png)"),
        ("RewardBench-format evaluation: regression RM", format_report(rb["rm_regression"])),
        ("RewardBench-format evaluation: Scaled BT from regression", format_report(rb["rm_bt"])),
        ("Time per stage (s)", markdown_table(["stage", "seconds"], sorted(results["stage_seconds"].items()))),
    ])
    _log(f"done in {results['total_seconds']:.0f} s: report at {out / 'report.md'}")
    return results


def _pm(gain: dict) -> str:
    return f"{gain['mean']:+.3f} ± {gain['standard_error']:.3f}"


def _best_gold(run: Path) -> Optional[dict]:
    path = run / "best_gold" / "monitor.json"
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="aligner quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/quickstart", help="run folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's step count")
    parser.add_argument("--rl", choices=RL_ALGORITHMS, default=None,
                        help="the rl stage's algorithm (default: rloo where `aligner train pg` exists, else ppo)")
    parser.add_argument("--fresh", action="store_true",
                        help="delete the outputs of a quickstart of another seed or scale in --out first")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.scale) and args.scale > 0):
        raise UserError(f"--scale {args.scale}: expected a number > 0 (it multiplies every stage's step count)")
    try:
        run(Path(args.out), seed=args.seed, scale=args.scale, fresh=args.fresh, rl_algorithm=args.rl)
    except RunFolderError as exc:
        print(f"aligner quickstart: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
