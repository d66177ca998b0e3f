"""Pure loss functions of every algorithm, one module per family.

Each loss is a plain torch function of already-reduced quantities (per-sequence
log-probs, per-token log-probs with a mask, head outputs) and returns ``(loss, stats)``:
a scalar tensor carrying the graph, and a dict of detached scalar tensors worth logging.
Nothing here knows about parallelism: a trainer calls these from its megatron-core loss
function on the last pipeline stage and sums summable statistics over data-parallel ranks.

- :mod:`.common`: masked reductions and whitening
- :mod:`.reward`: regression and Bradley-Terry reward models, attribute weights, ExPO
- :mod:`.preference`: the DPO family
- :mod:`.policy_gradient`: PPO and the REINFORCE family
- :mod:`.steerlm`: SteerLM 2.0
"""
from aligner.algorithms.losses.common import (  # noqa: F401
    masked_sum,
    masked_mean,
    sequence_logps,
    masked_moments,
    moments_mean_var,
    masked_whiten,
    Stats,
    LossAndStats,
    Group,
)
from aligner.algorithms.losses.reward import (  # noqa: F401
    masked_mse_loss,
    bt_accuracy,
    BT_KINDS,
    bradley_terry_loss,
    HELPSTEER2_ATTRIBUTES,
    REWARDBENCH_WEIGHTS_70B,
    REWARDBENCH_WEIGHTS_340B,
    GOODNESS_WEIGHTS,
    combine_attributes,
    RunningMoments,
    expo_extrapolate,
)
from aligner.algorithms.losses.preference import (  # noqa: F401
    dpo_loss,
    ipo_loss,
    rpo_sq_loss,
    rpo_bwd_kl_loss,
    rpo_fwd_kl_loss,
    margin_dpo_loss,
    scaled_dpo_loss,
    PreferenceLossFn,
    PREFERENCE_LOSSES,
    register_preference_loss,
    preference_loss,
)
from aligner.algorithms.losses.policy_gradient import (  # noqa: F401
    KL_KINDS,
    kl_penalty,
    ppo_token_rewards,
    gae_advantages,
    ppo_policy_loss,
    ppo_value_loss,
    group_softmax,
    rloo_advantages,
    reinforce_loss,
)
from aligner.algorithms.losses.steerlm import (  # noqa: F401
    steerlm2_weights,
    steerlm2_loss,
    beta_cdf,
    attribute_log_likelihood,
)
