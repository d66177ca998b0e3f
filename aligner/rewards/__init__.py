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

Kinds are registered by name in :mod:`aligner.rewards.kinds` (``build_reward(kind, ...)``);
the config sections of reward specs are :mod:`aligner.rewards.config`; attribute weights
:mod:`aligner.rewards.weights`; how a reward model's outputs are read
:mod:`aligner.rewards.readout`.
"""
from aligner.runtime import lazy_exports

# names load their module on first use: importing aligner.rewards.config loads no reward model
_EXPORTS = {name: "sources" for name in ("FunctionReward", "RewardBatch", "RewardError", "RewardModel",
                                          "RewardSource", "WorldScorer", "check_reward_source", "check_scores",
                                          "check_world_prompts", "reward_model_outputs")}
_EXPORTS.update({name: "verifiable" for name in ("ExactAnswerReward", "exact_answer_scores", "stated_answer")})
_EXPORTS.update({"ScoringError": "readout", "require_reward_head": "readout"})
_EXPORTS.update({"REWARD_KINDS": "kinds", "build_reward": "kinds", "register_reward_kind": "kinds"})
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
