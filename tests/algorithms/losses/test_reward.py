"""aligner.algorithms.losses.reward: regression and Bradley-Terry losses, running moments
and ExPO against hand-computed values, and float64 gradchecks."""
import math

import pytest
import torch

from aligner.algorithms.losses import reward as L
from tests.algorithms.losses.values import LN2, close, nll_sigmoid, random_leaf, t


def test_masked_mse_excludes_missing_labels():
    pred = t([1.0, 2.0, 3.0], [0.0, 4.0, 1.0]).requires_grad_()
    labels = t([2.0, float("nan"), 1.0], [0.0, 1.0, -1.0])
    mask = t([1.0, 0.0, 1.0], [1.0, 1.0, 0.0])
    loss, stats = L.masked_mse_loss(pred, labels, mask)
    # present: (1-2)² + (3-1)² + (0-0)² + (4-1)² = 1 + 4 + 0 + 9 = 14 over 4 labels
    close(loss, 3.5)
    assert float(stats["num_labels"]) == 4.0 and not stats["loss"].requires_grad
    loss.backward()
    # d/dŷ = 2(ŷ − y)/4 on present labels, 0 elsewhere (the NaN label never reaches the gradient)
    assert pred.grad.tolist() == [[-0.5, 0.0, 1.0], [0.0, 1.5, 0.0]]


def test_masked_mse_bool_mask_and_no_labels():
    pred = t([[1.0, 5.0]]).requires_grad_()
    loss, _ = L.masked_mse_loss(pred, t([[3.0, 0.0]]), torch.tensor([[True, False]]))
    close(loss, 4.0)  # (1 - 3)²
    pred2 = t([[1.0, 5.0]]).requires_grad_()
    loss2, stats = L.masked_mse_loss(pred2, t([[3.0, 0.0]]), t([[0.0, 0.0]]))
    loss2.backward()
    assert float(loss2.detach()) == 0.0 and float(stats["num_labels"]) == 0.0 and pred2.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="labels has shape"):
        L.masked_mse_loss(pred, t([1.0, 2.0]), t([1.0, 1.0]))


R_C = [2.0, 0.5, -1.0]
R_R = [1.0, 0.5, 0.0]  # Δ = 1, 0, -1
STRENGTH = [-3.0, 1.0, 2.0]  # m = |strength| = 3, 1, 2


def test_bradley_terry_regular():
    loss, stats = L.bradley_terry_loss(t(R_C), t(R_R), kind="regular")
    # mean(−logσ(1), −logσ(0), −logσ(−1)) = (0.313262 + 0.693147 + 1.313262) / 3 = 0.773224
    expected = (nll_sigmoid(1) + LN2 + nll_sigmoid(-1)) / 3
    close(expected, 0.7732238, 1e-6)
    close(loss, expected)
    close(stats["accuracy"], 1 / 3, 1e-7)  # only Δ = 1 counts; the tie is wrong
    close(stats["margin"], 0.0, 1e-7)


def test_bradley_terry_margin_from_strength_and_explicit():
    loss, _ = L.bradley_terry_loss(t(R_C), t(R_R), kind="margin", strength=t(STRENGTH))
    # Δ − m = 1-3, 0-1, -1-2 = -2, -1, -3 -> mean(−logσ(-2), −logσ(-1), −logσ(-3))
    expected = (nll_sigmoid(-2) + nll_sigmoid(-1) + nll_sigmoid(-3)) / 3
    close(expected, (2.126928 + 1.313262 + 3.048587) / 3, 1e-6)
    close(loss, expected)
    loss2, _ = L.bradley_terry_loss(t(R_C), t(R_R), kind="margin", margin=t([0.5, 0.0, 0.0]))
    close(loss2, (nll_sigmoid(0.5) + LN2 + nll_sigmoid(-1)) / 3)


def test_bradley_terry_scaled():
    loss, _ = L.bradley_terry_loss(t(R_C), t(R_R), kind="scaled", strength=t(STRENGTH))
    # mean(3·−logσ(1), 1·−logσ(0), 2·−logσ(-1)) = (0.939785 + 0.693147 + 2.626523) / 3
    expected = (3 * nll_sigmoid(1) + LN2 + 2 * nll_sigmoid(-1)) / 3
    close(expected, 1.4198186, 1e-6)
    close(loss, expected)


def test_bradley_terry_errors():
    with pytest.raises(ValueError, match="strength"):
        L.bradley_terry_loss(t(R_C), t(R_R), kind="scaled")
    with pytest.raises(ValueError, match="one of"):
        L.bradley_terry_loss(t(R_C), t(R_R), kind="hinge")
    with pytest.raises(ValueError, match="r_rejected has shape"):
        L.bradley_terry_loss(t(R_C), t([1.0, 2.0]))


def test_running_moments_mergeable():
    a = L.RunningMoments().update(t([1.0, 2.0, 3.0]))
    b = L.RunningMoments().update(t([4.0, 100.0]), mask=t([1.0, 0.0]))
    merged = L.RunningMoments(a.state + b.state)  # what an all_reduce of the states gives
    a.merge(b)
    for m in (a, merged):
        # values 1..4: mean 2.5, population variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
        assert m.count == 4.0
        close(m.mean, 2.5)
        close(m.std, math.sqrt(1.25))
        close(m.normalize(t([4.0]))[0], 1.5 / math.sqrt(1.25), 1e-7)
    with pytest.raises(ValueError, match="zero values"):
        L.RunningMoments().mean


def test_expo_extrapolate_values_and_dtypes():
    weak = {"w": t([1.0, 2.0]), "h": torch.tensor([1.0, 1.0], dtype=torch.bfloat16), "ids": torch.arange(3)}
    strong = {"w": t([2.0, 0.0]), "h": torch.tensor([2.0, 3.0], dtype=torch.bfloat16), "ids": torch.arange(3)}
    out = L.expo_extrapolate(weak, strong, 1.5)
    # θ = θ_w + 1.5 (θ_s − θ_w): [1 + 1.5·1, 2 + 1.5·(−2)] = [2.5, −1];  [1 + 1.5, 1 + 3] = [2.5, 4]
    assert out["w"].tolist() == [2.5, -1.0] and out["w"].dtype == torch.float64
    assert out["h"].tolist() == [2.5, 4.0] and out["h"].dtype == torch.bfloat16
    assert out["ids"].tolist() == [0, 1, 2]
    assert L.expo_extrapolate(weak, strong, 1.0)["w"].tolist() == [2.0, 0.0]
    assert L.expo_extrapolate(weak, strong, 0.0)["w"].tolist() == [1.0, 2.0]


def test_expo_extrapolate_mismatches():
    weak = {"a": t([1.0]), "b": t([1.0])}
    with pytest.raises(KeyError, match=r"only in the weak model \['b'\].*only in the strong model \['c'\]"):
        L.expo_extrapolate(weak, {"a": t([1.0]), "c": t([1.0])}, 1.5)
    with pytest.raises(ValueError, match=r"'b' has shape \(1,\) in the weak model, \(2,\)"):
        L.expo_extrapolate(weak, {"a": t([1.0]), "b": t([1.0, 2.0])}, 1.5)
    with pytest.raises(ValueError, match="non-floating tensor 'i'"):
        L.expo_extrapolate({"i": torch.arange(2)}, {"i": torch.arange(1, 3)}, 1.5)


def test_gradcheck_reward_losses():
    pred, labels = random_leaf(3, 4, seed=1), torch.randn(3, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: L.masked_mse_loss(p, labels, mask)[0], (pred,))
    rc, rr = random_leaf(5, seed=2), random_leaf(5, seed=3)
    strength = torch.tensor([1.0, -2.0, 3.0, 1.0, -1.0], dtype=torch.float64)
    for kind in L.BT_KINDS:
        assert torch.autograd.gradcheck(
            lambda a, b: L.bradley_terry_loss(a, b, kind=kind, strength=strength)[0], (rc, rr)), kind
