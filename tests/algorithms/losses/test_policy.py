"""aligner.algorithms.losses.policy: the KL estimators (every estimator's value and
gradient by hand, and the clamps); the clipped surrogate and the REINFORCE token loss
through :func:`policy_objective` (the function the online algorithms train with),
against hand-computed values; aggregation and gradients."""
import math

import pytest
import torch

from aligner.algorithms.losses import policy as P
from tests.algorithms.losses.values import close, random_leaf, t


def objective(logps, advantages, mask=None, entropy=None, old=None, **options):
    """``numerator / denominator`` of :func:`policy_objective` and its sums."""
    mask = torch.ones_like(logps) if mask is None else mask
    batch = {"old_logps": torch.zeros_like(logps) if old is None else old, "advantages": advantages,
             "loss_mask": mask}
    num, den, sums = P.policy_objective(P.PolicyLossOptions(**options), logps,
                                        torch.zeros_like(logps) if entropy is None else entropy, batch)
    return num / den, {k: s / c for k, (s, c) in sums.items()}


def test_clipped_surrogate_reference_sanity_value():
    logps = torch.log(t([[0.5, 1.0, 1.5]])).requires_grad_()
    loss, stats = objective(logps, t([[1.0, -1.0, 2.0]]))
    # max(−0.5, −0.8) = −0.5 ; max(1, 1) = 1 ; max(−3, −2.4) = −2.4 -> mean −1.9/3 = −0.6333
    close(loss, -1.9 / 3)
    assert round(float(loss.detach()), 4) == -0.6333
    close(stats["policy/clipfrac"], 1 / 3)
    close(stats["loss/policy"], -1.9 / 3)


def test_clipped_surrogate_clips_both_sides():
    logps = torch.log(t([[0.5, 0.5, 1.5, 1.5, 3.0]])).requires_grad_()
    adv = t([[1.0, -1.0, 1.0, -1.0, 100.0]])
    mask = t([[1.0, 1.0, 1.0, 1.0, 0.0]])  # the last token is not a response token
    loss, stats = objective(logps, adv, mask)
    # (0.5, +1): max(−0.5, −0.8) = −0.5   unclipped
    # (0.5, −1): max( 0.5,  0.8) =  0.8   clipped at 1 − ε (pessimistic side)
    # (1.5, +1): max(−1.5, −1.2) = −1.2   clipped at 1 + ε
    # (1.5, −1): max( 1.5,  1.2) =  1.5   unclipped
    # mean over the 4 response tokens: 0.6 / 4 = 0.15
    close(loss, 0.15)
    close(stats["policy/clipfrac"], 0.5)
    loss.backward()
    # d/dlogp of −A·ratio is −A·ratio on unclipped tokens (/4), 0 where the clip is active or masked
    torch.testing.assert_close(logps.grad, t([[-0.5 / 4, 0.0, 0.0, 1.5 / 4, 0.0]]))


def test_dual_clip_and_clip_higher():
    ratios = t([[5.0, 1.25, 0.7]])
    adv = t([[-1.0, 1.0, -2.0]])
    loss, stats = objective(torch.log(ratios), adv, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    # token 0: max(5, 1.2) = 5, A < 0 -> min(5, 3) = 3 (dual clip); token 1: max(-1.25, -1.25) (1.25 < 1.28);
    # token 2: max(1.4, 1.6) = 1.6 (clipped at 1 - 0.2)
    assert math.isclose(float(loss), (3.0 - 1.25 + 1.6) / 3, rel_tol=1e-9)
    assert math.isclose(float(stats["policy/dual_clipfrac"]), 1 / 3, rel_tol=1e-9)
    # clip-higher alone on the sanity example: the third token clips at 1.28 instead of 1.2
    loss, _ = objective(torch.log(t([[0.5, 1.0, 1.5]])), t([[1.0, -1.0, 2.0]]), clip_high=0.28)
    assert float(loss) == pytest.approx((-0.5 + 1.0 - 2.56) / 3, abs=1e-12)
    with pytest.raises(ValueError, match="dual_clip"):
        objective(torch.log(ratios), adv, dual_clip=0.5)


def test_entropy_bonus_and_kl_term():
    logps = torch.log(t([[0.5, 1.0, 1.5]]))
    loss, stats = objective(logps, t([[1.0, -1.0, 2.0]]), entropy=t([[1.0, 2.0, 3.0]]), entropy_coef=0.01)
    close(loss, -1.9 / 3 - 0.01 * 2.0)
    close(stats["policy/entropy"], 2.0)
    # a k1 KL term: d = log π − log π_ref = [log 0.5, 0, log 1.5] against a reference of 0
    batch = {"old_logps": torch.zeros(1, 3, dtype=torch.float64), "advantages": t([[1.0, -1.0, 2.0]]),
             "loss_mask": torch.ones(1, 3), "ref_logps": torch.zeros(1, 3, dtype=torch.float64)}
    num, den, sums = P.policy_objective(P.PolicyLossOptions(kl_coef=0.1, kl_estimator="k1"), logps,
                                        torch.zeros_like(logps), batch)
    kl = (math.log(0.5) + math.log(1.5)) / 3
    close(num / den, -1.9 / 3 + 0.1 * kl)
    close(sums["loss/kl"][0] / sums["loss/kl"][1], kl)


def test_reinforce_token_loss_per_token_advantages():
    logps = t([[-1.0, -2.0, 0.0], [-0.5, -0.5, -1.0]]).requires_grad_()
    mask = t([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = t([[2.0, 2.0, 0.0], [-1.0, -1.0, -1.0]])  # sequence advantages broadcast over the tokens
    loss, stats = objective(logps, adv, mask, kind="reinforce")
    # −logπ·A: row 0: 1·2, 2·2; row 1: 0.5·(−1), 0.5·(−1), 1·(−1) -> (2 + 4 − 2) / 5 tokens = 0.8
    close(loss, 0.8)
    assert float(stats["policy/clipfrac"]) == 0.0  # no clip in the on-policy loss
    loss.backward()
    torch.testing.assert_close(logps.grad, t([[-0.4, -0.4, 0.0], [0.2, 0.2, 0.2]]))


def test_aggregations_by_hand_and_split_invariance():
    tl = torch.tensor([[1, 2, 0, 0], [3, 3, 3, 0], [5, 0, 0, 0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float64)
    want = {"token_mean": 17 / 6, "seq_mean_token_mean": 9.5 / 3, "seq_mean_token_sum": 17 / 3,
            "seq_sum_constant": 17 / 4 / 3}
    assert set(want) == set(P.AGGREGATIONS)
    for mode, value in want.items():
        num, den = P.aggregate(tl, mask, mode, constant=4)
        assert float(num / den) == pytest.approx(value, abs=1e-12), mode
        # two micro-batches (rows 0 | rows 1-2): summed numerators over summed denominators
        n1, d1 = P.aggregate(tl[:1], mask[:1], mode, constant=4)
        n2, d2 = P.aggregate(tl[1:], mask[1:], mode, constant=4)
        assert float((n1 + n2) / (d1 + d2)) == pytest.approx(value, abs=1e-12), mode


def test_aggregate_count_is_the_denominator_from_the_mask_alone():
    """What an MoE policy's router losses are weighed by before the loss exists: 5 masked
    tokens, 2 rows with any (a row with none counts as no sequence)."""
    tl = torch.tensor([[1, 2, 0, 0], [3, 3, 3, 0], [0, 0, 0, 0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.float64)
    want = {"token_mean": 5, "seq_mean_token_mean": 2, "seq_mean_token_sum": 2, "seq_sum_constant": 2}
    for mode in P.AGGREGATIONS:
        _, den = P.aggregate(tl, mask, mode, constant=4)
        assert P.aggregate_count(mask, mode) == int(den) == want[mode], mode
    with pytest.raises(ValueError, match="loss aggregation must be one of"):
        P.aggregate_count(mask, "token_sum")


def test_gradcheck_policy_objective():
    # ratios kept away from the clip boundaries 0.8 / 1.2 and from ties (the kinks)
    logps = torch.log(t([[0.5, 0.9, 1.1, 1.6], [1.05, 0.7, 1.3, 0.95]])).requires_grad_()
    adv = t([[1.0, -2.0, 0.5, -1.0], [2.0, 1.0, -0.5, 0.3]])
    mask = t([[1, 1, 1, 0], [1, 1, 1, 1]])
    ent = random_leaf(2, 4, seed=9)
    for kind in ("clipped", "reinforce"):
        assert torch.autograd.gradcheck(
            lambda lp, e: objective(lp, adv, mask, entropy=e, kind=kind, entropy_coef=0.01)[0], (logps, ent)), kind


# a ragged batch: row 0 has 3 response tokens, row 1 has 1 (then padding)
RAGGED_MASK = [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]


def test_gspo_sequence_ratio_and_clip_on_a_ragged_batch():
    old = t([[-1.0, -2.0, -0.5], [-1.0, -7.0, -7.0]])
    # row 0: token log-ratios [0.3, −0.6, 0.9] -> mean 0.2, s_0 = e^0.2 = 1.221403; row 1: log-ratio −0.1
    logps = (old + t([[0.3, -0.6, 0.9], [-0.1, 5.0, 5.0]])).requires_grad_()
    adv = t([[1.0, 1.0, 1.0], [-2.0, 9.0, 9.0]])  # padding carries junk: it is masked away
    loss, stats = objective(logps, adv, t(RAGGED_MASK), old=old, kind="gspo", clip_low=0.1, clip_high=0.15,
                            aggregation="seq_mean_token_mean")
    s0, s1 = math.exp(0.2), math.exp(-0.1)
    # row 0, A = 1: max(−1.221403, −1.15) = −1.15 (clipped high); row 1, A = −2: max(2·0.904837, 2·0.9) = 1.809675
    l0, l1 = max(-s0, -1.15), max(2 * s1, 2 * 0.9)
    close(l0, -1.15)
    close(loss, (l0 + l1) / 2)  # the paper's (1/G) Σ_i l_i
    close(stats["policy/clipfrac"], 3 / 4)  # row 0's three tokens of the four
    close(stats["policy/ratio"], (3 * s0 + s1) / 4)
    loss.backward()
    # row 0 clipped: no gradient; row 1: d/dlogp (−A·s_1) / 2 rows = 2·s_1 / 2 on its one token
    torch.testing.assert_close(logps.grad, t([[0.0, 0.0, 0.0], [s1, 0.0, 0.0]]))
    # the paper's default range (3e-4, 4e-4) comes from the registry
    assert (P.POLICY_LOSSES["gspo"].clip_low, P.POLICY_LOSSES["gspo"].clip_high) == (3e-4, 4e-4)


def test_cispo_clipped_stop_gradient_weights_on_a_ragged_batch():
    old = t([[-1.0, -2.0, -0.5], [-1.0, -7.0, -7.0]])
    ratios = t([[6.0, 0.5, 1.0], [0.01, 1.0, 1.0]])
    logps = (old + torch.log(ratios)).requires_grad_()
    adv = t([[1.0, -1.0, 2.0], [3.0, 9.0, 9.0]])
    loss, stats = objective(logps, adv, t(RAGGED_MASK), old=old, kind="cispo", clip_low=1.0, clip_high=4.0)
    # weights clip(ρ, 0, 5): [5, 0.5, 1], [0.01]; l_t = −w·A·log π
    lp = (old + torch.log(ratios)).tolist()
    want = [-5.0 * 1.0 * lp[0][0], -0.5 * -1.0 * lp[0][1], -1.0 * 2.0 * lp[0][2], -0.01 * 3.0 * lp[1][0]]
    close(loss, sum(want) / 4)  # token_mean over the 4 response tokens
    close(stats["policy/clipfrac"], 1 / 4)
    loss.backward()
    # the weight is a constant: d l_t / d log π = −w·A, even where it was clipped
    torch.testing.assert_close(logps.grad, t([[-5.0, 0.5, -2.0], [-0.03, 0.0, 0.0]]) / 4)


def test_policy_loss_registry():
    assert list(P.POLICY_LOSSES) == ["clipped", "reinforce", "gspo", "cispo"]
    with pytest.raises(ValueError, match="already registered"):
        P.register_policy_loss("gspo")(P.gspo_token_loss)
    with pytest.raises(ValueError, match="policy loss must be one of"):
        objective(t([[0.0]]), t([[1.0]]), kind="ppo2")


# ------------------------------------------------------------------------------ KL estimators
def test_kl_estimators_values_and_gradients():
    ref = torch.tensor([-1.5], dtype=torch.float64)
    want = {"k1": 0.5, "abs": 0.5, "k2": 0.125, "k3": math.exp(-0.5) - 0.5, "k3+": math.exp(-0.5) - 0.5}
    # d/dlogp: k1 -> 1, k2 -> -delta = 0.5, k3 -> 1 - exp(delta), k3+ -> k2's
    grads = {"k1": 1.0, "abs": 1.0, "k2": 0.5, "k3": 1 - math.exp(-0.5), "k3+": 0.5}
    for kind in P.KL_ESTIMATORS:
        logp = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
        v = P.kl_estimate(logp, ref, kind)
        v.sum().backward()
        assert float(v.detach()) == pytest.approx(want[kind], abs=1e-12), kind
        assert float(logp.grad) == pytest.approx(grads[kind], abs=1e-12), kind
    with pytest.raises(ValueError, match="k3"):
        P.kl_estimate(ref, ref, "k4")


def test_kl_estimates_are_clamped():
    logps, ref = torch.tensor([[0.0, 0.0, -0.5]]), torch.tensor([[-50.0, 30.0, 0.0]])
    assert P.kl_estimate(logps, ref, "k1").tolist()[0][:2] == [10.0, -10.0]  # log-ratio ±20, estimate ±10
    assert P.kl_estimate(logps, ref, "abs").tolist()[0][:2] == [10.0, 10.0]
    k3 = P.kl_estimate(logps, ref, "k3")
    assert float(k3[0, 0]) == 10.0 and float(k3[0, 1]) == 10.0
    assert math.isclose(float(k3[0, 2]), math.exp(0.5) - 1 - 0.5, rel_tol=1e-6)
    assert float(P.kl_estimate(torch.tensor([0.0]), torch.tensor([-100.0]), "k3")) == pytest.approx(P.KL_VALUE_CLAMP)


def test_k3_by_hand_and_sequence_mean():
    logps = torch.tensor([[0.0, -1.0, -2.0, 5.0]], dtype=torch.float64)
    ref = torch.tensor([[0.0, -1.5, -1.0, 9.0]], dtype=torch.float64)
    # k3 = exp(−d) − 1 + d: d = 0.5 -> 0.1065307, d = −1 -> e − 2 = 0.7182818
    k3 = P.kl_estimate(logps, ref, "k3")
    assert abs(float(k3[0, 1]) - (math.exp(-0.5) - 0.5)) < 1e-12
    assert abs(float(k3[0, 2]) - (math.e - 2)) < 1e-12
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    # |d| on the two response tokens: 0.5 and 1 -> mean 0.75
    assert P.sequence_mean_kl(P.kl_estimate(logps, ref, "abs"), mask).tolist() == [0.75]
