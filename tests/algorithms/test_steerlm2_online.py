"""SteerLM 2.0 with sampling inside the run (docs/steerlm.md).

- Beta bin probabilities against a numeric integration of the Beta density (the group
  weights and loss by hand: tests/algorithms/losses/test_steerlm.py);
- the scored samples against transformers: ``log Q'(y|a,x)`` (the SteerLM model on the
  labelled prompt), ``log P(y|x)`` (the SFT model on the unlabelled prompt) and
  ``log P(a|x,y)`` (the reward model's outputs through the Beta model) for every sampled
  response; at an iteration's first step the baseline is uniform (Q_θ = Q');
- two steps (sampling, scoring, updates) agree at TP=1, TP=2, PP=2 and DP=2 (1e-5), the
  world-size-2 layouts run one after another in one spawned job.
"""
import json
import math
from pathlib import Path

import pytest
import torch

from aligner.parallel.spawn import spawn_local

TOL = 1e-5
KEYS = ("loss", "grad_norm", "kl_w_b", "weight_max", "sampling/log_p_attr", "sampling/response_tokens",
        "sampling/attribute_error")


def t(x):
    return torch.tensor(x, dtype=torch.float64)


# ====================================================================== losses by hand
def _beta_mass_numeric(lo, hi, a, b, steps=20000):
    """∫_lo^hi Beta(x; a, b) dx by composite Simpson on the log-density (a, b > 1: a smooth integrand)."""
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    h = (hi - lo) / steps

    def pdf(x):
        if x <= 0.0 or x >= 1.0:
            return 0.0
        return math.exp(log_norm + (a - 1) * math.log(x) + (b - 1) * math.log1p(-x))

    total = pdf(lo) + pdf(hi)
    for k in range(1, steps):
        total += (4 if k % 2 else 2) * pdf(lo + k * h)
    return total * h / 3


def test_beta_bin_probabilities_against_numeric_integration():
    from aligner.algorithms.losses.steerlm import attribute_log_likelihood

    for pred in (0.55, 1.3, 2.0, 2.71, 3.46):
        r = pred / 4
        a = 24 * r
        for level in range(5):
            want = _beta_mass_numeric(level / 5, (level + 1) / 5, a, 24 - a)
            got = math.exp(float(attribute_log_likelihood(t([[pred]]), torch.tensor([[level]]))[0]))
            assert abs(got - want) < 1e-9, (pred, level, got, want)


# ====================================================================== the run, layouts
def _layout_steps(workdir, assets, tp, pp):
    from aligner.algorithms.steerlm import SteerLM2Trainer
    from aligner.training.loop import TrainingLoop
    from tests.algorithms.steerlm2_setup import steerlm2_config

    cfg = steerlm2_config(assets, workdir, parallel={"tp": tp, "pp": pp})
    trainer = SteerLM2Trainer(cfg)
    trainer.init_parallel()
    prompts = trainer.prompt_groups()
    policy = trainer.build_models()
    roles, algo = trainer.build_sampling(policy, prompts)
    loop = TrainingLoop(algo, policy, prompts, optim=trainer.cfg.optim, trainer=trainer.cfg.trainer, roles=roles)
    steps = [loop.train_step() for _ in range(2)]
    return [{k: m[k] for k in KEYS} for m in steps]


def run_world(workdir, assets, layouts):
    """The layouts (tp, pp) one after another in this job (the parallel state rebuilt in between)."""
    from megatron.core import parallel_state as ps

    from aligner.parallel import ParallelConfig, initialize

    out = {}
    for name, tp, pp in layouts:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        initialize(ParallelConfig(tp=tp, pp=pp, seed=5))
        out[name] = _layout_steps(f"{workdir}/{name}", assets, tp, pp)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.algorithms.steerlm2_setup import make_assets

    w = tmp_path_factory.mktemp("steerlm2_online")
    assets = make_assets(w / "assets")
    one = spawn_local(run_world, 1, str(w), assets, [("tp1", 1, 1)], timeout=600)
    two = spawn_local(run_world, 2, str(w), assets, [("tp2", 2, 1), ("pp2", 1, 2), ("dp2", 1, 1)], timeout=900)
    return w, assets, one, two


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_two_steps_agree_across_layouts(runs, layout):
    _, _, one, two = runs
    ref = one[0]["tp1"]
    assert ref[0]["loss"] != ref[1]["loss"] and ref[0]["grad_norm"] > 0
    for rank_out in two:
        for step, (a, b) in enumerate(zip(ref, rank_out[layout])):
            for key in KEYS:
                assert abs(a[key] - b[key]) <= TOL * max(1.0, abs(a[key])), (layout, step, key, a[key], b[key])


def _hf_logps(model, prompt, response):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].double()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(lp[len(prompt) - 1:].sum())


def test_scored_samples_match_transformers(runs):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from aligner.algorithms.losses.steerlm import attribute_log_likelihood
    from aligner.data import load_tokenizer
    from aligner.data.datasets import render_extra_id
    from aligner.data.formats import Conversation, Turn, parse_attribute_label
    from tests.algorithms.steerlm2_setup import ATTRS

    w, assets, one, _ = runs
    rows = [json.loads(line) for line in Path(w, "tp1", "steerlm2_samples", "iteration_0.jsonl").read_text().splitlines()]
    assert len(rows) == 32 and all(len(r["responses"]) == 4 for r in rows)
    tok = load_tokenizer(assets["tokenizer"])
    steerlm = AutoModelForCausalLM.from_pretrained(assets["steerlm"]).eval()
    sft = AutoModelForCausalLM.from_pretrained(assets["sft"]).eval()
    rm = AutoModelForSequenceClassification.from_pretrained(assets["rm"]).eval()
    distinct, kls = 0, []
    for row in rows[:8]:
        conv = Conversation([Turn("user", row["prompt_turns"][0]["value"])], row.get("system"))
        labelled, _ = render_extra_id(tok, conv, label=row["label"])
        plain, _ = render_extra_id(tok, conv)
        assert row["label"] in tok.decode(labelled)
        levels = parse_attribute_label(row["label"])
        for r in row["responses"]:
            assert abs(_hf_logps(steerlm, labelled, r["tokens"]) - r["log(Q(y|a,x))"]) < 1e-4
            assert abs(_hf_logps(sft, plain, r["tokens"]) - r["log(P(y|x))"]) < 1e-4
            rm_ids, _ = render_extra_id(tok, conv, r["value"], end="extra_id")
            with torch.no_grad():
                pred = rm(torch.tensor([rm_ids])).logits[0].double()
            torch.testing.assert_close(pred, t([r["attributes"][a] for a in ATTRS]), atol=1e-4, rtol=0)
            stored = t([[r["attributes"][a] for a in ATTRS]])
            want = attribute_log_likelihood(stored, torch.tensor([[levels[a] for a in ATTRS]]))[0]
            assert abs(float(want) - r["log(P(a|x,y))"]) < 1e-9
        distinct += len({tuple(r["tokens"]) for r in row["responses"]}) > 1
    assert distinct >= 6, "the groups need distinct responses to weigh"
    # step 1 of an iteration: Q_θ = Q', so b' is uniform and the distance is Σ w' log(n w')
    from aligner.training.loop import epoch_order

    by_index = {r["index"]: r for r in rows}
    for i in epoch_order(len(rows), 7, 0)[:16].tolist():
        row = by_index[i]
        logits = t([r["log(P(a|x,y))"] + r["log(P(y|x))"] - r["log(Q(y|a,x))"] for r in row["responses"]])
        wp = torch.softmax(logits, 0)
        kls.append(float((wp * (wp * len(wp)).log()).sum()))
    ref = one[0]["tp1"][0]
    assert abs(ref["kl_w_b"] - sum(kls) / len(kls)) < 1e-5, (ref["kl_w_b"], sum(kls) / len(kls))


def test_a_samples_file_trains_as_a_prescored_file(runs, tmp_path):
    """The samples file a run writes is a pre-scored steerlm2 file: `aligner train steerlm2`
    trains on it with no sampling (one iteration; two are refused, naming the key)."""
    from aligner.algorithms.steerlm import SteerLM2Trainer
    from aligner.training.config import ConfigError
    from tests.algorithms.steerlm2_setup import steerlm2_config

    w, assets, _, _ = runs
    scored = str(Path(w, "tp1", "steerlm2_samples", "iteration_0.jsonl"))
    no_sampling = {"epochs": 1, "sft_model": None, "reward_model": None}
    with pytest.raises(ConfigError, match="steerlm2.iterations = 2: data.train is a pre-scored steerlm2 file"):
        SteerLM2Trainer(steerlm2_config(assets, str(tmp_path / "two"), data={"train": scored},
                                        steerlm2=no_sampling)).preflight()
    out = tmp_path / "prescored"
    result = SteerLM2Trainer(steerlm2_config(assets, str(out), data={"train": scored},
                                             steerlm2=dict(no_sampling, iterations=1))).fit()
    assert result["step"] == 2  # 32 groups, 16 per step, one epoch
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["kl_w_b"] > 0 and r["grad_norm"] > 0 for r in rows)
    assert not (out / "steerlm2_samples").exists()


# ====================================================================== prompt lengths
# (prompt, tokens without / with the attribute turn): <extra_id_0> System be nice <extra_id_1>
# User, the words, <extra_id_1> Assistant; the attribute turn adds <extra_id_2> and the label
LENGTH_ROWS = [("say hi", 10, 12), ("say a word please now", 13, 15), ("say a word please now yes", 14, 16)]


@pytest.fixture(scope="module")
def length_assets(tmp_path_factory):
    from tests.algorithms.steerlm2_setup import make_assets

    w = tmp_path_factory.mktemp("steerlm2_lengths")
    assets = make_assets(w / "assets")
    path = w / "prompts.jsonl"
    path.write_text("".join(json.dumps({"system": "be nice", "prompt": p}) + "\n" for p, _, _ in LENGTH_ROWS))
    return w, assets, path


@pytest.mark.parametrize("overlong", ["truncate_left", "drop", "error"])
def test_prompt_groups_follow_data_overlong_with_their_attribute_turn(length_assets, overlong, capsys):
    """data.max_length = 13: each row's two groups (steerlm2.targets) render 12, 15 and 16
    tokens; the fitted prompt is the labelled one, the SFT prompt loses the same tokens."""
    from aligner.algorithms.steerlm import SteerLM2Trainer
    from aligner.data import DataFormatError
    from tests.algorithms.ppo_setup import SPECIAL, WORDS
    from tests.algorithms.steerlm2_setup import LABEL_WORDS, TARGETS, steerlm2_config
    from tests.word_tokenizer import word_vocab

    w, assets, path = length_assets
    v = word_vocab(WORDS + LABEL_WORDS, SPECIAL)
    cfg = steerlm2_config(assets, str(w / f"run_{overlong}"), data={"train": str(path), "max_length": 13,
                                                                     "overlong": overlong})
    trainer = SteerLM2Trainer(cfg)
    if overlong == "error":
        with pytest.raises(DataFormatError) as err:
            trainer.prompt_groups()
        assert str(err.value) == (f"{path}:2: the prompt has 15 tokens, more than max_length = 13 (overlong = error;"
                                  " truncate_left or drop would fit the row)")
        return
    groups = trainer.prompt_groups()

    def sft(words):
        return [v[x] for x in ["<extra_id_0>", "System", "be", "nice", "<extra_id_1>", "User", *words.split(),
                               "<extra_id_1>", "Assistant"]]

    expected = []
    for (prompt, _, labelled), target in [(row, t) for row in LENGTH_ROWS for t in TARGETS]:
        cut = labelled - 13
        if cut > 0 and overlong == "drop":
            continue
        cut = max(cut, 0)
        expected.append((sft(prompt)[cut:] + [v["<extra_id_2>"], v[target]], sft(prompt)[cut:], target))
    got = [(g["prompt_tokens"].tolist(), g["sft_prompt_tokens"].tolist(), g["label"]) for g in groups]
    assert got == expected
    assert [g["index"] for g in groups] == list(range(len(expected)))
    reason = "dropped_overlong" if overlong == "drop" else "truncated_left"
    assert f"aligner data: {path}: {len(expected)} prompt groups; {reason}: 4" in capsys.readouterr().err.splitlines()
