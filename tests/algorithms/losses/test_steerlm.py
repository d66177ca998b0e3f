"""aligner.algorithms.losses.steerlm: SteerLM 2.0 weights and loss (the function training
calls) by hand, and the Beta model of attribute likelihoods against closed forms and mpmath."""
import math

import pytest
import torch

from aligner.algorithms.losses import steerlm as L
from tests.algorithms.losses.values import close, t


def steerlm2_example():
    ln3 = math.log(3)
    policy = t([-10.0, -20.0, -4.0, -8.0])  # log Q_θ(y_i|a,x)
    q_prime = t([-10.0, -20.0, -4.0 - ln3, -8.0])  # b' logits = policy − q' = [0, 0 | ln3, 0]
    p_y = t([-10.0, -20.0, -4.0 - ln3, -8.0])
    attr = t([ln3, 0.0, 0.0, 0.0])  # w' logits = attr + p_y − q' = [ln3, 0 | 0, 0]
    return policy, q_prime, p_y, attr


def test_steerlm2_weights_and_loss():
    policy, q_prime, p_y, attr = steerlm2_example()
    w, b = L.steerlm2_weights(attr, p_y, q_prime, policy, 2)
    torch.testing.assert_close(w, t([0.75, 0.25, 0.5, 0.5]))
    torch.testing.assert_close(b, t([0.5, 0.5, 0.75, 0.25]))
    policy.requires_grad_()
    loss_sum, tokens, sums = L.steerlm2_loss(policy, t([10.0, 20.0, 4.0, 6.0]), attr, p_y, q_prime, 2)
    # w − b = [0.25, −0.25 | −0.25, 0.25]; NLL = [10, 20, 4, 8]; T̄ = 10, G = 2
    # L = (0.25·10 − 0.25·20 − 0.25·4 + 0.25·8) / (2·10) = −1.5 / 20 = −0.075, returned as
    # Σ n_g (w − b) NLL = 2·(−1.5) = −3 over the 40 tokens
    close(loss_sum, -3.0)
    close(tokens, 40.0)
    loss = loss_sum / tokens
    close(loss, -0.075)
    loss.backward()
    torch.testing.assert_close(policy.grad, t([-0.0125, 0.0125, 0.0125, -0.0125]))
    kl1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    kl2 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert float(sums["groups"]) == 2.0
    close(sums["kl_w_b"] / sums["groups"], (kl1 + kl2) / 2, 1e-6)
    close(sums["weight_max"] / sums["groups"], (0.75 + 0.5) / 2, 1e-6)


def test_group_of_four_weights_baseline_distance_by_hand():
    ln2, ln4 = math.log(2), math.log(4)
    q_prime = t([-6.0, -8.0, -4.0, -10.0])
    q_theta = t([-6.0, -8.0 + ln2, -4.0 + ln2, -10.0])  # b' logits = q_θ − q' = [0, ln2, ln2, 0]
    attr = t([-1.0, -2.0, -3.0, -0.5])
    p_y = q_prime + t([ln4 + 1.0, ln2 + 2.0, 3.0, 0.5])  # w' logits = attr + p_y − q' = [ln4, ln2, 0, 0]
    w, b = L.steerlm2_weights(attr, p_y, q_prime, q_theta, 4)
    # w' = [4, 2, 1, 1] / 8, b' = [1, 2, 2, 1] / 6
    torch.testing.assert_close(w, t([1 / 2, 1 / 4, 1 / 8, 1 / 8]), atol=1e-15, rtol=0)
    torch.testing.assert_close(b, t([1 / 6, 1 / 3, 1 / 3, 1 / 6]), atol=1e-15, rtol=0)
    policy = q_theta.clone().requires_grad_()
    loss_sum, tokens, sums = L.steerlm2_loss(policy, t([4.0, 6.0, 3.0, 7.0]), attr, p_y, q_prime, 4)
    loss = loss_sum / tokens  # 4·Σ (w' − b')(−log Q_θ) over 20 tokens
    # w' − b' = [1/3, −1/12, −5/24, −1/24]; T̄ = 5; L = Σ (w' − b')(−log Q_θ) / 5
    nll = [6.0, 8.0 - ln2, 4.0 - ln2, 10.0]
    want = (nll[0] / 3 - nll[1] / 12 - 5 * nll[2] / 24 - nll[3] / 24) / 5
    assert abs(float(loss.detach()) - want) < 1e-12
    loss.backward()
    torch.testing.assert_close(policy.grad, t([-1 / 15, 1 / 60, 1 / 24, 1 / 120]), atol=1e-15, rtol=0)
    # distance Σ w' log(w'/b') = ½ ln 3 + ¼ ln ¾ + ⅛ ln ⅜ + ⅛ ln ¾
    kl = 0.5 * math.log(3) + 0.25 * math.log(0.75) + 0.125 * math.log(0.375) + 0.125 * math.log(0.75)
    assert abs(float(sums["kl_w_b"]) - kl) < 1e-6 and float(sums["groups"]) == 1.0
    assert abs(float(sums["weight_max"]) - 0.5) < 1e-7


def incomplete_beta_integer(x, a, b):
    """I_x(a, b) for integer a, b: P(Binomial(a+b−1, x) ≥ a)."""
    n = a + b - 1
    return sum(math.comb(n, j) * x**j * (1 - x) ** (n - j) for j in range(a, n + 1))


def test_attribute_log_likelihood_integer_beta():
    # ŷ = 2 -> r = 0.5 -> Beta(12, 12); level 2 -> bin [0.4, 0.6]
    # ŷ = 1 -> r = 0.25 -> Beta(6, 18); level 0 -> bin [0, 0.2]
    # ŷ = 3 -> r = 0.75 -> Beta(18, 6); level 4 -> bin [0.8, 1]
    p1 = incomplete_beta_integer(0.6, 12, 12) - incomplete_beta_integer(0.4, 12, 12)
    p2 = incomplete_beta_integer(0.2, 6, 18)
    p3 = 1 - incomplete_beta_integer(0.8, 18, 6)
    close(p1, 0.6727131, 1e-6)
    out = L.attribute_log_likelihood(t([[2.0, 1.0, 3.0]]), torch.tensor([[2, 0, 4]]))
    close(out[0], math.log(p1) + math.log(p2) + math.log(p3), 1e-10)
    masked = L.attribute_log_likelihood(t([[2.0, 1.0, 3.0]]), torch.tensor([[2, 0, 4]]), mask=t([[1.0, 0.0, 1.0]]))
    close(masked[0], math.log(p1) + math.log(p3), 1e-10)
    # the five bins of one attribute hold all the mass
    probs = [math.exp(float(L.attribute_log_likelihood(t([[2.7]]), torch.tensor([[n]]))[0])) for n in range(5)]
    close(sum(probs), 1.0, 1e-12)
    with pytest.raises(ValueError, match="integers in 0..4"):
        L.attribute_log_likelihood(t([[2.0]]), torch.tensor([[5]]))


def test_beta_cdf_against_integer_closed_form():
    for x, a, b in ((0.3, 2, 5), (0.9, 7, 3), (0.5, 1, 1), (0.05, 20, 4), (0.99, 3, 30)):
        close(L.beta_cdf(torch.tensor(x, dtype=torch.float64), torch.tensor(float(a)), torch.tensor(float(b))),
              incomplete_beta_integer(x, a, b), 1e-12)


def test_beta_cdf_against_mpmath_at_non_integer_parameters():
    # mpmath's regularised incomplete beta (hypergeometric series, 30 digits) is an
    # implementation independent of the continued fraction under test. The parameters
    # are those attribute_log_likelihood produces: alpha = 24 r, beta = 24 - alpha for a
    # predicted attribute r in (0, 1), evaluated at the 0..4 bin edges, plus extremes.
    import mpmath

    mpmath.mp.dps = 30
    cases = []
    for r in (0.37, 0.013, 0.5, 0.81, 0.9917):
        alpha = 24 * r
        cases += [(x, alpha, 24 - alpha) for x in (0.2, 0.4, 0.6, 0.8)]
    cases += [(0.3, 0.5, 0.5), (0.999, 2.5, 0.7), (1e-4, 0.2, 3.3), (0.45, 150.25, 180.5)]
    for x, a, b in cases:
        want = float(mpmath.betainc(mpmath.mpf(a), mpmath.mpf(b), 0, mpmath.mpf(x), regularized=True))
        got = float(L.beta_cdf(torch.tensor(x, dtype=torch.float64), torch.tensor(a, dtype=torch.float64),
                               torch.tensor(b, dtype=torch.float64)))
        assert abs(got - want) < 1e-12, (x, a, b, got, want)
    # broadcast over a batch gives the same values as one at a time
    xs = torch.tensor([c[0] for c in cases], dtype=torch.float64)
    batch = L.beta_cdf(xs, torch.tensor([c[1] for c in cases], dtype=torch.float64),
                       torch.tensor([c[2] for c in cases], dtype=torch.float64))
    for (x, a, b), got in zip(cases, batch.tolist()):
        want = float(mpmath.betainc(a, b, 0, x, regularized=True))
        assert abs(got - want) < 1e-12, (x, a, b, got, want)
