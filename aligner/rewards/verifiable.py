"""Verifiable rewards: a response is right or wrong by a rule, no model involved
(docs/reinforce.md, "verifiable rewards").

:class:`ExactAnswerReward` reads the answer the prompt row states in its metadata
(``answer`` by default: the embedded world's tasks carry it, see
:mod:`aligner.data.world`) and the answer the response states: the text after its last
``The answer is`` up to the end of that sentence (:data:`STATED_ANSWER`: a ``.``, ``!`` or
``?`` followed by a space, a line end or the end of the response, or the line's end).
So ``The answer is 3.5.`` states ``3.5``, ``The answer is -2`` states ``-2``. The reward is

``r = 1[stated answer == true answer] + format_reward · 1[an answer is stated]``

compared after stripping surrounding whitespace; two numbers (``-2``, ``3.50``) compare by
value. Its two attributes, ``exact`` and ``formatted``, are logged as ``reward/exact`` and
``reward/formatted``. Any other rule works the same way as a ``package.module:function``
reward (:class:`aligner.rewards.FunctionReward`).
"""
from __future__ import annotations

import re
from typing import List, Optional, Pattern, Sequence

import torch

from aligner.data.world import ANSWER
from aligner.rewards.sources import RewardBatch, RewardError, RewardSource, check_scores

# the answer runs to the end of its sentence: a period inside a number (3.5) does not end it
STATED_ANSWER = re.compile(r"The answer is ([^\n]*?)(?:[.!?]+(?=\s|$)|(?=\n)|$)")
NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")


def stated_answer(response: str, pattern: Optional[Pattern] = None) -> Optional[str]:
    """The last answer ``response`` states (:data:`STATED_ANSWER`, or ``pattern``'s first
    group), stripped; None if it states none (or an empty one)."""
    found = (pattern or STATED_ANSWER).findall(response)
    answer = found[-1].strip() if found else ""
    return answer or None


def same_answer(stated: Optional[str], answer) -> bool:
    """Whether a stated answer is the true one: equal strings after stripping, or two
    numbers of equal value (``3.50`` and ``3.5``, ``+2`` and ``2``)."""
    if stated is None:
        return False
    truth = str(answer).strip()
    if stated == truth:
        return True
    return bool(NUMBER.fullmatch(stated) and NUMBER.fullmatch(truth)) and float(stated) == float(truth)


def exact_answer_scores(responses: Sequence[str], answers: Sequence[str],
                        pattern: Optional[Pattern] = None) -> List[List[float]]:
    """``[exact, formatted]`` per response: 1.0 / 0.0 each. [n] -> [n, 2]."""
    out = []
    for text, answer in zip(responses, answers):
        stated = stated_answer(text, pattern)
        out.append([float(same_answer(stated, answer)), float(stated is not None)])
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
        rows = exact_answer_scores(batch.responses, answers, self.pattern)
        values = check_scores("exact_answer", rows, batch, self.attributes)
        rewards = values @ torch.tensor([1.0, self.format_reward], dtype=values.dtype)
        return rewards, values
