"""aligner.algorithms.losses.kl: every estimator's value and gradient by hand, and the clamps."""
import math

import pytest
import torch

from aligner.algorithms.losses import kl as K


def test_kl_estimators_values_and_gradients():
    ref = torch.tensor([-1.5], dtype=torch.float64)
    want = {"k1": 0.5, "abs": 0.5, "k2": 0.125, "k3": math.exp(-0.5) - 0.5, "k3+": math.exp(-0.5) - 0.5}
    # d/dlogp: k1 -> 1, k2 -> -delta = 0.5, k3 -> 1 - exp(delta), k3+ -> k2's
    grads = {"k1": 1.0, "abs": 1.0, "k2": 0.5, "k3": 1 - math.exp(-0.5), "k3+": 0.5}
    for kind in K.KL_ESTIMATORS:
        logp = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
        v = K.kl_estimate(logp, ref, kind)
        v.sum().backward()
        assert float(v.detach()) == pytest.approx(want[kind], abs=1e-12), kind
        assert float(logp.grad) == pytest.approx(grads[kind], abs=1e-12), kind
    with pytest.raises(ValueError, match="k3"):
        K.kl_estimate(ref, ref, "k4")


def test_kl_estimates_are_clamped():
    logps, ref = torch.tensor([[0.0, 0.0, -0.5]]), torch.tensor([[-50.0, 30.0, 0.0]])
    assert K.kl_estimate(logps, ref, "k1").tolist()[0][:2] == [10.0, -10.0]  # log-ratio ±20, estimate ±10
    assert K.kl_estimate(logps, ref, "abs").tolist()[0][:2] == [10.0, 10.0]
    k3 = K.kl_estimate(logps, ref, "k3")
    assert float(k3[0, 0]) == 10.0 and float(k3[0, 1]) == 10.0
    assert math.isclose(float(k3[0, 2]), math.exp(0.5) - 1 - 0.5, rel_tol=1e-6)
    assert float(K.kl_estimate(torch.tensor([0.0]), torch.tensor([-100.0]), "k3")) == pytest.approx(K.KL_VALUE_CLAMP)


def test_k3_by_hand_and_sequence_mean():
    logps = torch.tensor([[0.0, -1.0, -2.0, 5.0]], dtype=torch.float64)
    ref = torch.tensor([[0.0, -1.5, -1.0, 9.0]], dtype=torch.float64)
    # k3 = exp(−d) − 1 + d: d = 0.5 -> 0.1065307, d = −1 -> e − 2 = 0.7182818
    k3 = K.kl_estimate(logps, ref, "k3")
    assert abs(float(k3[0, 1]) - (math.exp(-0.5) - 0.5)) < 1e-12
    assert abs(float(k3[0, 2]) - (math.e - 2)) < 1e-12
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    # |d| on the two response tokens: 0.5 and 1 -> mean 0.75
    assert K.sequence_mean_kl(K.kl_estimate(logps, ref, "abs"), mask).tolist() == [0.75]
