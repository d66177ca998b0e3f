"""Tiny assets for the SteerLM 2.0 tests, made here with transformers (no run folder).

``make_assets(dir)`` writes a word-level HF tokenizer (:mod:`tests.algorithms.ppo_setup`),
a random tiny Llama SteerLM policy, a nearby one as the SFT model, a random tiny Llama
reward model with the five HelpSteer2 attribute outputs (named in ``id2label``) and a file
of 16 prompts; ``steerlm2_config(assets, out_dir, **overrides)`` a sampling SteerLM 2.0
config dict on them (2 iterations x 2 epochs of 2 steps).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from tests.algorithms.ppo_setup import WORDS, _llama_config, make_tokenizer, merge_sections

ATTRS = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]
TARGETS = ["helpfulness:4,correctness:4,coherence:4,complexity:2,verbosity:1",
           "helpfulness:3,correctness:4,coherence:4,complexity:1,verbosity:3"]
# attribute strings that are words of the test tokenizer (others read as <unk>)
LABEL_WORDS = TARGETS + ["helpfulness:2,correctness:4,coherence:4,complexity:1,verbosity:3"]


def make_assets(base) -> dict:
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    base = Path(base)
    tok_dir = make_tokenizer(base / "tokenizer", words=WORDS + LABEL_WORDS)
    vocab = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"])
    torch.manual_seed(3)
    policy = LlamaForCausalLM(_llama_config(vocab))
    with torch.no_grad():  # a peaked policy: short responses, several distinct ones per group
        policy.lm_head.weight.mul_(6.0)
        policy.lm_head.weight[3].add_(0.4 * policy.lm_head.weight.abs().mean())  # "</s>" likelier
    policy.save_pretrained(base / "steerlm")
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.cos(torch.arange(p.numel(), dtype=p.dtype)).reshape(p.shape))
    policy.save_pretrained(base / "sft")
    cfg = _llama_config(vocab, num_labels=5)
    cfg.id2label = dict(enumerate(ATTRS))
    cfg.label2id = {a: i for i, a in enumerate(ATTRS)}
    rm = LlamaForSequenceClassification(cfg)
    with torch.no_grad():  # predictions spread over the 0..4 scale
        rm.score.weight.mul_(20.0)
    rm.save_pretrained(base / "rm")
    for folder in ("steerlm", "sft", "rm"):
        for f in tok_dir.iterdir():
            (base / folder / f.name).write_bytes(f.read_bytes())
    rng = random.Random(2)
    content = [w for w in WORDS if w not in ("System", "User", "Assistant")]
    with open(base / "prompts.jsonl", "w") as f:
        for _ in range(16):
            words = " ".join(rng.choice(content) for _ in range(rng.randint(1, 5)))
            f.write(json.dumps({"system": "be nice", "prompt": f"say {words}"}) + "\n")
    return {"tokenizer": str(tok_dir), "steerlm": str(base / "steerlm"), "sft": str(base / "sft"),
            "rm": str(base / "rm"), "prompts": str(base / "prompts.jsonl"), "vocab": vocab}


def steerlm2_config(assets: dict, out_dir: str, **sections) -> dict:
    cfg = {
        "algorithm": "steerlm2",
        "init": {"hf": assets["steerlm"]},
        "data": {"train": assets["prompts"], "tokenizer": assets["tokenizer"], "template": "extra_id", "max_length": 64},
        "optim": {"lr": 1e-3, "schedule": "constant", "warmup_steps": 0},
        "trainer": {"max_steps": -1, "global_batch_size": 16, "micro_batch_size": 2, "out_dir": out_dir,
                    "progress": False, "tensorboard": False, "save_interval": 0, "export_hf": False,
                    "resume": False, "seed": 7},
        "steerlm2": {"iterations": 2, "epochs": 2, "samples_per_prompt": 4, "targets": TARGETS,
                     "sft_model": assets["sft"], "reward_model": assets["rm"],
                     "generation": {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0}},
    }
    return merge_sections(cfg, sections)
