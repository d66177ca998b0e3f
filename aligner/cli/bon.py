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
from typing import List, Optional

from aligner.files import write_jsonl
from aligner.runtime import is_rank0


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


def sample_and_score(policy: str, prompts_path: str, *, n: int, proxies: List[str], gold: Optional[str],
                     num_prompts: Optional[int], max_new_tokens: int, seed: int, template: str = "auto",
                     tokenizer: Optional[str] = None, reward_attribute: Optional[str] = None,
                     ensemble: str = "mean", ensemble_lambda: float = 1.0, micro_batch_size: int = 16):
    """Sample ``n`` responses per prompt from ``policy`` and score them: ``(samples, proxy
    [P, n], proxy members [K, P, n], gold [P, n] or None)`` (float64)."""
    import torch

    from aligner.data import load_dataset, load_tokenizer
    from aligner.data.datasets import resolve_template
    from aligner.evaluation.overoptimization import combine_ensemble
    from aligner.evaluation.sampling import build_reward_source, load_policy, parse_reward_spec, sample_responses, score

    if n < 1:
        raise ValueError(f"--n {n}: expected >= 1")
    tok = load_tokenizer(tokenizer or policy)
    _, cfg, engine = load_policy(policy, tok)
    rows = load_dataset(prompts_path, kind="prompts", tokenizer=tok, template=resolve_template(tok, template),
                        max_length=cfg.max_position_embeddings)
    rows = rows[:num_prompts] if num_prompts else rows
    for i, r in enumerate(rows):
        if int(r["prompt_tokens"].numel()) + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"{prompts_path}: prompt {i + 1} has {int(r['prompt_tokens'].numel())} tokens; with"
                             f" --max-new-tokens {max_new_tokens} it does not fit {cfg.max_position_embeddings}")
    samples = sample_responses(engine, rows, n, max_new_tokens=max_new_tokens, seed=seed,
                               stop_token_ids=[tok.eos_id])
    members = []
    for text in proxies:
        spec = parse_reward_spec(text, "--proxy")
        if reward_attribute and str(spec.kind) == "model":
            spec.reward_attribute = reward_attribute
        members.append(score(build_reward_source(spec, tok, micro_batch_size), samples))
    members_t = torch.stack(members)
    combined, _ = combine_ensemble(members_t, ensemble, ensemble_lambda)
    P = len(rows)
    gold_t = None
    if gold:
        gold_t = score(build_reward_source(parse_reward_spec(gold, "--gold"), tok, micro_batch_size),
                       samples).reshape(P, n)
    return samples, combined.reshape(P, n), members_t.reshape(len(proxies), P, n), gold_t


def run(args) -> dict:
    from aligner.evaluation.overoptimization import best_of_n, fit_form

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
            print(f"best-of-n fit d(alpha - beta d): alpha {fit.alpha:.4f}, beta {fit.beta:.4f}"
                  + (f", peak at d = {fit.d_peak:.3f} (n ~ {peak_n(fit.d_peak)})" if fit.d_peak else ""))
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
