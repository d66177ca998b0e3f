"""n responses per prompt from a policy, scored by reward sources (docs/monitor.md).

Shared by the gold-vs-proxy monitor, ``aligner rm bon`` and ``aligner data pairs``.
Sample ``k`` of the prompt at position ``j`` of the prompt list draws from the seed
``seed_for(seed, j · N + k)`` (N samples per prompt): the same responses for the same
policy whatever the batching, process count or call order.

Notation: P prompts, N samples per prompt, n = P·N rows, S positions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from aligner.config import ConfigError
from aligner.data.world import ATTRS
from aligner.models import ModelConfig, from_pretrained
from aligner.parallel import ParallelConfig, initialize, is_initialized, padded_length
from aligner.rewards.config import RewardSpec
from aligner.rewards.kinds import build_reward
from aligner.rewards.readout import reward_readout
from aligner.rewards.sources import RewardBatch, RewardModel, RewardSource
from aligner.rollout import GenerationConfig, RolloutEngine, seed_for
from aligner.training.forward import collect_token_outputs, policy_logps


@dataclass
class Samples:
    """The responses of :func:`sample_responses`, rows ``j·N + k`` (prompt j, sample k).

    tokens: [n, S] prompt + response, right-padded; response_mask: [n, S] 1 on response
    tokens (a final stop token included: it is a sampled token); response_lengths [n];
    truncated [n] bool (ended without a stop token); texts: decoded responses (final stop
    token left out); prompt_rows: the prompt each row belongs to (index into ``prompts``).
    """

    prompts: List[dict]
    samples_per_prompt: int
    tokens: torch.Tensor
    response_mask: torch.Tensor
    response_lengths: torch.Tensor
    truncated: torch.Tensor
    texts: List[str]
    prompt_rows: List[int]
    scores: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    def reward_batch(self, step: int = 0) -> RewardBatch:
        meta = [dict(self.prompts[j].get("meta", {})) for j in self.prompt_rows]
        return RewardBatch(prompts=[self.prompts[j]["prompt"] for j in self.prompt_rows], responses=list(self.texts),
                           metadata=meta, step=step, sample_indices=list(range(len(self))))


def sample_responses(engine, prompts: Sequence[dict], samples_per_prompt: int, *, max_new_tokens: int, seed: int,
                     stop_token_ids: Optional[List[int]] = None, first_index: int = 0) -> Samples:
    """``samples_per_prompt`` (N) responses per prompt from the engine's policy at
    temperature 1 (the policy's own distribution: what a KL to another policy is taken
    over), seeds as in the module docstring. prompts: rows of the data layer's ``prompts``
    kind (``prompt_tokens``, ``prompt``, ``meta``); first_index: the position of
    ``prompts[0]`` in the whole prompt list (a data-parallel rank's share)."""
    N = samples_per_prompt
    rows, seeds, owner = [], [], []
    for j, p in enumerate(prompts):
        for k in range(N):
            rows.append(p["prompt_tokens"].tolist())
            seeds.append(seed_for(seed, (first_index + j) * N + k))
            owner.append(j)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed, stop_token_ids=stop_token_ids)
    result = engine.generate(rows, gen, seeds=seeds)
    n = len(rows)
    S = padded_length(int(result.lengths.max()))
    tokens = torch.full((n, S), result.pad_id, dtype=torch.long)
    tokens[:, :result.tokens.shape[1]] = result.tokens
    mask = torch.zeros(n, S)
    for i in range(n):
        p, r = int(result.prompt_lengths[i]), int(result.response_lengths[i])
        mask[i, p:p + r] = 1.0
    texts = []
    tok = engine.tokenizer
    for i in range(n):
        ids = result.response_tokens(i)
        if result.stop_reasons[i] == "stop_token":
            ids = ids[:-1]
        texts.append(tok.decode(ids))
    return Samples(list(prompts), N, tokens, mask, result.response_lengths.clone(),
                   torch.tensor([r != "stop_token" for r in result.stop_reasons]), texts, owner)


def response_logps(run_schedule, chunks, samples: Samples, micro_batch_size: int, from_last_stage=None) -> torch.Tensor:
    """``Σ_t log π(y_t)`` over each row's response tokens under ``chunks`` (the training
    forward path, forward only): [n] float64."""
    last = from_last_stage or (lambda x: x)
    per_token = collect_token_outputs(run_schedule, chunks, samples.tokens, micro_batch_size, policy_logps, last)
    return (per_token.double() * samples.response_mask.double()).sum(-1)


def parse_reward_spec(text: str, option: str = "--reward"):
    """A reward given on a command line as a :class:`aligner.rewards.config.RewardSpec`:
    ``world`` (or ``world:ATTRIBUTE``: the world's scorer, helpfulness by default), an HF
    reward-model folder, or ``package.module:function``. A ConfigError naming ``option``
    for text that is none of these, or an attribute the world's scorer does not have."""
    if text == "world" or text.startswith("world:"):
        attribute = text.partition(":")[2] or "helpfulness"
        if attribute not in ATTRS:
            raise ConfigError(f"{option} {text!r}: {attribute!r} is not an attribute of the world's scorer;"
                              f" expected world or world:ATTRIBUTE with ATTRIBUTE one of {', '.join(ATTRS)}")
        return RewardSpec(kind="world", reward_attribute=attribute)
    if Path(text).is_dir():
        return RewardSpec(kind="model", path=text)
    if ":" in text and not text.startswith(("/", ".")):
        return RewardSpec(kind="function", function=text)
    raise ConfigError(f"{option} {text!r}: expected 'world', an HF reward-model folder or package.module:function"
                      + (" (no such folder)" if "/" in text else ""))


def build_reward_source(spec, tokenizer=None, micro_batch_size: int = 8, where: str = "reward") -> RewardSource:
    """The reward source of a :class:`aligner.rewards.config.RewardSpec` (or a dict of its
    fields). A reward model without ``attribute_weights`` / ``reward_attribute`` is read as
    ``aligner rm score`` reads it: the weights its training recorded (aligner.rewards.readout.reward_readout).
    where: the option or config key that gave the spec, named by its errors."""
    get = spec.get if isinstance(spec, dict) else (lambda k, d=None: getattr(spec, k, d))
    kind = str(get("kind"))
    weights = get("attribute_weights")
    weights = list(weights) if weights is not None else None
    attribute = get("reward_attribute")
    if kind == "model":
        source = RewardModel(str(get("path")), tokenizer, None, weights, attribute, micro_batch_size, where=where)
        if weights is None and attribute is None and source.num_outputs > 1:
            readout = reward_readout(str(get("path")), source.num_outputs)
            source.attributes, source.weights = list(readout.names), list(readout.weights)
        elif attribute is not None and weights is None:
            readout = reward_readout(str(get("path")), source.num_outputs, reward_attribute=attribute)
            source.attributes, source.weights = list(readout.names), list(readout.weights)
        return source
    return build_reward(kind, function=get("function"), tokenizer=tokenizer, attribute_weights=weights,
                        reward_attribute=attribute or "helpfulness", micro_batch_size=micro_batch_size,
                        answer_field=get("answer_field", "answer"), format_reward=get("format_reward", 0.0),
                        where=where)


def score(source: RewardSource, samples: Samples, step: int = 0) -> torch.Tensor:
    """The source's scalar reward of every row: [n] float64."""
    rewards, _ = source.score(samples.reward_batch(step))
    return rewards.double()


def load_policy(path: str, tokenizer=None, max_batch: int = 64):
    """An HF causal-LM folder as (chunks, model config, rollout engine) at the current layout
    (one process unless initialised otherwise)."""
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not an HF model folder (no config.json)")
    if not is_initialized():
        cfg = ModelConfig.from_hf(path)
        initialize(ParallelConfig(), num_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
                   num_query_groups=cfg.num_query_groups)
    chunks, cfg = from_pretrained(path)
    engine = RolloutEngine(chunks, cfg, tokenizer=tokenizer, max_batch=max_batch)
    return chunks, cfg, engine


__all__ = ["Samples", "build_reward_source", "load_policy", "parse_reward_spec", "response_logps",
           "sample_responses", "score"]
