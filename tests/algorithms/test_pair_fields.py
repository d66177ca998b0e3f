"""Every optional field a pair format documents reaches the loss that uses it, checked on
the value logged at step 1 (policy = reference, so DPO's implicit reward difference is 0;
for BT, chosen = rejected gives Δ = 0): ``chosen_reward`` / ``rejected_reward`` for RPO,
``margin`` for margin DPO and margin BT (else the strength). Also: pair throughput counts
both responses, and packed pairs are sized as pairs (refused before training when they
cannot fit, with the max_length they need)."""
import json
import math
from pathlib import Path

import pytest

from aligner.parallel.spawn import spawn_local
from tests.algorithms.conftest import write_jsonl

PROMPT = "what is the sum of two and three"
RESPONSES = [("five", "four i think"), ("it is five", "six"), ("five i think", "no"), ("yes five", "maybe seven")]


def softplus(x):
    return math.log1p(math.exp(x))


def _pairs(**fields):
    return [dict({"prompt": PROMPT, "chosen": c, "rejected": r}, **fields) for c, r in RESPONSES]


def _cfg(kind, hf_dir, train, out, **sections):
    cfg = {
        "algorithm": kind,
        "init": {"hf": hf_dir if kind == "dpo" else None},  # reward models: random initialisation
        "model": {} if kind == "dpo" else {"arch": "llama", "vocab_size": 64, "hidden_size": 32, "ffn_hidden_size": 64,
                                           "num_layers": 2, "num_attention_heads": 4, "num_query_groups": 2,
                                           "max_position_embeddings": 64, "make_vocab_size_divisible_by": 64},
        "data": {"train": train, "tokenizer": hf_dir, "template": "raw", "max_length": 64},
        "optim": {"lr": 1e-3},
        "trainer": {"max_steps": 1, "global_batch_size": 4, "micro_batch_size": 2, "out_dir": out,
                    "export_hf": False, "progress": False, "tensorboard": False, "resume": False},
    }
    if kind == "dpo":
        cfg["dpo"] = {"sft_weight": 0.0}  # the losses alone (conf/dpo.yaml adds an SFT term)
    for name, section in sections.items():
        cfg.setdefault(name, {}).update(section)
    return cfg


def run_all(hf_dir, files, root):
    """Step-1 metrics of each configured run (or the error it raised, as text)."""
    from aligner.algorithms.dpo import DPOTrainer
    from aligner.algorithms.reward import RewardModelTrainer

    runs = {
        "rpo_sq": ("dpo", "rewards", {"dpo": {"loss_type": "rpo_sq", "eta": 1.0, "beta": 0.1}}),
        "rpo_sq_eta": ("dpo", "rewards", {"dpo": {"loss_type": "rpo_sq", "eta": 0.5, "beta": 0.1}}),
        "rpo_without_rewards": ("dpo", "plain", {"dpo": {"loss_type": "rpo_sq"}}),
        "margin_dpo_3": ("dpo", "margin3", {"dpo": {"loss_type": "margin_dpo", "beta": 0.1}}),
        "margin_dpo_none": ("dpo", "plain", {"dpo": {"loss_type": "margin_dpo", "beta": 0.1}}),
        "dpo": ("dpo", "plain", {"dpo": {"loss_type": "dpo", "beta": 0.1}}),
        "dpo_packed": ("dpo", "plain", {"dpo": {"loss_type": "dpo"}, "data": {"packing": True, "max_length": 32}}),
        "dpo_packed_cut": ("dpo", "plain", {"dpo": {"loss_type": "dpo"}, "data": {"packing": True, "max_length": 16}}),
        "bt_margin_3": ("rm", "same_margin3", {"rm": {"mode": "bt", "bt_kind": "margin", "attributes": ["helpfulness"]}}),
        "bt_margin_none": ("rm", "same_strength2", {"rm": {"mode": "bt", "bt_kind": "margin",
                                                           "attributes": ["helpfulness"]}}),
        "bt": ("rm", "plain", {"rm": {"mode": "bt", "attributes": ["helpfulness"]}}),
    }
    out = {}
    for name, (kind, data, sections) in runs.items():
        trainer = (DPOTrainer if kind == "dpo" else RewardModelTrainer)(
            _cfg(kind, hf_dir, files[data], f"{root}/{name}", **sections))
        try:
            trainer.fit()
        except ValueError as exc:
            out[name] = str(exc)
            continue
        rows = [json.loads(line) for line in (Path(root) / name / "metrics.jsonl").read_text().splitlines()]
        out[name] = next(r for r in rows if r["split"] == "train" and r["step"] == 1)
    return out


@pytest.fixture(scope="module")
def step1(tiny_hf, tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    same = [dict(p, rejected=p["chosen"]) for p in _pairs()]
    files = {
        "plain": write_jsonl(d / "plain.jsonl", _pairs()),
        "rewards": write_jsonl(d / "rewards.jsonl", _pairs(chosen_reward=3, rejected_reward=1)),
        "margin3": write_jsonl(d / "margin3.jsonl", _pairs(margin=3)),
        "same_margin3": write_jsonl(d / "same_margin3.jsonl", [dict(p, margin=3, strength=2) for p in same]),
        "same_strength2": write_jsonl(d / "same_strength2.jsonl", [dict(p, strength=2) for p in same]),
    }
    return spawn_local(run_all, 1, str(tiny_hf["dir"]), files, str(d / "runs"), timeout=900)[0]


def test_rpo_uses_the_rows_rewards(step1):
    # (βΔ - η(r*_c - r*_r))² with Δ = 0 at step 1: (0 - 1·2)² = 4, and (0 - 0.5·2)² = 1
    assert abs(step1["rpo_sq"]["loss/preference"] - 4.0) < 1e-6
    assert abs(step1["rpo_sq_eta"]["loss/preference"] - 1.0) < 1e-6
    assert "chosen_reward" in step1["rpo_without_rewards"] and "4 training pairs" in step1["rpo_without_rewards"]


def test_margin_dpo_uses_the_rows_margin(step1):
    # -logσ(βΔ - m) with Δ = 0: m = 3 -> softplus(3); no margin -> the strength (1.0 for plain pairs)
    assert abs(step1["margin_dpo_3"]["loss"] - softplus(3.0)) < 1e-6  # 3.048587
    assert abs(step1["margin_dpo_none"]["loss"] - softplus(1.0)) < 1e-6  # 1.313262


def test_margin_bt_uses_the_rows_margin(step1):
    # chosen = rejected: Δ = 0 exactly; -logσ(0 - m): the margin (3) wins over the strength (2)
    assert step1["bt_margin_3"]["reward_chosen"] == step1["bt_margin_3"]["reward_rejected"]
    assert abs(step1["bt_margin_3"]["loss"] - softplus(3.0)) < 1e-6
    assert abs(step1["bt_margin_none"]["loss"] - softplus(2.0)) < 1e-6


def _pair_tokens(hf_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    n = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    # raw template: prompt + response + EOS, for both responses of every pair
    return sum(2 * n(PROMPT) + n(c) + n(r) + 2 for c, r in RESPONSES)


@pytest.mark.parametrize("run", ["dpo", "bt", "dpo_packed"])
def test_pair_throughput_counts_both_responses(step1, tiny_hf, run):
    m = step1[run]
    assert round(m["tokens_per_s"] * m["step_time"]) == _pair_tokens(str(tiny_hf["dir"]))


def test_packed_pairs_are_sized_as_pairs(step1):
    # max_length 16: every pair (22 tokens, each response under 16) fits no bin whole; the
    # overlong policy (truncate_left) cuts the prompt from the left of both responses so the
    # pair fits one bin of 16, and the step runs (it crashed in the packer before)
    m = step1["dpo_packed_cut"]
    assert abs(m["loss"] - math.log(2)) < 1e-6
    assert round(m["tokens_per_s"] * m["step_time"]) == 4 * 16


def test_packing_refuses_a_pair_that_cannot_fit_before_training():
    import torch
    from types import SimpleNamespace

    from aligner.algorithms.dpo import DPOAlgorithm

    def pair(n_c, n_r, line):
        return {"chosen": torch.ones(n_c, dtype=torch.long), "chosen_loss_mask": torch.ones(n_c),
                "rejected": torch.ones(n_r, dtype=torch.long), "rejected_loss_mask": torch.ones(n_r), "line": line}

    loop = SimpleNamespace(train_data=[pair(5, 6, 1), pair(12, 10, 2), pair(9, 9, 3)], val_data=None)
    with pytest.raises(ValueError, match=r"2 training sample\(s\).*line 2\) has 22 tokens \(12 \+ 10\).*"
                                         r"data.max_length >= 22"):
        DPOAlgorithm(0, packing=True, capacity=16).setup(loop)
