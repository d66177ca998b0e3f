"""Tiny assets for the online-RL tests, made here with transformers and tokenizers (no run folder).

``make_assets(dir)`` writes a word-level HF tokenizer, a prompt file, a random tiny Llama
policy, a random tiny Qwen3-MoE policy (4 experts, top 2) and a random tiny 3-output Llama
reward model (HF folders), and returns their paths.
``word_reward`` is a reward function (``tests.algorithms.ppo_setup:word_reward``);
``ppo_config(assets, out_dir, **overrides)`` a PPO config dict on them; ``first_step(trainer,
cfg, assets, micro_batch_size)`` a trainer's roles, algorithm and step-0 context, built as
``fit`` builds them, with the policy moved away from its reference.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from tests.word_tokenizer import save_word_tokenizer

SPECIAL = ["<extra_id_0>", "<extra_id_1>", "<extra_id_2>"]
WORDS = ["System", "User", "Assistant", "be", "nice", "hi", "there", "hello", "friend", "bye", "fine", "ok",
         "good", "bad", "what", "is", "2", "4", "say", "a", "word", "please", "now", "yes", "no", "the", "answer"]
HIDDEN, LAYERS, HEADS, GROUPS, CONTEXT = 32, 2, 4, 2, 64


def make_tokenizer(out: Path, words=WORDS, seed: int = 0) -> Path:
    """A word-level HF tokenizer; ``seed`` shuffles the word ids (another tokenizer, same words)."""
    return save_word_tokenizer(out, words, SPECIAL, seed)


def _llama_config(vocab: int, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, num_key_value_heads=GROUPS, max_position_embeddings=CONTEXT,
                       tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3, **kw)


def make_assets(base) -> dict:
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    base = Path(base)
    tok_dir = make_tokenizer(base / "tokenizer")
    vocab = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]) + 0
    torch.manual_seed(0)
    policy = LlamaForCausalLM(_llama_config(vocab))
    with torch.no_grad():  # a policy with a preference: tokens "good" and "</s>" likelier
        policy.lm_head.weight.mul_(8.0)
    policy.save_pretrained(base / "policy")
    with torch.no_grad():  # a nearby policy: trained weights to compare with the initial ones
        for p in policy.parameters():
            p.add_(0.01 * torch.sin(torch.arange(p.numel(), dtype=p.dtype)).reshape(p.shape))
    policy.save_pretrained(base / "policy_moved")
    for f in tok_dir.iterdir():
        (base / "policy" / f.name).write_bytes(f.read_bytes())
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    moe = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, moe_intermediate_size=HIDDEN,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=GROUPS, head_dim=HIDDEN // HEADS, max_position_embeddings=CONTEXT, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=2, eos_token_id=3))
    with torch.no_grad():  # as the Llama policy: a preference for some tokens
        moe.lm_head.weight.mul_(8.0)
    moe.save_pretrained(base / "policy_moe")
    for f in tok_dir.iterdir():
        (base / "policy_moe" / f.name).write_bytes(f.read_bytes())
    rm = LlamaForSequenceClassification(_llama_config(vocab, num_labels=3))
    rm.save_pretrained(base / "rm")
    for f in tok_dir.iterdir():
        (base / "rm" / f.name).write_bytes(f.read_bytes())
    rng = random.Random(1)
    content = [w for w in WORDS if w not in ("System", "User", "Assistant")]
    with open(base / "prompts.jsonl", "w") as f:
        for i in range(48):
            words = " ".join(rng.choice(content) for _ in range(rng.randint(1, 6)))
            f.write(json.dumps({"system": "be nice", "prompt": f"say {words}", "target": rng.choice(["good", "ok"])})
                    + "\n")
    return {"tokenizer": str(tok_dir), "policy": str(base / "policy"), "policy_moved": str(base / "policy_moved"),
            "policy_moe": str(base / "policy_moe"),
            "rm": str(base / "rm"),
            "prompts": str(base / "prompts.jsonl"), "vocab": vocab}


def word_reward(prompts, responses, metadata):
    """+1 per occurrence of the prompt row's ``target`` word, −0.25 per other word (max 3)."""
    out = []
    for r, m in zip(responses, metadata):
        words = r.split()
        hits = sum(w == m["target"] for w in words)
        out.append(min(3.0, hits) - 0.25 * (len(words) - hits))
    return out


def merge_sections(cfg: dict, sections: dict) -> dict:
    """``cfg`` with each of ``sections``' values set, merged one level deep below a section
    (``{"ppo": {"generation": {"max_new_tokens": 4}}}`` changes only that key)."""
    for section, values in sections.items():
        cfg.setdefault(section, {})
        for k, v in values.items():
            if isinstance(v, dict) and isinstance(cfg[section].get(k), dict):
                cfg[section][k].update(v)
            else:
                cfg[section][k] = v
    return cfg


def ppo_config(assets: dict, out_dir: str, **sections) -> dict:
    cfg = {
        "algorithm": "ppo",
        "init": {"hf": assets["policy"]},
        "data": {"train": assets["prompts"], "tokenizer": assets["tokenizer"], "template": "extra_id", "max_length": 64},
        "optim": {"lr": 1e-3},
        "trainer": {"max_steps": 2, "global_batch_size": 8, "micro_batch_size": 4, "out_dir": out_dir,
                    "progress": False, "tensorboard": False, "save_interval": 0, "export_hf": False,
                    "resume": False, "seed": 7},
        "ppo": {"reward": {"kind": "function", "function": "tests.algorithms.ppo_setup:word_reward"},
                "generation": {"max_new_tokens": 8}, "critic_init": "policy",
                "critic_optim": {"lr": 1e-3}},
    }
    return merge_sections(cfg, sections)


def first_step(trainer, cfg: dict, assets: dict, micro_batch_size: int, seed: int = 7):
    """``(roles, algorithm, context)`` of ``trainer`` (a PG or PPO trainer of ``cfg``) at step 0,
    built as ``fit`` builds them, with the policy's weights those of ``assets["policy_moved"]``:
    moved away from the reference (the initial weights), so the KL terms are not 0."""
    from aligner.models import load_hf_weights
    from aligner.training.algorithm import StepContext
    from aligner.training.loop import TrainingLoop

    trainer.init_parallel()
    train = trainer.load_data(cfg["data"]["train"])
    policy = trainer.build_models()
    roles, algo = trainer.build_roles(policy, len(train))
    loop = TrainingLoop(algo, policy, train, optim=trainer.cfg.optim, trainer=trainer.cfg.trainer, roles=roles)
    load_hf_weights(roles["policy"].modules, assets["policy_moved"], trainer.model_config())
    samples = loop.global_batch(0)
    context = StepContext(roles=loop.roles, step=0, samples=samples, local_samples=loop.local_share(samples),
                          micro_batch_size=micro_batch_size, seed=seed)
    return roles, algo, context
