"""``aligner rm bon``: best-of-n against a gold reward (docs/monitor.md).

    aligner rm bon POLICY PROMPTS --proxy RM [--proxy RM2 ...] --gold world --n 16 --out DIR

The policy samples N = ``--n`` responses per prompt (temperature 1, seeds a function of
``--seed``, the prompt's position and the sample); the proxy (one reward model, or an
ensemble combined by ``--ensemble``) and the gold reward score every sample. For
n = 1, 2, 4, ..., N the response the proxy picks among n is scored, estimated without
bias from the same N samples (every n-subset weighted alike:
:func:`aligner.evaluation.overoptimization.best_of_n`), against
``KL_bon = log n − (n − 1)/n``; standard errors are over prompts. The best-of-n form
``d (α − β d)`` of Gao et al. (2022) is fitted to the gold gains over n = 1.

Writes ``DIR/bon.json`` (settings, the table, the fit) and ``DIR/samples.jsonl`` (every
sample with its proxy and gold scores), and prints the table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from aligner.files import write_jsonl
from aligner.runtime import UserError, is_rank0


def add_arguments(p) -> None:
    p.add_argument("policy", help="HF causal-LM folder")
    p.add_argument("prompts", help="prompt file (any format with a prompt)")
    p.add_argument("--proxy", action="append", required=True,
                   help="proxy reward: an HF reward-model folder, 'world' or package.module:function; repeat for an"
                        " ensemble")
    p.add_argument("--ensemble", choices=("mean", "min", "mean_minus_var"), default="mean")
    p.add_argument("--ensemble-lambda", type=float, default=1.0)
    p.add_argument("--reward-attribute", default=None,
                   help="read this output of every reward-model proxy (default: the weights training recorded)")
    p.add_argument("--gold", default="world", help="gold reward: 'world[:ATTRIBUTE]', an RM folder or module:function")
    p.add_argument("--n", type=int, default=16, help="samples per prompt (the largest n)")
    p.add_argument("--num-prompts", type=int, default=None, help="the first K prompts (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--template", default="auto", choices=("auto", "extra_id", "chat", "raw"))
    p.add_argument("--tokenizer", default=None, help="default: the policy folder's")
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--out", required=True, help="output folder")


def ns_up_to(n: int) -> List[int]:
    """1, 2, 4, ... up to n (n itself included)."""
    out, k = [], 1
    while k < n:
        out.append(k)
        k *= 2
    return out + [n]


def check_rewards(prompts_path: str, options: List[Tuple[str, str]], reward_attribute: Optional[str] = None):
    """The reward specs ``[(option, text)]`` of a command parsed and checked before any model
    is loaded (:func:`aligner.rewards.check_reward_source`: a folder without a trained reward
    head, a function that does not import, the world's scorer on prompts that are not the
    world's): their :class:`aligner.rewards.config.RewardSpec`, in order."""
    from aligner.evaluation.sampling import parse_reward_spec
    from aligner.rewards import check_reward_source

    specs = []
    for option, text in options:
        spec = parse_reward_spec(text, option)
        if reward_attribute and str(spec.kind) == "model":
            spec.reward_attribute = reward_attribute
        check_reward_source(option, str(spec.kind), path=spec.path, function=spec.function,
                            reward_attribute=spec.reward_attribute if str(spec.kind) == "world" else None,
                            prompts=prompts_path)
        specs.append(spec)
    return specs


def sample_and_score(policy: str, prompts_path: str, *, n: int, proxies: List[str], gold: Optional[str],
                     num_prompts: Optional[int], max_new_tokens: int, seed: int, template: str = "auto",
                     tokenizer: Optional[str] = None, reward_attribute: Optional[str] = None,
                     ensemble: str = "mean", ensemble_lambda: float = 1.0, micro_batch_size: int = 16,
                     proxy_option: str = "--proxy", min_n: int = 1):
    """Sample ``n`` responses per prompt from ``policy`` and score them: ``(samples, proxy
    [P, n], proxy members [K, P, n], gold [P, n] or None)`` (float64). Options and reward
    sources are checked before the policy is loaded, the reward sources built before any
    sampling (``proxy_option`` names the proxies in messages; ``min_n``: the fewest samples
    per prompt the caller can use)."""
    import torch

    from aligner.cli.options import at_least, finite
    from aligner.data import load_dataset, load_tokenizer
    from aligner.data.datasets import resolve_template
    from aligner.evaluation.overoptimization import combine_ensemble
    from aligner.evaluation.sampling import build_reward_source, load_policy, sample_responses, score

    at_least("--n", n, min_n, "a pair needs two samples of a prompt" if min_n == 2 else "")
    at_least("--num-prompts", num_prompts, 1)
    at_least("--max-new-tokens", max_new_tokens, 1)
    at_least("--micro-batch-size", micro_batch_size, 1)
    finite("--ensemble-lambda", ensemble_lambda)
    if not Path(prompts_path).is_file():
        raise FileNotFoundError(2, "no such file", prompts_path)
    options = [(proxy_option, text) for text in proxies] + ([("--gold", gold)] if gold else [])
    specs = check_rewards(prompts_path, options, reward_attribute)
    tok = load_tokenizer(tokenizer or policy)
    _, cfg, engine = load_policy(policy, tok)
    sources = [build_reward_source(spec, tok, micro_batch_size, where=option)
               for (option, _), spec in zip(options, specs)]
    rows = load_dataset(prompts_path, kind="prompts", tokenizer=tok, template=resolve_template(tok, template),
                        max_length=cfg.max_position_embeddings, overlong="error")
    rows = rows[:num_prompts] if num_prompts else rows
    for i, r in enumerate(rows):
        if int(r["prompt_tokens"].numel()) + max_new_tokens > cfg.max_position_embeddings:
            raise UserError(f"{prompts_path}: prompt {i + 1} has {int(r['prompt_tokens'].numel())} tokens; with"
                            f" --max-new-tokens {max_new_tokens} it does not fit {cfg.max_position_embeddings}")
    samples = sample_responses(engine, rows, n, max_new_tokens=max_new_tokens, seed=seed,
                               stop_token_ids=[tok.eos_id])
    members_t = torch.stack([score(source, samples) for source in sources[:len(proxies)]])
    combined, _ = combine_ensemble(members_t, ensemble, ensemble_lambda)
    P = len(rows)
    gold_t = score(sources[-1], samples).reshape(P, n) if gold else None
    return samples, combined.reshape(P, n), members_t.reshape(len(proxies), P, n), gold_t


def run(args) -> dict:
    from aligner.evaluation.overoptimization import best_of_n, describe_peak, fit_form

    samples, proxy, members, gold = sample_and_score(
        args.policy, args.prompts, n=args.n, proxies=args.proxy, gold=args.gold, num_prompts=args.num_prompts,
        max_new_tokens=args.max_new_tokens, seed=args.seed, template=args.template, tokenizer=args.tokenizer,
        reward_attribute=args.reward_attribute, ensemble=args.ensemble, ensemble_lambda=args.ensemble_lambda,
        micro_batch_size=args.micro_batch_size)
    table = [best_of_n(proxy, gold, k) for k in ns_up_to(args.n)]
    base = table[0]["gold"]
    fit = fit_form([r["d_bon"] for r in table], [r["gold"] - base for r in table], "bon")
    result = {"settings": {k: v for k, v in vars(args).items() if k != "func"}, "prompts": int(proxy.shape[0]),
              "table": table, "fit_bon": fit.to_dict() if fit is not None else None}
    if is_rank0():
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bon.json").write_text(json.dumps(result, indent=2))
        N = args.n
        write_jsonl(out / "samples.jsonl", ({"prompt": p["prompt"], "responses": samples.texts[j * N:(j + 1) * N],
                                             "proxy": proxy[j].tolist(), "gold": gold[j].tolist(),
                                             "proxy_members": members[:, j].tolist()}
                                            for j, p in enumerate(samples.prompts)))
        print(format_table(table))
        if fit is not None:
            peak = describe_peak(fit, max(r["d_bon"] for r in table))
            if peak.startswith("peak at"):
                peak += f" (n ~ {peak_n(fit.d_peak)})"
            print(f"best-of-n fit d(alpha - beta d): alpha {fit.alpha:.4f}, beta {fit.beta:.4f}, {peak}")
        print(f"wrote {out / 'bon.json'}")
    return result


def peak_n(d_peak: float) -> str:
    """The n whose KL_bon is closest to d_peak² (for the printed summary)."""
    from aligner.evaluation.overoptimization import kl_bon

    target = d_peak * d_peak
    best = min(range(1, 1 << 16), key=lambda n: abs(kl_bon(n) - target))
    return str(best) if best < (1 << 16) - 1 else ">65535"


def format_table(table: List[dict]) -> str:
    from aligner.evaluation.reporting import markdown_table

    return markdown_table(["n", "KL_bon", "d", "proxy", "± SE", "gold", "± SE"],
                          [[r["n"], r["kl_bon"], r["d_bon"], r["proxy"], r["proxy_se"], r["gold"], r["gold_se"]]
                           for r in table])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="aligner rm bon", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
