"""Reward hacking made visible: RL against a deliberately bad proxy, watched by the monitor
(docs/monitor.md).

    python examples/overoptimization_demo.py --quickstart runs/quickstart --out runs/hacking

PPO from the quickstart's SFT model against a proxy that pays for length (``--proxy
length``: the number of words of the response) — or against a reward model of your choice
(``--proxy DIR``) — with no KL penalty, the gold-vs-proxy monitor on (gold: the world's
helpfulness on held-out prompts). The proxy rises, the gold falls: the monitor's warning
fires and ``best_gold/`` keeps an early policy. Writes the run folder, ``gold_proxy_vs_d.png``
(gold and proxy against d with the fitted RL form), ``gold_proxy_vs_step.png`` and
``summary.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def length_reward(prompts, responses, metadata):
    """The bad proxy: the number of words of the response."""
    return [float(len(r.split())) for r in responses]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--proxy", default="length", help="'length' or an HF reward-model folder")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--interval", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--prompts-per-step", type=int, default=32)
    parser.add_argument("--monitor-prompts", type=int, default=64)
    parser.add_argument("--warn-drop", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the proxy function's module
    from aligner.cli.train import compose
    from aligner.evaluation.overoptimization import fit_form
    from aligner.evaluation.reporting import monitor_curve, plot_gold_proxy

    qs, out = Path(args.quickstart), Path(args.out)
    world = qs / "world"
    reward = (["ppo.reward.kind=function", "ppo.reward.function=overoptimization_demo:length_reward",
               "ppo.critic_init=policy"] if args.proxy == "length" else [f"ppo.reward.path={args.proxy}"])
    # the global batch counts prompts, the mini- and micro-batches rows (docs/online_core.md):
    # ppo.samples_per_prompt = 1 row per prompt; two updates of half the rows each when they halve
    rows = args.prompts_per_step
    mini = rows // 2 if rows % 2 == 0 else rows
    trainer_cls, cfg = compose("ppo", [
        f"init.hf={qs / 'sft' / 'hf'}", f"data.train={world / 'prompts_train.jsonl'}",
        f"data.tokenizer={world / 'tokenizer.model'}", f"trainer.out_dir={out / 'run'}",
        f"trainer.max_steps={args.steps}", f"trainer.global_batch_size={args.prompts_per_step}",
        f"trainer.micro_batch_size={min(16, mini)}", "trainer.save_interval=0", "trainer.tensorboard=false",
        f"trainer.seed={args.seed}", f"optim.lr={args.lr}", "ppo.critic_optim.lr=1e-4", "ppo.kl_coef=0.0",
        "ppo.epochs=2", f"ppo.mini_batch_size={mini}", "monitor.enabled=true",
        f"monitor.prompts={world / 'prompts_heldout.jsonl'}", f"monitor.num_prompts={args.monitor_prompts}",
        f"monitor.interval={args.interval}", f"monitor.warn_drop={args.warn_drop}", f"monitor.seed={args.seed}",
    ] + reward)
    result = trainer_cls(cfg).fit()
    points = monitor_curve(out / "run" / "metrics.jsonl")
    base = points[0]["gold"]
    fit = fit_form([p["d"] for p in points], [p["gold"] - base for p in points], "rl")
    name = f"PPO vs {'length' if args.proxy == 'length' else 'RM'} proxy"
    plot_gold_proxy({name: points}, out / "gold_proxy_vs_d.png", fits={name: fit.to_dict()} if fit else None)
    _plot_steps(points, out / "gold_proxy_vs_step.png")
    best = json.loads((out / "run" / "best_gold" / "monitor.json").read_text())
    rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").open()]
    warned = [r["step"] for r in rows if r.get("split") == "monitor" and r.get("overoptimized") == 1.0]
    summary = {"settings": vars(args), "points": points, "best_gold": best, "last_step": result["step"],
               "warning_steps": warned, "fit_rl": fit.to_dict() if fit else None}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "points"}, indent=2))
    return 0


def _plot_steps(points, out_png):
    from aligner.evaluation.reporting import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    steps = [p["step"] for p in points]
    ax.plot(steps, [p["gold"] for p in points], "o-", color="C0", label="gold (world helpfulness)")
    ax.set_xlabel("step")
    ax.set_ylabel("gold", color="C0")
    twin = ax.twinx()
    twin.plot(steps, [p["proxy"] for p in points], "s--", color="C1", label="proxy")
    twin.set_ylabel("proxy", color="C1")
    ax.grid(alpha=0.3)
    fig.legend(loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
