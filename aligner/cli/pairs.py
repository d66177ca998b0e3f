"""``aligner data pairs``: on-policy preference pairs (docs/monitor.md, docs/dpo.md).

    aligner data pairs POLICY PROMPTS OUT.jsonl --reward RM --n 4 [--all-pairs --min-gap G]

The policy samples N = ``--n`` responses per prompt (temperature 1, fixed seeds); the
reward (an HF reward-model folder, ``world`` or ``package.module:function``) scores each.
Per prompt the best response becomes ``chosen`` and the worst ``rejected`` (the recipe of
the Nemotron-4 340B report's iterative alignment), or with ``--all-pairs`` every pair whose
score gap is at least ``--min-gap``. A prompt whose best and worst are less than
``--min-gap`` apart (default: any positive gap) gives no pair; empty responses (a stop
token at once) take no part (counted). Rows are in the
``pairwise`` format DPO, RPO and margin-DPO read (docs/data_formats.md): ``prompt``,
``chosen``, ``rejected``, ``margin`` (the score gap), ``chosen_reward``,
``rejected_reward``, plus the prompt row's other fields (``system``, a world task's
``answer`` / ``family`` / ``args``), so the file is also a prompt file for the next round.
A summary (prompts, pairs, prompts without a pair, mean gap, mean reward) is printed as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from aligner.files import write_jsonl

# fields of a prompt row that describe responses (not the prompt): never copied into a pair
RESPONSE_FIELDS = {"response", "response_1", "response_2", "preference_strength", "chosen", "rejected", "margin",
                   "strength", "chosen_reward", "rejected_reward", "subset", "id", "chosen_model", "rejected_model",
                   "helpfulness", "correctness", "coherence", "complexity", "verbosity", "split", "styles",
                   "preference_statement", "preference_elaboration"}


def add_arguments(p) -> None:
    p.add_argument("policy", help="HF causal-LM folder to sample from")
    p.add_argument("prompts", help="prompt file (any format with a prompt)")
    p.add_argument("out", help="output pairs jsonl")
    p.add_argument("--reward", required=True, help="'world[:ATTRIBUTE]', an HF reward-model folder or module:function")
    p.add_argument("--reward-attribute", default=None, help="for a reward model: read this output")
    p.add_argument("--n", type=int, default=4, help="responses per prompt")
    p.add_argument("--all-pairs", action="store_true", help="every pair with a gap >= --min-gap, not best vs worst")
    p.add_argument("--min-gap", type=float, default=None, help="smallest score gap of a pair (default: > 0)")
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--template", default="auto", choices=("auto", "extra_id", "chat", "raw"))
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--micro-batch-size", type=int, default=16)


def select_pairs(scores: List[float], all_pairs: bool, min_gap: Optional[float]) -> List[tuple]:
    """(chosen, rejected) sample indices of one prompt from its N scores: best vs worst, or
    every (i, j) with ``score_i − score_j >= min_gap``; a gap must be > 0 when min_gap is None.
    Ties in the best / worst go to the earlier sample."""
    def ok(gap):
        return gap > 0 if min_gap is None else gap >= min_gap and gap > 0

    if all_pairs:
        return [(i, j) for i in range(len(scores)) for j in range(len(scores)) if ok(scores[i] - scores[j])]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    return [(best, worst)] if ok(scores[best] - scores[worst]) else []


def make_pairs(args) -> dict:
    from aligner.cli.bon import sample_and_score
    from aligner.cli.options import finite

    finite("--min-gap", args.min_gap, 0.0)
    samples, scores, _, _ = sample_and_score(
        args.policy, args.prompts, n=args.n, proxies=[args.reward], gold=None, num_prompts=args.num_prompts,
        max_new_tokens=args.max_new_tokens, seed=args.seed, template=args.template, tokenizer=args.tokenizer,
        reward_attribute=args.reward_attribute, micro_batch_size=args.micro_batch_size, proxy_option="--reward",
        min_n=2)
    N = args.n
    rows, gaps, without, empty = [], [], 0, 0
    for j, p in enumerate(samples.prompts):
        s = scores[j].tolist()
        # an empty response (a stop token at once) is no response the pair formats accept
        usable = [k for k in range(N) if samples.texts[j * N + k].strip()]
        empty += N - len(usable)
        chosen = [(usable[a], usable[b]) for a, b in select_pairs([s[k] for k in usable], args.all_pairs,
                                                                  args.min_gap)]
        without += not chosen
        extra = {k: v for k, v in p.get("meta", {}).items() if k not in RESPONSE_FIELDS and k != "prompt"}
        prompt = p["prompt"]  # the prompt string (HelpSteer2 turn format for a multi-turn prompt)
        for a, b in chosen:
            gap = s[a] - s[b]
            gaps.append(gap)
            rows.append(dict(extra, prompt=prompt, chosen=samples.texts[j * N + a], rejected=samples.texts[j * N + b],
                             margin=gap, chosen_reward=s[a], rejected_reward=s[b]))
    out = write_jsonl(args.out, rows)
    summary = {"prompts": len(samples.prompts), "samples_per_prompt": N, "pairs": len(rows),
               "prompts_without_pair": without, "empty_responses_left_out": empty, "mean_margin": sum(gaps) / len(gaps) if gaps else None,
               "mean_reward": float(scores.mean()), "out": str(out)}
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="aligner data pairs", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    print(json.dumps(make_pairs(parser.parse_args(argv)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
