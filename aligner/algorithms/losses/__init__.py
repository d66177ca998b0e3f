"""Pure loss functions, one module per concept, each implemented once: the function the
trainers call is the one the tests check (docs/architecture.md).

Each is a plain torch function of already-reduced quantities (per-sequence log-probs,
per-token log-probs with a mask, head outputs); nothing here knows about parallelism.

- :mod:`.common`: masked reductions, whitening, group reductions
- :mod:`.advantages`: advantage estimators by name (RLOO, GRPO, Dr. GRPO, REINFORCE++, GAE), DAPO's shaping
- :mod:`.policy`: the KL estimators (k1, abs, k2, k3, k3+); clipped surrogate, REINFORCE token loss, GSPO,
  CISPO (registered by name), aggregation, the policy objective
- :mod:`.preference`: the DPO family by name (ORPO and SimPO among them)
- :mod:`.kto`: KTO's reference point and value on unpaired responses
- :mod:`.reward`: regression and Bradley-Terry reward models, running moments, ExPO
- :mod:`.steerlm`: SteerLM 2.0 weights and loss, the Beta model of attribute likelihoods
- :mod:`.distill`: knowledge distillation's divergences (forward / reverse KL, generalised JSD), full
  vocabulary or top-k, on vocab-parallel logits through the reductions the caller gives
"""
from aligner.algorithms.losses.common import (  # noqa: F401
    Group,
    LossAndStats,
    Stats,
    group_softmax,
    masked_mean,
    masked_moments,
    masked_sum,
    masked_whiten,
    moments_mean_var,
    sequence_logps,
)
from aligner.algorithms.losses.advantages import (  # noqa: F401
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    gae_advantages,
    groups_with_signal,
    overlong_penalty,
    ppo_token_rewards,
    register_advantage,
)
from aligner.algorithms.losses.policy import (  # noqa: F401
    AGGREGATIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    PolicyLossOptions,
    aggregate,
    cispo_token_loss,
    clipped_surrogate,
    gspo_token_loss,
    kl_estimate,
    policy_objective,
    register_policy_loss,
    reinforce_token_loss,
    sequence_mean_kl,
)
from aligner.algorithms.losses.preference import (  # noqa: F401
    PREFERENCE_LOSSES,
    dpo_loss,
    ipo_loss,
    margin_dpo_loss,
    orpo_loss,
    preference_loss,
    register_preference_loss,
    rpo_bwd_kl_loss,
    rpo_fwd_kl_loss,
    rpo_sq_loss,
    scaled_dpo_loss,
    simpo_loss,
)
from aligner.algorithms.losses.kto import kto_loss, kto_reference_point, mismatched_rows  # noqa: F401
from aligner.algorithms.losses.reward import (  # noqa: F401
    BT_KINDS,
    RunningMoments,
    bradley_terry_loss,
    bt_accuracy,
    expo_extrapolate,
    masked_mse_loss,
)
from aligner.algorithms.losses.steerlm import (  # noqa: F401
    attribute_log_likelihood,
    beta_cdf,
    steerlm2_loss,
    steerlm2_weights,
)
from aligner.algorithms.losses.distill import (  # noqa: F401
    DISTILL_DIVERGENCES,
    VocabShard,
    distill_loss,
    shard_topk,
    token_divergence,
    topk_token_divergence,
)
