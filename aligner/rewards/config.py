"""The config sections of reward sources (docs/monitor.md, docs/online_core.md).

:class:`RewardSpec` is one reward source (the monitor's proxies and gold);
:class:`RewardSection` the training reward of an online algorithm (``ppo.reward``,
``pg.reward``), with the head's attribute names. ``kind`` is checked against the live
registry of reward kinds (:mod:`aligner.rewards.kinds`) and the fields its kind requires
(a spec when the config is composed; a training reward by its trainer,
:func:`check_reward_section`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

from aligner.config import ConfigError, registered, section_check
from aligner.rewards.kinds import REWARD_KINDS


@dataclass
class RewardSpec:
    """One reward source (aligner.rewards.kinds.build_reward)."""

    kind: str = registered(REWARD_KINDS, "world")  # model | world | function | exact_answer | a registered kind
    path: Optional[str] = None  # model: an HF reward-model folder
    function: Optional[str] = None  # function: package.module:function
    # one weight per output make the scalar, r = w · ŷ; else reward_attribute; for a model
    # with neither, the weights its training recorded
    attribute_weights: Optional[List[float]] = None
    reward_attribute: Optional[str] = None
    answer_field: str = "answer"  # exact_answer: the prompt row's field holding the answer
    format_reward: float = 0.0  # exact_answer: added when the response states an answer at all


@dataclass
class RewardSection(RewardSpec):
    """``<algorithm>.reward``: an online algorithm's training reward."""

    kind: str = registered(REWARD_KINDS, "model")
    reward_attribute: str = "helpfulness"
    # the outputs' names, checked against those the reward model records (null: those)
    attributes: Optional[List[str]] = None
    micro_batch_size: int = 8  # rows per reward-model forward


@section_check(RewardSpec)
def _check_required_fields(spec, key: str, cfg) -> None:
    """The fields the spec's kind requires (declared at its registration) are set."""
    for name, what in REWARD_KINDS[spec.kind].requires.items():
        if not spec[name]:
            raise ConfigError(f"{key}.{name} is not set: {key}.kind = {spec.kind} needs {what}",
                              hint=f"set {key}.{name}=..., or another {key}.kind ({', '.join(REWARD_KINDS)})")


def check_reward_section(section, key: str) -> None:
    """An online algorithm's reward section (``<key>``): the attribute names and weights,
    the sizes and scores (ConfigError naming the key). The fields its kind requires are
    checked with the other required values (:func:`unset_reward_fields`), so that the
    config prints (``--cfg``) before they are set."""
    if section.attributes is not None:
        check_attribute_weights(key, list(section.attributes), section.attribute_weights, section.reward_attribute,
                                need_reward_attribute=section.kind == "model" and section.attribute_weights is None,
                                distinct=True)
    if section.micro_batch_size < 1:
        raise ConfigError(f"{key}.micro_batch_size = {section.micro_batch_size}: expected >= 1")
    if not math.isfinite(section.format_reward):
        raise ConfigError(f"{key}.format_reward = {section.format_reward}: expected a finite number")


def unset_reward_fields(section, key: str) -> List[str]:
    """``<key>.<field>`` for each field the section's kind requires that is not set."""
    return [f"{key}.{name}" for name in REWARD_KINDS[section.kind].requires if not section[name]]


def check_attribute_weights(prefix: str, attributes: List[str], attribute_weights: Optional[List[float]],
                            reward_attribute: Optional[str], *, need_reward_attribute: bool = True,
                            distinct: bool = False) -> None:
    """The checks of a section that makes a scalar reward from named attribute outputs
    (``rm``, ``ppo.reward``, ``pg.reward``): ``attributes`` distinct and non-empty (when
    ``distinct``), ``reward_attribute`` one of them (when it is what picks the reward),
    one weight per attribute. ConfigError naming ``<prefix>.<key>``."""
    if distinct and (not attributes or len(set(attributes)) != len(attributes)):
        raise ConfigError(f"{prefix}.attributes = {attributes}: expected one or more distinct names")
    if need_reward_attribute and reward_attribute not in attributes:
        raise ConfigError(f"{prefix}.reward_attribute = {reward_attribute!r} is not one of {prefix}.attributes"
                          f" {attributes}")
    if attribute_weights is not None and len(attribute_weights) != len(attributes):
        raise ConfigError(f"{prefix}.attribute_weights has {len(attribute_weights)} entries; {prefix}.attributes has"
                          f" {len(attributes)} ({', '.join(attributes)})")
