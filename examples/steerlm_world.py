"""SteerLM and SteerLM 2.0 on the embedded world, judged by its ground truth (docs/steerlm.md).

    python examples/steerlm_world.py --quickstart runs/quickstart --out runs/steerlm_world
    python examples/steerlm_world.py --world steerable --steerlm-steps 400 --out runs/steerlm_steerable

From a finished quickstart (read only: its world, SFT model and regression reward model),
or, with ``--world``, from a base of its own in ``OUT/base``: the world of that style set
(``steerable``: responses whose verbosity and complexity span 0..4, aligner.data.world),
the SFT model and the regression reward model trained from it with the quickstart's
settings (``aligner.cli.quickstart.train_sft`` / ``train_rm_regression``):

1. ``aligner rm label``: the world's SFT conversations get the attribute strings the
   regression reward model predicts (rounded, clipped to 0..4);
2. SteerLM: ``aligner train steerlm_sft`` from the SFT model on them;
3. SteerLM 2.0: ``aligner train steerlm2`` from the SteerLM model, sampling on training
   prompts for a set of target attribute strings (the verbosity and complexity sweeps
   below), 2 iterations x 2 epochs, a checkpoint at the end of each iteration;
4. evaluation on the world's held-out prompts (fixed seeds, T 0.7, top-p 0.9, the same seed
   for a prompt whatever the model or request): the world's scorer rates every response.
   - steerability: requested verbosity 0..4 (others at the SteerLM defaults) against the
     measured verbosity, Spearman's rank correlation over every (prompt, level); likewise
     complexity;
   - quality: ground-truth helpfulness when asking for helpfulness 4 and correctness 4,
     paired with the SFT model's (no attribute turn) on the same prompts and seeds;
   - adherence: mean |requested − measured| over the five attributes the world measures,
     over every request of both sweeps, for SteerLM and SteerLM 2.0 after 1 and 2
     iterations, with standard errors, and the paired differences to SteerLM.

Everything lands in ``OUT/results.json``; a stage whose output exists is not run again
(the evaluation's ``generations.json`` holds the scores: delete it to score anew).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ATTRS = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
DEFAULT = {"helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 2, "verbosity": 2}


def log(msg: str) -> None:
    print(f"[steerlm_world {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def label_of(levels: dict) -> str:
    from aligner.data.formats import format_attribute_label

    return format_attribute_label(dict(DEFAULT, **levels))


def sweeps():
    """The requests: verbosity 0..4 and complexity 0..4, the others at SteerLM's defaults."""
    return {"verbosity": [label_of({"verbosity": v}) for v in range(5)],
            "complexity": [label_of({"complexity": c}) for c in range(5)]}


def train(config, overrides):
    from aligner.cli.train import compose

    trainer_cls, cfg = compose(config, overrides)
    return trainer_cls(cfg).fit()


# ------------------------------------------------------------------------------ statistics
def ranks(xs):
    """Mid-ranks (ties share the mean of their positions)."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def pearson(x, y):
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def spearman(x, y):
    return pearson(ranks(x), ranks(y))


def mean_se(xs):
    n = len(xs)
    m = sum(xs) / n
    se = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n) if n > 1 else float("nan")
    return {"mean": m, "standard_error": se, "n": n}


# ------------------------------------------------------------------------------ generation
def load_models(path: Path):
    """An HF folder, or a training checkpoint step directory (its recorded model config)."""
    from aligner.models import ModelConfig, build_model, from_pretrained, load_checkpoint

    if (path / "config.json").is_file():
        return from_pretrained(str(path))
    cfg = ModelConfig.from_dict(json.loads((path / "model_config.json").read_text()))
    models = [build_model(cfg)]
    load_checkpoint(path, models)
    return models, cfg


def generate(models, cfg, tok, prompts, label, seed, max_new_tokens):
    """One response per prompt (rendered with the attribute turn ``label``, or none), scored
    by the world; the seed of prompt i is seed_for(seed, i) for every model and request."""
    from aligner.data.datasets import render_extra_id
    from aligner.data.world import score_response
    from aligner.rollout import GenerationConfig, RolloutEngine, seed_for

    engine = RolloutEngine(models, cfg, tokenizer=tok, max_batch=128)
    rows = [render_extra_id(tok, p["conversation"], label=label)[0] for p in prompts]
    result = engine.generate(rows, GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.9,
                                                    seed=seed, stop_token_ids=[tok.eos_id]),
                             seeds=[seed_for(seed, i) for i in range(len(prompts))])
    out = []
    for i, p in enumerate(prompts):
        ids = result.response_tokens(i)
        if result.stop_reasons[i] == "stop_token":
            ids = ids[:-1]
        text = tok.decode(ids)
        out.append({"response": text, **{a: score_response(p["meta"], text)[a] for a in ATTRS}})
    return out


def evaluate(name, path, tok, prompts, seed, max_new_tokens, with_plain=False):
    models, cfg = load_models(path)
    res = {}
    for attr, labels in sweeps().items():
        for level, label in enumerate(labels):
            res[f"{attr}={level}"] = generate(models, cfg, tok, prompts, label, seed, max_new_tokens)
    res["quality"] = generate(models, cfg, tok, prompts, label_of({"helpfulness": 4, "correctness": 4}), seed,
                              max_new_tokens)
    if with_plain:
        res["plain"] = generate(models, cfg, tok, prompts, None, seed, max_new_tokens)
    log(f"evaluated {name}")
    return res


def figures(gen: dict, seen: dict) -> dict:
    """Steerability, quality and adherence figures of one model's generations. ``seen``:
    per attribute, the levels the labelled training data holds (Spearman over those too)."""
    out = {}
    for attr in ("verbosity", "complexity"):
        req, meas = [], []
        by_level = {}
        for level in range(5):
            scores = [r[attr] for r in gen[f"{attr}={level}"]]
            req += [level] * len(scores)
            meas += scores
            by_level[level] = mean_se(scores)
        out[f"spearman/{attr}"] = spearman(req, meas)
        keep = [i for i, level in enumerate(req) if level in seen[attr]]
        out[f"spearman_seen_levels/{attr}"] = {"levels": sorted(seen[attr]),
                                               "spearman": spearman([req[i] for i in keep], [meas[i] for i in keep])}
        out[f"measured_by_requested/{attr}"] = by_level
    out["quality/helpfulness"] = mean_se([r["helpfulness"] for r in gen["quality"]])
    out["quality/correctness"] = mean_se([r["correctness"] for r in gen["quality"]])
    errors = adherence_errors(gen)
    out["adherence/mean_abs_error"] = mean_se(errors)
    for a in ATTRS:
        out[f"adherence/{a}"] = mean_se(adherence_errors(gen, [a]))
    return out


def adherence_errors(gen: dict, attrs=ATTRS):
    """Per response of both sweeps: the mean over ``attrs`` of |requested − measured|."""
    errors = []
    for attr in ("verbosity", "complexity"):
        for level in range(5):
            requested = dict(DEFAULT, **{attr: level})
            errors += [sum(abs(requested[a] - r[a]) for a in attrs) / len(attrs) for r in gen[f"{attr}={level}"]]
    return errors


def paired(base, new):
    return mean_se([b - a for a, b in zip(base, new)])


def build_base(base: Path, styles: str, seed: int) -> Path:
    """A quickstart-shaped folder (``world/``, ``sft/hf``, ``rm_regression/hf``) on the world
    of style set ``styles``: SFT and the regression reward model as the quickstart trains them
    (a stage that completed is not trained again)."""
    from aligner.cli.quickstart import common_overrides, train_rm_regression, train_sft
    from aligner.data import load_tokenizer
    from aligner.data.world import synthesize
    from aligner.parallel import ParallelConfig, initialize, is_initialized

    world = synthesize(base / "world", seed=seed, styles=styles)
    tok = load_tokenizer(str(world["tokenizer"]))
    if not is_initialized():
        initialize(ParallelConfig(seed=seed))
    common = common_overrides(world, tok, seed)
    log("base: sft")
    train_sft(base, world, common)
    log("base: rm_regression")
    train_rm_regression(base, world, common)
    return base


# ------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--quickstart", help="a finished `aligner quickstart --out DIR` (read only)")
    source.add_argument("--world", choices=("standard", "steerable"),
                        help="build a base in OUT/base: this world's style set, SFT and regression RM")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout", type=int, default=100, help="held-out prompts evaluated")
    parser.add_argument("--steerlm-steps", type=int, default=200)
    parser.add_argument("--steerlm2-prompts", type=int, default=32, help="training prompts sampled per iteration")
    parser.add_argument("--samples", type=int, default=4, help="SteerLM 2.0 responses per (prompt, attributes)")
    parser.add_argument("--steerlm2-lr", type=float, default=3e-5)
    parser.add_argument("--steerlm2-batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # a stage's time is recorded when it runs; a rerun keeps those of the stages it skips
    earlier = out / "results.json"
    timings = json.loads(earlier.read_text()).get("timings_s", {}) if earlier.is_file() else {}
    t0 = time.perf_counter()
    if args.world:
        built = (out / "base" / "rm_regression" / "hf" / "config.json").is_file()
        qs = build_base(out / "base", args.world, args.seed)
        if not built:
            timings["base"] = time.perf_counter() - t0
    else:
        qs = Path(args.quickstart)
    world = qs / "world"

    # 1. labels from the regression reward model
    t0 = time.perf_counter()
    from aligner.cli.rm_label import label_file

    labelled = {split: out / f"{split}_labelled.jsonl" for split in ("sft_train", "sft_val")}
    if not all(path.is_file() for path in labelled.values()):
        for split, path in labelled.items():
            if not path.is_file():
                label_file(str(qs / "rm_regression" / "hf"), str(world / f"{split}.jsonl"), str(path),
                           micro_batch_size=32)
        timings["label"] = time.perf_counter() - t0

    # 2. SteerLM: attribute-conditioned SFT from the SFT model
    t0 = time.perf_counter()
    steerlm = out / "steerlm"
    if not (steerlm / "hf" / "config.json").is_file():
        train("steerlm_sft", [f"init.hf={qs / 'sft' / 'hf'}", f"data.train={labelled['sft_train']}",
                              f"data.validation={labelled['sft_val']}", f"trainer.out_dir={steerlm}",
                              f"trainer.max_steps={args.steerlm_steps}", f"trainer.seed={args.seed}",
                              "trainer.progress=false", "trainer.save_interval=0"])
        timings["steerlm"] = time.perf_counter() - t0

    # 3. SteerLM 2.0: 2 iterations x 2 epochs, sampling for the sweeps' attribute strings
    t0 = time.perf_counter()
    steerlm2 = out / "steerlm2"
    prompts_file = out / "steerlm2_prompts.jsonl"
    rows = [json.loads(line) for line in (world / "prompts_train.jsonl").read_text().splitlines()]
    prompts_file.write_text("".join(json.dumps(r) + "\n" for r in rows[:args.steerlm2_prompts]))
    targets = sorted({label for labels in sweeps().values() for label in labels})
    groups = args.steerlm2_prompts * len(targets)
    batch = min(args.steerlm2_batch, groups)  # (prompt, attribute string) groups per step
    micro = math.gcd(8, batch)  # groups per forward, dividing the batch
    steps_per_iteration = 2 * (groups // batch)
    if not (steerlm2 / "result.json").is_file():
        train("steerlm2", [f"init.hf={steerlm / 'hf'}", f"data.train={prompts_file}",
                           f"steerlm2.sft_model={qs / 'sft' / 'hf'}",
                           f"steerlm2.reward_model={qs / 'rm_regression' / 'hf'}",
                           "steerlm2.targets=[" + ",".join(f"'{t}'" for t in targets) + "]",
                           f"steerlm2.samples_per_prompt={args.samples}",
                           f"steerlm2.generation.max_new_tokens={args.max_new_tokens}",
                           f"optim.lr={args.steerlm2_lr}", f"trainer.global_batch_size={batch}",
                           f"trainer.micro_batch_size={micro}", f"trainer.save_interval={steps_per_iteration}",
                           f"trainer.out_dir={steerlm2}", f"trainer.seed={args.seed}", "trainer.progress=false"])
        timings["steerlm2"] = time.perf_counter() - t0

    # 4. evaluation on held-out prompts, the world's scorer as ground truth
    t0 = time.perf_counter()
    from aligner.data import load_dataset, load_tokenizer
    from aligner.parallel import ParallelConfig, initialize, is_initialized

    if not is_initialized():
        initialize(ParallelConfig())
    tok = load_tokenizer(str(qs / "sft" / "hf"))
    heldout = load_dataset(world / "prompts_heldout.jsonl", kind="prompts", tokenizer=tok,
                           template="extra_id")[:args.heldout]
    ckpts = steerlm2 / "checkpoints"
    models = {"steerlm": steerlm / "hf",
              "steerlm2_iteration1": ckpts / f"step_{steps_per_iteration:07d}",
              "steerlm2_iteration2": ckpts / f"step_{2 * steps_per_iteration:07d}"}
    generations = out / "generations.json"
    if generations.is_file():
        gen = json.loads(generations.read_text())
    else:
        gen = {"sft": {"plain": generate(*load_models(qs / "sft" / "hf"), tok, heldout, None, args.seed,
                                         args.max_new_tokens)}}
        for name, path in models.items():
            gen[name] = evaluate(name, path, tok, heldout, args.seed, args.max_new_tokens)
        generations.write_text(json.dumps(gen))
        timings["evaluation"] = time.perf_counter() - t0
    # the levels of each attribute in the labelled SteerLM training data (what SteerLM saw)
    from aligner.data.formats import parse_attribute_label

    label_counts = {a: {} for a in ATTRS}
    for line in labelled["sft_train"].read_text().splitlines():
        levels = parse_attribute_label(json.loads(line)["conversations"][-1]["label"])
        for a in ATTRS:
            label_counts[a][levels[a]] = label_counts[a].get(levels[a], 0) + 1
    total = sum(label_counts["verbosity"].values())
    seen = {a: {lv for lv, c in label_counts[a].items() if c >= 0.01 * total} for a in ATTRS}

    results = {"settings": vars(args), "heldout_prompts": len(heldout), "targets": targets,
               "timings_s": timings, "models": {},
               "labelled_sft_data_levels": {a: dict(sorted(c.items())) for a, c in label_counts.items()}}
    sft_help = [r["helpfulness"] for r in gen["sft"]["plain"]]
    results["sft"] = {"helpfulness": mean_se(sft_help),
                      "verbosity": mean_se([r["verbosity"] for r in gen["sft"]["plain"]]),
                      "complexity": mean_se([r["complexity"] for r in gen["sft"]["plain"]])}
    for name in models:
        fig = figures(gen[name], seen)
        fig["quality/helpfulness_minus_sft"] = paired(sft_help, [r["helpfulness"] for r in gen[name]["quality"]])
        if name != "steerlm":
            fig["adherence/minus_steerlm"] = paired(adherence_errors(gen["steerlm"]), adherence_errors(gen[name]))
        results["models"][name] = fig
    # how much the world's responses vary in each attribute (what can be steered at all)
    results["world_sft_data_levels"] = {}
    for a in ATTRS:
        counts = {}
        for line in labelled["sft_train"].read_text().splitlines():
            from aligner.data.world import score_response

            row = json.loads(line)
            v = score_response(row, row["conversations"][-1]["value"])[a]
            counts[v] = counts.get(v, 0) + 1
        results["world_sft_data_levels"][a] = dict(sorted(counts.items()))
    results["world_sft_data_levels_by_scorer"] = results.pop("world_sft_data_levels")
    # the reward model's label against the scorer's level, per attribute (SFT conversations):
    # {scorer level: {label: rows}}, and the share of rows whose label equals the scorer's level
    confusion = {a: {} for a in ATTRS}
    for line in labelled["sft_train"].read_text().splitlines():
        row = json.loads(line)
        truth = score_response(row, row["conversations"][-1]["value"])
        levels = parse_attribute_label(row["conversations"][-1]["label"])
        for a in ATTRS:
            cell = confusion[a].setdefault(truth[a], {})
            cell[levels[a]] = cell.get(levels[a], 0) + 1
    results["label_by_scorer_level"] = {a: {lv: dict(sorted(c.items())) for lv, c in sorted(m.items())}
                                        for a, m in confusion.items()}
    results["label_accuracy"] = {a: sum(c.get(lv, 0) for lv, c in m.items()) / sum(sum(c.values()) for c in m.values())
                                 for a, m in confusion.items()}
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    log(f"wrote {out / 'results.json'}")
    for name, fig in results["models"].items():
        log(f"{name}: spearman verbosity {fig['spearman/verbosity']:.3f}, complexity {fig['spearman/complexity']:.3f};"
            f" helpfulness at max quality {fig['quality/helpfulness']['mean']:.3f}"
            f" (SFT {results['sft']['helpfulness']['mean']:.3f});"
            f" adherence {fig['adherence/mean_abs_error']['mean']:.3f} ± {fig['adherence/mean_abs_error']['standard_error']:.3f}")
        for attr in ("verbosity", "complexity"):
            levels = fig[f"measured_by_requested/{attr}"]
            log(f"  {attr} measured by requested 0..4: "
                + ", ".join(f"{levels[lv]['mean']:.2f} ± {levels[lv]['standard_error']:.2f}" for lv in range(5)))
        gain = fig["quality/helpfulness_minus_sft"]
        log(f"  helpfulness at helpfulness 4, correctness 4 minus SFT:"
            f" {gain['mean']:+.3f} ± {gain['standard_error']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
