"""Reward kinds by name: each kind is one function registered with
:func:`register_reward_kind`, which builds its :class:`~aligner.rewards.sources.RewardSource`
and declares the spec fields it requires (``requires``: field -> what it holds). The
config sections' ``kind`` (``ppo.reward``, ``pg.reward``, ``monitor.gold``, ...) is
checked against this registry and its required fields (aligner.rewards.config); a new kind
is one decorated function here (docs/architecture.md).

Every builder receives the spec's fields as keywords (``path``, ``function``,
``tokenizer``, ``attributes``, ``attribute_weights``, ``reward_attribute``,
``micro_batch_size``, ``max_length``, ``answer_field``, ``format_reward``) and uses those
it needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence

from aligner.rewards.sources import FunctionReward, RewardModel, RewardSource, WorldScorer
from aligner.rewards.verifiable import ExactAnswerReward

RewardBuilder = Callable[..., RewardSource]


@dataclass(frozen=True)
class RewardKind:
    """A registered reward kind: its builder and the spec fields it requires."""

    build: RewardBuilder
    requires: Dict[str, str] = field(default_factory=dict)


REWARD_KINDS: Dict[str, RewardKind] = {}


def register_reward_kind(name: str, *, requires: Optional[Dict[str, str]] = None
                         ) -> Callable[[RewardBuilder], RewardBuilder]:
    """Register ``build(**spec_fields) -> RewardSource`` as reward kind ``name``."""

    def add(build: RewardBuilder) -> RewardBuilder:
        if name in REWARD_KINDS:
            raise ValueError(f"reward kind {name!r} is already registered")
        REWARD_KINDS[name] = RewardKind(build, dict(requires or {}))
        return build

    return add


def build_reward(kind: str, *, path: Optional[str] = None, function: Optional[str] = None, tokenizer=None,
                 attributes: Optional[Sequence[str]] = None, attribute_weights: Optional[Sequence[float]] = None,
                 reward_attribute: Optional[str] = "helpfulness", micro_batch_size: int = 8,
                 max_length: Optional[int] = None, answer_field: str = "answer",
                 format_reward: float = 0.0, where: Optional[str] = None) -> RewardSource:
    """The reward source of kind ``kind`` (a key of :data:`REWARD_KINDS`). where: the option or
    config section that describes the source (``pg.reward``, ``--gold``), named by the errors of
    what it gave (default: the folder, or ``reward``)."""
    entry = REWARD_KINDS.get(str(kind))
    if entry is None:
        raise ValueError(f"reward kind {kind!r}: expected one of {', '.join(REWARD_KINDS)}")
    options = dict(path=path, function=function, tokenizer=tokenizer, attributes=attributes,
                   attribute_weights=attribute_weights, reward_attribute=reward_attribute,
                   micro_batch_size=micro_batch_size, max_length=max_length, answer_field=answer_field,
                   format_reward=format_reward, where=where)
    for key, what in entry.requires.items():
        if not options[key]:
            raise ValueError(f"reward kind {kind!r} needs {key}: {what}")
    return entry.build(**options)


@register_reward_kind("model", requires={"path": "an HF reward-model folder"})
def model_reward(*, path, tokenizer, attributes, attribute_weights, reward_attribute, micro_batch_size, max_length,
                 where, **_) -> RewardSource:
    """An HF reward-model folder run at the job's layout (:class:`RewardModel`)."""
    return RewardModel(path, tokenizer, attributes, attribute_weights, reward_attribute, micro_batch_size, max_length,
                       where=where)


@register_reward_kind("world")
def world_reward(*, attribute_weights, reward_attribute, where, **_) -> RewardSource:
    """The embedded world's ground-truth scorer (:class:`WorldScorer`)."""
    return WorldScorer(attribute_weights, reward_attribute or "helpfulness", where or "reward")


@register_reward_kind("function", requires={"function": "package.module:function"})
def function_reward(*, function, attributes, attribute_weights, reward_attribute, where, **_) -> RewardSource:
    """A ``package.module:function`` of (prompts, responses, metadata) (:class:`FunctionReward`)."""
    return FunctionReward(function, attributes, attribute_weights, reward_attribute, where or "reward")


@register_reward_kind("exact_answer", requires={"answer_field": "the prompt row's field holding the answer"})
def exact_answer_reward(*, answer_field, format_reward, **_) -> RewardSource:
    """1 for the exact stated answer of the prompt row's ``answer_field``, plus ``format_reward``
    for stating one (:class:`ExactAnswerReward`)."""
    return ExactAnswerReward(answer_field, format_reward)
