"""What the world experiments in examples/ share: the base models, the held-out judge and
the paired statistics.

    python examples/world_common.py --out runs/qs

builds the quickstart's world, SFT model and DPO model (the stages ``world``, ``sft`` and
``dpo`` of ``aligner quickstart`` at scale 1, with its settings: 300 SFT steps, 100 DPO
steps; the gold-vs-proxy monitor, which only watches, is left out, so no reward model is
trained). The folder has the quickstart's layout (``world/``, ``sft/hf``, ``dpo/hf``), so
every example's ``--quickstart`` accepts it, as it accepts a full quickstart folder.
``--sft-steps`` and ``--dpo-steps`` train the same stages for more steps (as the quickstart's
``--scale`` multiplies them; docs/distill.md's teacher is ``--sft-steps 900 --dpo-steps 300``).

The judge: the world's held-out prompts, one response each at temperature 1 with fixed
seeds (the quickstart's judge), rated by the world's ground-truth scorer; comparisons are
paired over the same prompts, with their standard errors. With ``samples`` K > 1 (the
examples' ``--judge-samples``) each prompt gets K responses, each from its own fixed seed
(response 0 from the one-response judge's seed, so K = 1 is that judge), and each score is
the mean over the prompt's K responses: the same quantity, the policy's expected score per
prompt, with the sampling noise of one response divided by K, still paired over the same
prompts.

Reuse. A judgement is written with what it was made from (``generations_<name>.json``: the
model's files' SHA-256, the seed, prompts, responses per prompt, new tokens, greedy or
sampled); ``judge(..., reuse=True)`` reads it back only when all of these are the ones
asked for, and samples again otherwise. A run an example trains records its command
(``example_run.json`` in the run folder, :func:`record_run`); :func:`trained_before` reuses
the folder only for the same command and refuses another, naming the overrides that
differ, so a changed ``--steps`` or ``--seed`` never reads an old model as a new one.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np


def paired(base: List[float], new: List[float]) -> dict:
    """Mean of the per-prompt differences ``new − base``, its standard error and z."""
    diffs = [b - a for a, b in zip(base, new)]
    mean = sum(diffs) / len(diffs)
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
    return {"mean": mean, "standard_error": se, "prompts": len(diffs), "z": mean / se if se > 0 else float("inf")}


def rate(values: List[float]) -> dict:
    """The mean of per-prompt outcomes in [0, 1] with its standard error ``sqrt(Σ (v − p)² / n²)``:
    for 0/1 outcomes (one response per prompt) the binomial ``sqrt(p (1 − p) / n)``; for each
    prompt's fraction over K responses (``--judge-samples``) the spread of those fractions,
    which the binomial formula would overstate."""
    n = len(values)
    p = sum(values) / n
    return {"rate": p, "standard_error": math.sqrt(sum((v - p) ** 2 for v in values)) / n, "prompts": n}


def mean(values: List[float]) -> float:
    return sum(values) / len(values)


def judge_seed(seed: int, prompt: int, sample: int) -> int:
    """Seed of response ``sample`` to held-out prompt ``prompt`` of a judge at ``seed``:
    response 0 draws from the rollout engine's own seed of the prompt (``seed_for(seed,
    prompt)``, the one-response judge's), response k > 0 from numpy's ``SeedSequence`` of
    (seed, prompt, k), a stream of its own."""
    from aligner.rollout.engine import seed_for

    if sample == 0:
        return seed_for(seed, prompt)
    return int(np.random.SeedSequence([int(seed) & (2**63 - 1), int(prompt), int(sample)]).generate_state(
        1, np.uint64)[0] & (2**63 - 1))


def prompt_means(rows: Sequence[dict], prompts: int) -> List[dict]:
    """Per prompt, the mean of each score over its responses: ``rows`` are the score rows
    of K responses to each of ``prompts`` prompts, response-major (response 0 of every
    prompt, then response 1, ...). With one response per prompt the rows themselves."""
    if prompts < 1 or len(rows) % prompts:
        raise ValueError(f"prompt_means: {len(rows)} score rows for {prompts} prompts; expected a multiple")
    samples = len(rows) // prompts
    if samples == 1:
        return list(rows)
    return [{key: mean([float(rows[k * prompts + i][key]) for k in range(samples)]) for key in rows[i]}
            for i in range(prompts)]


class WorldJudge:
    """The world of a quickstart folder, its tokenizer and ``prompts`` held-out prompts;
    ``judge(model_dir, name)`` samples ``samples`` responses per prompt (temperature 1,
    response k of prompt i from ``judge_seed(seed, i, k)``), writes every response with
    its sample index and scores to ``out/generations_<name>.jsonl`` and returns the
    world's score rows per prompt (``helpfulness``, ``exact``, ...: with more than one
    response, each the mean over the prompt's responses; every response's rows stay in
    ``rows[name]``). Greedy decoding draws one
    response per prompt (the others would be the same). Initialises the single-process
    parallel state if nothing has."""

    def __init__(self, quickstart: Path, out: Path, prompts: int = 200, seed: int = 0, max_new_tokens: int = 48,
                 samples: int = 1):
        from aligner.data import load_tokenizer
        from aligner.data.world import load_prompts
        from aligner.parallel import ParallelConfig, initialize, is_initialized

        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"WorldJudge: samples = {samples!r}: expected an integer >= 1 (responses per prompt)")
        if not is_initialized():
            initialize(ParallelConfig(seed=seed))
        self.quickstart, self.out = Path(quickstart), Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.world = self.quickstart / "world"
        self.tokenizer_path = self.world / "tokenizer.model"
        self.tokenizer = load_tokenizer(str(self.tokenizer_path))
        self.prompts = load_prompts(str(self.world / "prompts_heldout.jsonl"), self.tokenizer)[:prompts]
        self.seed, self.max_new_tokens, self.samples = seed, max_new_tokens, samples
        self.rows: dict = {}  # name -> every response's score rows, response-major, as judged

    def judge(self, model_dir: Path, name: str, greedy: bool = False, reuse: bool = False) -> List[dict]:
        """``reuse``: read back ``generations_<name>.jsonl`` when it was judged from the same
        model files with the same settings (``generations_<name>.json``), else sample."""
        from aligner.data.world import score_response
        from aligner.models import from_pretrained
        from aligner.rollout.engine import GenerationConfig, RolloutEngine

        n, samples = len(self.prompts), 1 if greedy else self.samples
        made_from = {"model": files_digest(Path(model_dir)), "seed": self.seed, "prompts": n, "samples": samples,
                     "max_new_tokens": self.max_new_tokens, "greedy": bool(greedy)}
        generations, record = self.out / f"generations_{name}.jsonl", self.out / f"generations_{name}.json"
        if reuse and generations.is_file() and record.is_file() and json.loads(record.read_text()) == made_from:
            scores = [json.loads(line)["scores"] for line in generations.read_text().splitlines()]
            print(f"[judge] {name}: judged before from the same model and settings ({generations}), read back")
            self.rows[name] = scores
            return prompt_means(scores, n)
        record.unlink(missing_ok=True)  # no record names a judgement until it is complete
        models, cfg = from_pretrained(str(model_dir))
        engine = RolloutEngine(models, cfg, tokenizer=self.tokenizer, max_batch=64)
        result = engine.generate([p["prompt_tokens"].tolist() for p in self.prompts] * samples,
                                 GenerationConfig(max_new_tokens=self.max_new_tokens, temperature=1.0, greedy=greedy,
                                                  seed=self.seed, stop_token_ids=[self.tokenizer.eos_id]),
                                 seeds=[judge_seed(self.seed, i, k) for k in range(samples) for i in range(n)])
        responses = [self.tokenizer.decode(result.response_tokens(j)) for j in range(n * samples)]
        scores = [score_response(self.prompts[j % n]["meta"], r) for j, r in enumerate(responses)]
        partial = generations.with_name(generations.name + ".partial")
        with open(partial, "w") as f:
            for j, (r, s) in enumerate(zip(responses, scores)):
                f.write(json.dumps({"prompt": self.prompts[j % n]["prompt"], "sample": j // n, "response": r,
                                    "scores": s}) + "\n")
        os.replace(partial, generations)
        record.write_text(json.dumps(made_from, indent=2, sort_keys=True))
        self.rows[name] = scores
        return prompt_means(scores, n)

    def first_response_only(self, comparisons: Sequence[tuple]) -> dict:
        """The paired helpfulness comparisons ``(key, base, new)`` (names judged by this judge)
        from each model's first response per prompt alone: what the one-response judge would
        report for the same models (its responses, to the float rounding of other batches)."""
        def first(name):
            return [float(s["helpfulness"]) for s in self.rows[name][:len(self.prompts)]]

        return {key: paired(first(base), first(new)) for key, base, new in comparisons
                if base in self.rows and new in self.rows}


def files_digest(folder: Path) -> str:
    """SHA-256 of a model folder's files (names and contents, the top level), 16 hex digits."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def add_judge_arguments(parser: argparse.ArgumentParser, prompts: bool = True) -> None:
    """The judge's options of a world example: ``--prompts`` (held-out prompts judged; left
    out where the example's ``--prompts`` means something else) and ``--judge-samples``."""
    if prompts:
        parser.add_argument("--prompts", type=int, default=200, help="held-out prompts judged")
    parser.add_argument("--judge-samples", type=int, default=1,
                        help="responses judged per held-out prompt (each from its own fixed seed; the prompt's"
                        " scores are their means)")


def judge_from_args(parser: argparse.ArgumentParser, args, quickstart: Path, out: Path,
                    prompts: Optional[int] = None) -> WorldJudge:
    """The :class:`WorldJudge` of an example's ``--seed``, ``--judge-samples`` and held-out
    prompts (``prompts``, default ``--prompts``); a value out of range is the parser's error."""
    prompts = args.prompts if prompts is None else prompts
    if args.judge_samples < 1:
        parser.error(f"--judge-samples {args.judge_samples}: expected an integer >= 1 (responses per prompt)")
    if prompts < 1:
        parser.error(f"--prompts {prompts}: expected an integer >= 1 (held-out prompts judged)")
    return WorldJudge(quickstart, out, prompts=prompts, seed=args.seed, samples=args.judge_samples)


def trained_before(folder: Path, config: str, overrides: List[str]) -> bool:
    """Whether ``folder`` holds a run this example trained with ``aligner train <config>
    <overrides>`` (its ``hf/`` export and the command :func:`record_run` wrote): True for the
    same command; False when nothing was trained there; ValueError (one line) for a run of
    another command or one whose command was not recorded."""
    if not (folder / "hf").is_dir():
        return False
    recorded = folder / "example_run.json"
    if not recorded.is_file():
        raise ValueError(f"{folder}: a trained run without {recorded.name}, the command it was trained with;"
                         " remove the folder or use another --out")
    was = json.loads(recorded.read_text())
    if was == {"config": config, "overrides": list(overrides)}:
        return True
    before, now = was.get("overrides", []), list(overrides)
    changed = [f"-{o}" for o in before if o not in now] + [f"+{o}" for o in now if o not in before]
    if was.get("config") != config:
        changed.insert(0, f"config {was.get('config')} -> {config}")
    raise ValueError(f"{folder}: trained with other settings ({', '.join(changed) or 'their order'});"
                     " use another --out or another run name")


def record_run(folder: Path, config: str, overrides: List[str]) -> None:
    """Record the command a finished run was trained with (read by :func:`trained_before`)."""
    (folder / "example_run.json").write_text(json.dumps({"config": config, "overrides": list(overrides)}, indent=2))


def named_runs(parser: argparse.ArgumentParser, runs: str, sets: List[str], bases, what: str = "BASE",
               reserved=()) -> tuple:
    """``--runs NAME[=BASE],...`` and ``--set NAME:KEY=VALUE`` of a world experiment: each run's
    base (one of ``bases``; a bare NAME is its own base) and each run's extra overrides.
    Names in ``reserved`` are refused (the script's own arms)."""
    base_of = {}
    for item in filter(None, runs.split(",")):
        name, _, base = item.partition("=")
        if (base or name) not in bases or name in reserved:
            also = f" (and NAME not {' or '.join(reserved)})" if reserved else ""
            parser.error(f"--runs: {item!r}: expected NAME or NAME={what} with {what} one of"
                         f" {', '.join(bases)}{also}")
        base_of[name] = base or name
    extra: dict = {}
    for item in sets:
        name, sep, override = item.partition(":")
        if not sep or name not in base_of or "=" not in override:
            parser.error(f"--set {item}: expected NAME:KEY=VALUE with NAME one of --runs ({', '.join(base_of)})")
        extra.setdefault(name, []).append(override)
    return base_of, extra


def train(config: str, overrides: List[str]) -> float:
    """``aligner train <config> <overrides>`` in this process; returns its wall seconds."""
    from aligner.cli.train import compose

    t0 = time.perf_counter()
    trainer_cls, cfg = compose(config, overrides)
    trainer_cls(cfg).fit()
    return time.perf_counter() - t0


def build_bases(out: Path, seed: int = 0, sft_steps: int = 300, dpo_steps: int = 100) -> dict:
    """The quickstart's stages ``world``, ``sft`` and ``dpo`` (its settings) into ``out``;
    a stage already complete there is not trained again. Returns the wall seconds per stage."""
    from aligner.cli.quickstart import _train, common_overrides, train_sft
    from aligner.data import load_tokenizer
    from aligner.data.world import synthesize
    from aligner.parallel import ParallelConfig, initialize, is_initialized

    out.mkdir(parents=True, exist_ok=True)
    seconds = {}
    t0 = time.perf_counter()
    world = synthesize(out / "world", seed=seed)
    tok = load_tokenizer(str(world["tokenizer"]))
    if not is_initialized():
        initialize(ParallelConfig(seed=seed))
    common = common_overrides(world, tok, seed)
    seconds["world"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_sft(out, world, common, sft_steps)
    seconds["sft"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _train("dpo", common + [
        f"init.hf={out / 'sft' / 'hf'}", f"data.train={world['pairs_train']}",
        f"data.validation={world['pairs_val']}", f"trainer.out_dir={out / 'dpo'}",
        f"trainer.max_steps={dpo_steps}",
    ])
    seconds["dpo"] = time.perf_counter() - t0
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--dpo-steps", type=int, default=100)
    args = parser.parse_args(argv)
    out = Path(args.out)
    seconds = build_bases(out, args.seed, args.sft_steps, args.dpo_steps)
    (out / "bases.json").write_text(json.dumps({"settings": vars(args), "seconds": seconds}, indent=2))
    print(json.dumps(seconds, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
