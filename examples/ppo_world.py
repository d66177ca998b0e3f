"""PPO on the embedded world, judged by its ground truth (docs/ppo.md).

    python examples/ppo_world.py --quickstart runs/quickstart --out runs/ppo_world
    python examples/ppo_world.py --mini runs/mini --out runs/ppo_world   # builds its own SFT + RM first

From the quickstart's SFT model, two PPO runs: against the quickstart's regression reward
model (helpfulness output), and against the world's scorer itself. Then the SFT model and
both PPO policies sample (temperature 1, fixed seeds, the quickstart's judge) for the
world's held-out prompts, the world's scorer rates every response, and the paired
ground-truth helpfulness gain over SFT is reported with its standard error
(``results.json``). ``--mini DIR`` first runs the quickstart's world, SFT and regression
RM stages with a smaller model (for a machine where the whole quickstart takes too long).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from world_common import paired  # the examples folder is the script's own


def train(config, overrides):
    from aligner.cli.train import compose

    trainer_cls, cfg = compose(config, overrides)
    return trainer_cls(cfg).fit()


def mini_pipeline(out: Path, seed: int, sft_steps: int, rm_steps: int) -> Path:
    """The quickstart's world, SFT and regression RM stages with a smaller model."""
    from aligner.data import load_tokenizer
    from aligner.data.world import synthesize

    world = synthesize(out / "world", seed=seed)
    tok = load_tokenizer(str(world["tokenizer"]))
    small = ["model.hidden_size=64", "model.ffn_hidden_size=176", "model.num_layers=2",
             "model.num_attention_heads=4", "model.num_query_groups=2"]
    common = [f"trainer.seed={seed}", f"data.tokenizer={world['tokenizer']}", f"model.vocab_size={tok.vocab_size}",
              "trainer.progress=false", "trainer.tensorboard=false"]
    if not (out / "sft" / "hf").is_dir():
        train("sft", common + small + [f"data.train={world['sft_train']}", f"trainer.out_dir={out / 'sft'}",
                                       f"trainer.max_steps={sft_steps}", "trainer.val_interval=0",
                                       "optim.lr=3e-3", "optim.min_lr=3e-4"])
    if not (out / "rm_regression" / "hf").is_dir():
        train("rm_regression", common + [f"init.hf={out / 'sft' / 'hf'}", f"data.train={world['regression_train']}",
                                         f"trainer.out_dir={out / 'rm_regression'}", f"trainer.max_steps={rm_steps}"])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", help="a finished `aligner quickstart --out DIR` folder (read only)")
    parser.add_argument("--mini", help="build a smaller SFT model and RM here first")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prompts-per-step", type=int, default=32)
    parser.add_argument("--ppo-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--critic-lr", type=float, default=1e-4)
    parser.add_argument("--kl", type=float, default=0.01)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--sft-steps", type=int, default=250)
    parser.add_argument("--rm-steps", type=int, default=100)
    parser.add_argument("--rewards", default="model,world")
    parser.add_argument("--attribute-weights", help="comma-separated weights of the reward model's five outputs"
                        " (default: its helpfulness output), e.g. the published 0.65,0.8,0.45,0.55,-0.4")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(args.quickstart) if args.quickstart else mini_pipeline(Path(args.mini), args.seed, args.sft_steps,
                                                                       args.rm_steps)
    world = base / "world"
    from aligner.cli.quickstart import _generate
    from aligner.data import load_tokenizer
    from aligner.data.world import load_prompts, score_response

    tok = load_tokenizer(str(world / "tokenizer.model"))
    timings = {}
    for reward in args.rewards.split(","):
        run = out / f"ppo_{reward}"
        if (run / "hf").is_dir():
            continue
        t0 = time.perf_counter()
        reward_args = ([f"ppo.reward.path={base / 'rm_regression' / 'hf'}"] if reward == "model"
                       else ["ppo.reward.kind=world", "ppo.critic_init=policy"])
        if reward == "model" and args.attribute_weights:
            reward_args.append(f"ppo.reward.attribute_weights=[{args.attribute_weights}]")
        train("ppo", [f"init.hf={base / 'sft' / 'hf'}", f"data.train={world / 'prompts_train.jsonl'}",
                      f"data.tokenizer={world / 'tokenizer.model'}", f"trainer.out_dir={run}",
                      f"trainer.max_steps={args.steps}", f"trainer.global_batch_size={args.prompts_per_step}",
                      "trainer.micro_batch_size=16", "trainer.save_interval=0", "trainer.progress=true",
                      "trainer.tensorboard=false", f"trainer.seed={args.seed}", f"optim.lr={args.lr}",
                      f"ppo.critic_optim.lr={args.critic_lr}", f"ppo.kl_coef={args.kl}",
                      f"ppo.epochs={args.ppo_epochs}", f"ppo.mini_batch_size={args.prompts_per_step // 2}",
                      f"ppo.generation.max_new_tokens={args.max_new_tokens}"] + reward_args)
        timings[reward] = time.perf_counter() - t0
    prompts = load_prompts(str(world / "prompts_heldout.jsonl"), tok)
    scores = {}
    for name, folder in [("sft", base / "sft" / "hf")] + [(f"ppo_{r}", out / f"ppo_{r}" / "hf")
                                                           for r in args.rewards.split(",")]:
        responses = _generate(folder, prompts, tok, max_new_tokens=48, seed=args.seed)
        scores[name] = [score_response(p["meta"], r) for p, r in zip(prompts, responses)]
        with open(out / f"generations_{name}.jsonl", "w") as f:
            for p, r, s in zip(prompts, responses, scores[name]):
                f.write(json.dumps({"prompt": p["prompt"], "response": r, "scores": s}) + "\n")
    helpful = {k: [s["helpfulness"] for s in v] for k, v in scores.items()}
    results = {
        "base": str(base),
        "settings": vars(args),
        "ppo_seconds": timings,
        "helpfulness": {k: sum(v) / len(v) for k, v in helpful.items()},
        "gain_over_sft": {k: paired(helpful["sft"], v) for k, v in helpful.items() if k != "sft"},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    print(json.dumps(results, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
