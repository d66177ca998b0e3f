"""The gold-vs-proxy monitor on tiny models: the sampled KL against the exact KL of an
enumerable case, the logged metrics of a PPO run against an independent recomputation with
transformers, a DPO run with an ensemble proxy (training unchanged by the monitor), and the
over-optimisation demonstration (a proxy that rewards length: the warning fires and the
best-gold policy is not the last)."""
import json
import math
from pathlib import Path

import pytest
import torch

from tests.algorithms.ppo_setup import make_assets, ppo_config
from tests.log_messages import kept_messages

GOLD = {"kind": "function", "function": "tests.algorithms.ppo_setup:word_reward"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("monitor_assets"))


def length_reward(prompts, responses, metadata):
    """A deliberately bad proxy: the number of words."""
    return [float(len(r.split())) for r in responses]


def short_answer_gold(prompts, responses, metadata):
    """The gold of the demonstration: 1 when the row's target word appears, minus 0.25 per word."""
    return [float(m["target"] in r.split()) - 0.25 * len(r.split()) for r, m in zip(responses, metadata)]


def _rows(out_dir, split="monitor"):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def _monitor(assets, **kw):
    cfg = {"enabled": True, "interval": 2, "prompts": assets["prompts"], "num_prompts": 8, "samples_per_prompt": 2,
           "max_new_tokens": 8, "gold": GOLD}
    cfg.update(kw)
    return cfg


# ---------------------------------------------------------------------------- KL
def test_sampled_kl_equals_the_exact_kl_of_an_enumerable_case(assets):
    """One-token responses: KL(π || π_init) = Σ_v π(v) log(π(v) / π_init(v)) is computed
    exactly from transformers' full next-token distributions; the monitor's path (the
    policy's log-probs on the training forward, the initial model through the reference
    role's host swap) over every one of the V responses, weighted by π, equals it, and its
    sampled estimate from 3000 draws lies within 4 standard errors."""
    from transformers import AutoModelForCausalLM

    from aligner.data import load_dataset, load_tokenizer
    from aligner.evaluation.overoptimization import mean_and_se
    from aligner.evaluation.sampling import Samples, response_logps, sample_responses
    from aligner.models import from_pretrained, load_hf_weights
    from aligner.parallel import ParallelConfig, initialize
    from aligner.rollout import RolloutEngine
    from aligner.training.algorithm import StepContext
    from aligner.training.roles import ReferencePolicy

    tok = load_tokenizer(assets["tokenizer"])
    prompt = load_dataset(assets["prompts"], kind="prompts", tokenizer=tok, template="extra_id")[:1]
    ids = prompt[0]["prompt_tokens"]
    with torch.no_grad():
        logits = {k: AutoModelForCausalLM.from_pretrained(assets[k])(ids[None]).logits[0, -1].double()
                  for k in ("policy", "policy_moved")}
    live, init = torch.log_softmax(logits["policy_moved"], -1), torch.log_softmax(logits["policy"], -1)
    V = live.numel()
    exact = float((live.exp() * (live - init)).sum())
    assert exact > 1e-3  # the two policies differ

    initialize(ParallelConfig(seed=0))
    chunks, cfg = from_pretrained(assets["policy"])
    reference = ReferencePolicy(chunks, "host")  # the initial model, as the monitor takes it
    load_hf_weights(chunks, assets["policy_moved"], cfg)  # "training" moved the policy
    P = ids.numel()
    tokens = torch.zeros(V, 8 * math.ceil((P + 1) / 8), dtype=torch.long)
    tokens[:, :P] = ids
    tokens[:, P] = torch.arange(V)
    mask = torch.zeros_like(tokens, dtype=torch.float32)
    mask[:, P] = 1.0
    every = Samples(prompt, V, tokens, mask, torch.ones(V, dtype=torch.long), torch.zeros(V, dtype=torch.bool),
                    [""] * V, [0] * V)
    logp = response_logps(StepContext.run_schedule, chunks, every, 16)
    with reference.active() as ref_chunks:
        ref = response_logps(StepContext.run_schedule, ref_chunks, every, 16)
    torch.testing.assert_close(logp, live, atol=1e-5, rtol=0)  # the training path = transformers
    assert abs(float(logp.exp().sum()) - 1.0) < 1e-5
    assert abs(float((logp.exp() * (logp - ref)).sum()) - exact) < 1e-5

    engine = RolloutEngine(chunks, cfg, tokenizer=tok, max_batch=64)
    drawn = sample_responses(engine, prompt, 3000, max_new_tokens=1, seed=11, stop_token_ids=[])
    ratio = response_logps(StepContext.run_schedule, chunks, drawn, 64)
    with reference.active() as ref_chunks:
        ratio = ratio - response_logps(StepContext.run_schedule, ref_chunks, drawn, 64)
    mean, se = mean_and_se(ratio)
    assert abs(mean - exact) < 4 * se, (mean, se, exact)


# ---------------------------------------------------------------------------- PPO
def test_monitor_metrics_of_a_ppo_run_match_an_independent_recomputation(assets, tmp_path):
    from transformers import AutoModelForCausalLM

    from aligner.algorithms.ppo import PPOTrainer
    from aligner.data import load_dataset, load_tokenizer
    from aligner.evaluation.sampling import load_policy, sample_responses
    from aligner.parallel import destroy
    from tests.algorithms.ppo_setup import word_reward

    out = tmp_path / "ppo"
    cfg = ppo_config(assets, str(out), trainer={"max_steps": 4, "export_hf": True},
                     monitor=_monitor(assets, proxy=[GOLD]))
    PPOTrainer(cfg).fit()
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 2, 4]
    first, last = rows[0], rows[-1]
    assert first["kl"] == 0.0 and first["d"] == 0.0 and first["gold_gain"] == 0.0
    assert last["kl"] > 0 and math.isclose(last["d"], math.sqrt(last["kl"]))
    for r in rows:
        assert r["proxy"] == r["gold"] and r["samples"] == 16 and r["ensemble_var"] == 0.0
    best = json.loads((out / "best_gold" / "monitor.json").read_text())
    assert best["step"] == rows[-1]["best_gold_step"] and best["gold"] == max(r["gold"] for r in rows)
    destroy()

    # independent: sample the exported final policy with the same seeds, score, and take the
    # log-ratio to the initial policy with transformers
    tok = load_tokenizer(assets["tokenizer"])
    prompts = load_dataset(assets["prompts"], kind="prompts", tokenizer=tok, template="extra_id")[:8]
    _, _, engine = load_policy(str(out / "hf"), tok)
    samples = sample_responses(engine, prompts, 2, max_new_tokens=8, seed=0, stop_token_ids=[tok.eos_id])
    gold = word_reward([None] * len(samples), samples.texts, [prompts[j]["meta"] for j in samples.prompt_rows])
    assert math.isclose(sum(gold) / len(gold), last["gold"], rel_tol=1e-12)
    assert math.isclose(float(samples.response_lengths.double().mean()), last["response_length"])
    models = {k: AutoModelForCausalLM.from_pretrained(p).double() for k, p in
              (("final", out / "hf"), ("init", assets["policy"]))}
    ratios = []
    with torch.no_grad():
        for i in range(len(samples)):
            n = int(samples.response_mask[i].nonzero().max()) + 1
            seq = samples.tokens[i, :n][None]
            lp = {k: torch.log_softmax(m(seq).logits[0, :-1], -1).gather(-1, seq[0, 1:, None])[:, 0]
                  for k, m in models.items()}
            resp = samples.response_mask[i, 1:n].bool()
            ratios.append(float((lp["final"] - lp["init"])[resp].sum()))
    assert abs(sum(ratios) / len(ratios) - last["kl"]) < 1e-4, (sum(ratios) / len(ratios), last["kl"])


# ---------------------------------------------------------------------------- DPO
def _dpo_config(assets, tmp_path, out, monitor):
    from tests.algorithms.conftest import write_jsonl

    pairs = [{"system": "be nice", "prompt": f"say {w}", "chosen": "good", "rejected": f"bad {w} no"}
             for w in ("hi", "there", "hello", "friend", "bye", "fine", "ok", "yes")] * 2
    cfg = {"init": {"hf": assets["policy"]},
           "data": {"train": write_jsonl(tmp_path / "pairs.jsonl", pairs), "tokenizer": assets["tokenizer"],
                    "template": "extra_id", "max_length": 64},
           "optim": {"lr": 1e-2}, "dpo": {"beta": 0.5},
           "trainer": {"max_steps": 4, "global_batch_size": 4, "micro_batch_size": 2, "out_dir": str(out),
                       "progress": False, "tensorboard": False, "save_interval": 0, "export_hf": False,
                       "resume": False, "seed": 3}}
    if monitor:
        cfg["monitor"] = monitor
    return cfg


def test_monitor_on_a_dpo_run_with_an_ensemble_proxy_leaves_training_unchanged(assets, tmp_path):
    from aligner.algorithms.dpo import DPOTrainer
    from aligner.parallel import destroy

    # the test reward model records no output names: its first output, by weight
    proxies = [{"kind": "model", "path": assets["rm"], "attribute_weights": [1.0, 0.0, 0.0]}, GOLD]
    with_monitor = DPOTrainer(_dpo_config(assets, tmp_path, tmp_path / "a",
                                          _monitor(assets, proxy=proxies, ensemble="min"))).fit()
    destroy()
    without = DPOTrainer(_dpo_config(assets, tmp_path, tmp_path / "b", None)).fit()
    assert [r["loss"] for r in _rows(tmp_path / "a", "train")] == [r["loss"] for r in _rows(tmp_path / "b", "train")]
    assert with_monitor["train"]["loss"] == without["train"]["loss"]
    rows = _rows(tmp_path / "a")
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert rows[0]["kl"] == 0.0 and rows[-1]["kl"] > 0.0
    for r in rows:
        members = [r["proxy_0"], r["proxy_1"]]
        assert r["proxy"] <= min(members) + 1e-12  # min of the members per sample
        assert r["proxy_1"] == r["gold"]  # the second member is the gold function
        assert r["ensemble_var"] > 0
    assert (tmp_path / "a" / "best_gold" / "config.json").is_file()
    assert not (tmp_path / "b" / "best_gold").exists()


# ---------------------------------------------------------------------------- hacking
def test_a_length_rewarding_proxy_is_caught(assets, tmp_path):
    """RL against a proxy that pays for length: the proxy rises, the gold (which charges
    0.25 per word) falls; the monitor warns, the best-gold policy is an early one, not the
    last, and with ``monitor.early_stop`` training ends at the warning with a checkpoint."""
    from aligner.algorithms.ppo import PPOTrainer
    from aligner.models.checkpoint import find_latest

    out = tmp_path / "hack"
    # a learning rate at which the hacking is clear: gold falls by 0.69 ± 0.19 (paired SE over 64
    # samples) at step 2, beyond the two standard errors a warning needs (at 1e-3, 0.34 ± 0.20: noise)
    cfg = ppo_config(assets, str(out), trainer={"max_steps": 8, "export_hf": False}, optim={"lr": 3e-3},
                     ppo={"reward": {"kind": "function", "function": "tests.evaluation.test_monitor:length_reward"},
                          "generation": {"max_new_tokens": 16}, "kl_coef": 0.0},
                     monitor=_monitor(assets, num_prompts=16, samples_per_prompt=4, max_new_tokens=16,
                                      warn_drop=0.2, early_stop=True,
                                      gold={"kind": "function",
                                            "function": "tests.evaluation.test_monitor:short_answer_gold"}))
    with kept_messages() as messages:
        result = PPOTrainer(cfg).fit()
    rows = _rows(out)
    assert rows[-1]["proxy"] > rows[0]["proxy"] and rows[-1]["gold"] < rows[0]["gold"] - 0.2, rows
    assert rows[-1]["overoptimized"] == 1.0 and all(r["overoptimized"] == 0.0 for r in rows[:-1])
    assert any(m.startswith(f"monitor: reward over-optimisation at step {rows[-1]['step']}:") for m in messages)
    best = json.loads((out / "best_gold" / "monitor.json").read_text())
    assert best["step"] < rows[-1]["step"] and best["gold"] == max(r["gold"] for r in rows)
    # early stop: training ended at the warning, with a checkpoint of that step
    assert result["step"] == rows[-1]["step"] < 8 and result["stopped"].startswith("monitor:")
    assert find_latest(out / "checkpoints").name == f"step_{result['step']:07d}"


def test_best_gold_is_swapped_in_by_renames_and_recovered_after_a_crash(tmp_path):
    from aligner.evaluation.monitor import recover_best_gold, swap_in

    final = tmp_path / "best_gold"
    for step in (1, 2):
        new = tmp_path / f"best_gold.tmp-{step}"
        new.mkdir()
        (new / "monitor.json").write_text(json.dumps({"step": step}))
        swap_in(new, final)
        assert json.loads((final / "monitor.json").read_text())["step"] == step
        assert sorted(p.name for p in tmp_path.iterdir()) == ["best_gold"]
    # a crash after the old folder moved aside and before the new one took its name
    (final).rename(tmp_path / "best_gold.old")
    (tmp_path / "best_gold.tmp-3").mkdir()  # a half-written export
    recover_best_gold(final)
    assert json.loads((final / "monitor.json").read_text())["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_gold"]


def test_an_unnamed_reward_model_is_read_by_the_keys_the_section_has(assets):
    """A reward model with several outputs and no recorded names: a monitor spec (no
    ``attributes`` key) is told to weight its outputs, a reward section to name them."""
    from aligner.rewards.readout import ScoringError
    from aligner.rewards.sources import check_reward_source

    with pytest.raises(ScoringError, match=r"records no names for them \(config.json id2label\); read them by"
                                           r" monitor.proxy\[0\].attribute_weights \(one weight per output\)$"):
        check_reward_source("monitor.proxy[0]", "model", path=assets["rm"], reward_attribute="LABEL_0")
    with pytest.raises(ScoringError, match=r"; name them in pg.reward.attributes$") as err:
        check_reward_source("pg.reward", "model", path=assets["rm"], reward_attribute="helpfulness", names_key=True)
    assert err.value.hint == "or set pg.reward.attribute_weights (one weight per output)"
