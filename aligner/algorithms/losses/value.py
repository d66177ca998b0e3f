"""The critic's loss: PPO's clipped value loss (docs/ppo.md)."""
from __future__ import annotations

import torch

from aligner.algorithms.losses.common import LossAndStats, _as_mask, _check_same_shape, masked_mean


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> LossAndStats:
    """PPO clipped value loss (docs/ppo.md).

    ``V_c = V_old + clip(V − V_old, −c, c)``; ``L = 0.5 · masked_mean(max((V_c − R)², (V − R)²))``.
    values (with grad), old_values, returns, mask: [b, s].
    Stats: ``loss``, ``clipfrac`` (share of tokens where the clipped error is the larger),
    ``values`` (mean), ``returns`` (mean).
    """
    _check_same_shape("values", values, old_values=old_values, returns=returns)
    m = _as_mask(mask, values, "mask")
    old, ret = old_values.detach(), returns.detach()
    v_clipped = old + (values - old).clamp(-clip, clip)
    err_clipped, err = (v_clipped - ret) ** 2, (values - ret) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err_clipped, err), m)
    stats = {
        "loss": loss.detach(),
        "clipfrac": masked_mean((err_clipped > err).to(values.dtype), m).detach(),
        "values": masked_mean(values.detach(), m),
        "returns": masked_mean(ret, m),
    }
    return loss, stats
