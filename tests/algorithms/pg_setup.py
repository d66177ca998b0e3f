"""Configs and reward functions for the REINFORCE-family tests, on the tiny assets of
tests.algorithms.ppo_setup (``make_assets``).

``pg_config(assets, out_dir, **sections)`` is a ``pg`` config dict on them (sections merged
one level deep, as ``ppo_config``). ``length_reward`` scores a response by its number of
words only, so the rewards of a group are all equal exactly when its responses have equal
lengths: groups without signal can be crafted and counted by hand.
"""
from __future__ import annotations

from tests.algorithms.ppo_setup import merge_sections


def pg_config(assets: dict, out_dir: str, **sections) -> dict:
    cfg = {
        "algorithm": "pg",
        "init": {"hf": assets["policy"]},
        "data": {"train": assets["prompts"], "tokenizer": assets["tokenizer"], "template": "extra_id", "max_length": 64},
        "optim": {"lr": 1e-3},
        "trainer": {"max_steps": 2, "global_batch_size": 4, "micro_batch_size": 4, "out_dir": out_dir,
                    "progress": False, "tensorboard": False, "save_interval": 0, "export_hf": False,
                    "resume": False, "seed": 7},
        "pg": {"reward": {"kind": "function", "function": "tests.algorithms.ppo_setup:word_reward"},
               "generation": {"max_new_tokens": 8}, "samples_per_prompt": 4},
    }
    return merge_sections(cfg, sections)


def length_reward(prompts, responses, metadata):
    """The number of words of the response, capped at 3: a pure function of the text."""
    return [float(min(3, len(r.split()))) for r in responses]


def target_reward(prompts, responses, metadata):
    """0 for every response to a prompt whose row's ``target`` is ``ok`` (such groups are
    all equal: no signal), the response's length in characters otherwise."""
    return [0.0 if m["target"] == "ok" else float(len(r)) for r, m in zip(responses, metadata)]


def zero_reward(prompts, responses, metadata):
    """0 for everything: only shaping (the overlong penalty) can give a group signal."""
    return [0.0] * len(responses)
