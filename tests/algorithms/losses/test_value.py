"""aligner.algorithms.losses.value: PPO's clipped value loss by hand, and its gradient."""
import torch

from aligner.algorithms.losses.value import ppo_value_loss
from tests.algorithms.losses.values import close, t


def test_ppo_value_loss():
    values = t([[1.0, 2.0, 9.0]]).requires_grad_()
    old = t([[0.5, 2.0, 0.0]])
    returns = t([[2.0, 1.0, 0.0]])
    mask = t([[1.0, 1.0, 0.0]])
    loss, stats = ppo_value_loss(values, old, returns, mask, clip=0.2)
    # token 1: V_c = 0.5 + clip(0.5) = 0.7; max((0.7 − 2)², (1 − 2)²) = max(1.69, 1) = 1.69 (clipped)
    # token 2: V_c = 2; max(1, 1) = 1.   L = 0.5 · (1.69 + 1) / 2 = 0.6725
    close(loss, 0.6725)
    close(stats["clipfrac"], 0.5)
    loss.backward()
    # token 1 uses the clipped branch (no gradient: V − V_old is beyond c); token 2: 0.5·2(V − R)/2 = 0.5
    torch.testing.assert_close(values.grad, t([[0.0, 0.5, 0.0]]))


def test_gradcheck_value_loss():
    values = t([[1.0, 2.0, 0.3, 0.0], [0.5, -1.0, 2.0, 1.0]]).requires_grad_()
    old_v = t([[0.5, 2.1, 0.0, 0.0], [0.45, -0.5, 2.0, 1.1]])
    returns = t([[2.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.5]])
    mask = t([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert torch.autograd.gradcheck(lambda v: ppo_value_loss(v, old_v, returns, mask)[0], (values,))
