"""Per-token estimates of the KL divergence to the reference policy, every kind in one
function (docs/reinforce.md, "KL estimators"; docs/ppo.md, "KL penalty").

With ``d = log π(y_t) − log π_ref(y_t)`` on tokens sampled from π, clamped to ±20:

- ``k1``: ``d`` (unbiased, signed; PPO's and REINFORCE++'s reward term)
- ``abs``: ``|d|`` (the default of the tool that came before, in PPO's reward)
- ``k2``: ``d²/2``
- ``k3``: ``exp(−d) − 1 + d`` (non-negative, unbiased; GRPO's loss term)
- ``k3+``: k3's value with k2's gradient (an unbiased value, a low-variance gradient)

and the estimate clamped to ±10, so one wild token cannot dominate a sequence.
"""
from __future__ import annotations

import torch

from aligner.algorithms.losses.common import _check_same_shape, masked_mean

KL_ESTIMATORS = ("k1", "abs", "k2", "k3", "k3+")
KL_LOG_RATIO_CLAMP = 20.0  # |d| beyond this is a broken token, not information
KL_VALUE_CLAMP = 10.0


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """The ``kind`` estimate of KL(π ‖ π_ref) per token (module docstring).

    logps (may carry the graph), ref_logps (detached here): [b, s] -> [b, s].
    """
    _check_same_shape("logps", logps, ref_logps=ref_logps)
    delta = (ref_logps.detach() - logps).clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)  # −d
    if kind == "k1":
        out = -delta
    elif kind == "abs":
        out = delta.abs()
    elif kind == "k2":
        out = 0.5 * delta * delta
    elif kind in ("k3", "k3+"):
        out = torch.expm1(delta) - delta
        if kind == "k3+":
            k2 = 0.5 * delta * delta
            out = out.detach() + (k2 - k2.detach())
    else:
        raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {kind!r}")
    return out.clamp(-KL_VALUE_CLAMP, KL_VALUE_CLAMP)


def sequence_mean_kl(token_kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean_t KL_t`` over each row's response tokens: [b, s] -> [b]."""
    return masked_mean(token_kl, mask, dim=-1)
