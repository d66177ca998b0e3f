"""Verifiable rewards: a response is right or wrong by a rule, no model involved
(docs/reinforce.md, "verifiable rewards").

:class:`ExactAnswerReward` reads the answer the prompt row states in its metadata
(``answer`` by default: the embedded world's tasks carry it, see
:mod:`aligner.data.world`) and the answer the response states, as the world's scorer
does: the last ``The answer is X.`` (:data:`aligner.data.world.ANSWER`). The reward is

``r = 1[stated answer == true answer] + format_reward · 1[an answer is stated]``

(both compared after stripping surrounding whitespace). Its two attributes, ``exact`` and
``formatted``, are logged as ``reward/exact`` and ``reward/formatted``. Any other rule
works the same way as a ``package.module:function`` reward
(:class:`aligner.rewards.FunctionReward`).
"""
from __future__ import annotations

import re
from typing import List, Optional, Pattern, Sequence

import torch

from aligner.data.world import ANSWER
from aligner.rewards.sources import RewardBatch, RewardError, RewardSource, check_scores


def stated_answer(response: str, pattern: Optional[Pattern] = None) -> Optional[str]:
    """The last answer ``response`` states (``The answer is X.``), stripped; None if none."""
    if pattern is None:
        pattern = ANSWER
    found = pattern.findall(response)
    return found[-1].strip() if found else None


def exact_answer_scores(responses: Sequence[str], answers: Sequence[str]) -> List[List[float]]:
    """``[exact, formatted]`` per response: 1.0 / 0.0 each. [n] -> [n, 2]."""
    out = []
    for text, answer in zip(responses, answers):
        stated = stated_answer(text)
        out.append([float(stated is not None and stated == str(answer).strip()), float(stated is not None)])
    return out


class ExactAnswerReward(RewardSource):
    """1 for the exact stated answer, 0 otherwise, plus ``format_reward`` for stating one
    (module docstring). answer_field: the metadata key holding the true answer."""

    name = "exact_answer"

    def __init__(self, answer_field: str = "answer", format_reward: float = 0.0, pattern: Optional[str] = None):
        self.answer_field = answer_field
        self.format_reward = float(format_reward)
        self.pattern = re.compile(pattern) if pattern else None
        self.attributes = ["exact", "formatted"]

    def score(self, batch: RewardBatch):
        answers = []
        for i, meta in enumerate(batch.metadata):
            value = meta.get(self.answer_field)
            if value is None or isinstance(value, (dict, list)):
                index = batch.sample_indices[i] if i < len(batch.sample_indices) else i
                row = meta.get("prompt_index", -1)
                raise RewardError(
                    f"reward source exact_answer, step {batch.step}, sample {index}: the prompt row"
                    f" (dataset row {row + 1 if row >= 0 else '?'}) has no field {self.answer_field!r} with a single"
                    f" answer; its fields: {sorted(k for k in meta if k not in ('group', 'sample_index', 'prompt_index'))}")
            answers.append(value)
        if self.pattern is None:
            rows = exact_answer_scores(batch.responses, answers)
        else:
            rows = []
            for text, answer in zip(batch.responses, answers):
                stated = stated_answer(text, self.pattern)
                rows.append([float(stated is not None and stated == str(answer).strip()), float(stated is not None)])
        values = check_scores("exact_answer", rows, batch, self.attributes)
        rewards = values @ torch.tensor([1.0, self.format_reward], dtype=values.dtype)
        return rewards, values
