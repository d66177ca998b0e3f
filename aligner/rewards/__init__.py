"""Reward sources for online algorithms (docs/online_core.md, "rewards").

Every source scores a :class:`RewardBatch` (prompts, decoded responses, per-sample
metadata) and returns one scalar per response, plus the per-attribute scores when it
has attributes:

- :class:`RewardModel`: an HF reward-model folder (``*ForSequenceClassification``, e.g. an
  ``aligner`` export; one or several attribute outputs combined with attribute weights),
  run at the job's TP / PP layout. It reads the decoded text rendered with its own template
  and tokenizer, so a reward model with another tokenizer than the policy's scores the
  same text the policy wrote.
- :class:`WorldScorer`: the embedded world's ground-truth scorer (aligner.data.world).
- :class:`ExactAnswerReward`: a verifiable reward, 1 for the exact answer the prompt row
  states in its metadata, 0 otherwise (plus an optional format reward).
- :class:`FunctionReward`: any Python callable named ``package.module:function`` taking
  ``(prompts, responses, metadata)`` and returning one score per response, or one list
  of attribute scores per response.

A source that raises, returns the wrong number of scores or a non-finite score is a
:class:`RewardError` naming the source, the training step and the sample. What can be
checked before a run starts — a folder without a trained reward head, output names that
differ from those its export records, a function that does not import, prompts the
world's scorer cannot judge — is a :class:`ScoringError` (:func:`check_reward_source`).
"""
from aligner.rewards.sources import (  # noqa: F401
    FunctionReward,
    RewardBatch,
    RewardError,
    RewardModel,
    RewardSource,
    WorldScorer,
    build_reward,
    check_reward_source,
    check_scores,
    check_world_prompts,
    reward_model_outputs,
)
from aligner.rewards.readout import ScoringError, require_reward_head  # noqa: F401
from aligner.rewards.verifiable import ExactAnswerReward, exact_answer_scores, stated_answer  # noqa: F401

__all__ = ["ExactAnswerReward", "FunctionReward", "RewardBatch", "RewardError", "RewardModel", "RewardSource",
           "ScoringError", "WorldScorer", "build_reward", "check_reward_source", "check_scores", "check_world_prompts",
           "exact_answer_scores", "require_reward_head", "reward_model_outputs", "stated_answer"]
