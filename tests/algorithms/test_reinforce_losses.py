"""The REINFORCE family's estimators, KL terms, surrogate, aggregation and DAPO options
against hand-computed values on a small ragged batch."""
import math

import pytest
import torch

from aligner.algorithms.losses import reinforce as R

# three groups of three rows: A (rewards 1, 2, 3), B (all equal: zero std), C (row 8 has no
# EOS and is excluded); response masks of different lengths
REWARDS = torch.tensor([1.0, 2.0, 3.0, 2.0, 2.0, 2.0, 0.0, 4.0, 1.0], dtype=torch.float64)
VALID = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)
LENGTHS = [2, 3, 1, 4, 2, 2, 3, 1, 4]
MASK = torch.tensor([[0] * (4 - n) + [1] * n for n in LENGTHS], dtype=torch.float64)
GROUP = 3


def per_row(adv, mask=MASK):
    """The single value each row's response tokens carry (checks the broadcast too)."""
    rows = []
    for i in range(adv.shape[0]):
        vals = adv[i][mask[i] != 0]
        assert torch.allclose(vals, vals[0].expand_as(vals)), f"row {i} not constant over its tokens"
        assert torch.all(adv[i][mask[i] == 0] == 0)
        rows.append(float(vals[0]))
    return rows


def test_rloo_by_hand_and_identity():
    adv = per_row(R.advantages("rloo", REWARDS, MASK, GROUP, valid=VALID))
    assert adv == pytest.approx([-1.5, 0.0, 1.5, 0, 0, 0, -4.0, 4.0, 0.0], abs=1e-12)
    g = torch.Generator().manual_seed(0)
    r = torch.randn(24, generator=g, dtype=torch.float64)
    m = torch.ones(24, 3, dtype=torch.float64)
    got = R.advantages("rloo", r, m, 4)[:, 0]
    groups = r.view(6, 4)
    want = (4 / 3 * (groups - groups.mean(-1, keepdim=True))).reshape(-1)
    assert torch.allclose(got, want, atol=1e-12)


def test_rloo_kl_in_reward():
    seq_kl = torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64)
    ones = torch.ones(3, 2, dtype=torch.float64)
    adv = per_row(R.advantages("rloo", torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), ones, 3,
                               seq_kl=seq_kl, kl_coef=2.0), ones)
    # r' = [0, 2, 1]: A = [0 - 1.5, 2 - 0.5, 1 - 1]
    assert adv == pytest.approx([-1.5, 1.5, 0.0], abs=1e-12)


def test_grpo_by_hand():
    adv = per_row(R.advantages("grpo", REWARDS, MASK, GROUP, valid=VALID))
    s = math.sqrt(8.0)
    e = R.GRPO_EPS
    want = [-1 / (1 + e), 0.0, 1 / (1 + e), 0, 0, 0, -2 / (s + e), 2 / (s + e), 0.0]
    assert adv == pytest.approx(want, abs=1e-12)


def test_dr_grpo_by_hand():
    adv = per_row(R.advantages("dr_grpo", REWARDS, MASK, GROUP, valid=VALID))
    assert adv == pytest.approx([-1, 0, 1, 0, 0, 0, -2, 2, 0], abs=1e-12)


def test_reinforce_pp_returns_by_hand():
    mask = torch.tensor([[0, 1, 1, 1]], dtype=torch.float64)
    kl = torch.tensor([[0.0, 0.1, 0.2, 0.3]], dtype=torch.float64)
    ret = R.advantages("reinforce_pp", torch.tensor([2.0], dtype=torch.float64), mask, 1, token_kl=kl,
                       kl_coef=0.5, gamma=0.9)
    assert ret[0].tolist() == pytest.approx([0.0, 1.3585, 1.565, 1.85], abs=1e-12)
    base = R.advantages("reinforce_pp_baseline", torch.tensor([2.0, 4.0], dtype=torch.float64),
                        torch.ones(2, 2, dtype=torch.float64), 2)
    assert base.tolist() == [[-1.0, -1.0], [1.0, 1.0]]
    assert "reinforce_pp" in R.NEEDS_GLOBAL_WHITENING


def test_kl_estimators_values_and_gradients():
    ref = torch.tensor([-1.5], dtype=torch.float64)
    want = {"k1": 0.5, "abs": 0.5, "k2": 0.125, "k3": math.exp(-0.5) - 0.5, "k3+": math.exp(-0.5) - 0.5}
    # d/dlogp: k1 -> 1, k2 -> -delta = 0.5, k3 -> 1 - exp(delta), k3+ -> k2's
    grads = {"k1": 1.0, "abs": 1.0, "k2": 0.5, "k3": 1 - math.exp(-0.5), "k3+": 0.5}
    for kind in R.KL_ESTIMATORS:
        logp = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
        v = R.kl_estimate(logp, ref, kind)
        v.sum().backward()
        assert float(v.detach()) == pytest.approx(want[kind], abs=1e-12), kind
        assert float(logp.grad) == pytest.approx(grads[kind], abs=1e-12), kind
    big = R.kl_estimate(torch.tensor([0.0]), torch.tensor([-100.0]), "k3")
    assert float(big) == pytest.approx(R.KL_VALUE_CLAMP)
    with pytest.raises(ValueError, match="k3"):
        R.kl_estimate(ref, ref, "k4")


def test_clipped_surrogate_sanity_clip_higher_and_dual_clip():
    logp = torch.log(torch.tensor([[0.5, 1.0, 1.5]], dtype=torch.float64))
    old = torch.zeros(1, 3, dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, 2.0]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.float64)
    loss, stats = R.clipped_surrogate(logp, old, adv, mask, 0.2, 0.2)
    assert float(loss.mean()) == pytest.approx(-0.6333333333, abs=1e-9)
    loss, _ = R.clipped_surrogate(logp, old, adv, mask, 0.2, 0.28)
    assert float(loss.mean()) == pytest.approx((-0.5 + 1.0 - 2.56) / 3, abs=1e-12)
    loss, stats = R.clipped_surrogate(torch.log(torch.tensor([[5.0]], dtype=torch.float64)),
                                      torch.zeros(1, 1, dtype=torch.float64), torch.tensor([[-1.0]], dtype=torch.float64),
                                      torch.ones(1, 1), 0.2, 0.2, dual_clip=3.0)
    assert float(loss) == 3.0 and float(stats["dual_clipfrac"]) == 1.0


def test_aggregations_by_hand_and_split_invariance():
    tl = torch.tensor([[1, 2, 0, 0], [3, 3, 3, 0], [5, 0, 0, 0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float64)
    want = {"token_mean": 17 / 6, "seq_mean_token_mean": 9.5 / 3, "seq_mean_token_sum": 17 / 3,
            "seq_sum_constant": 17 / 4 / 3}
    for mode, value in want.items():
        num, den = R.aggregate(tl, mask, mode, constant=4)
        assert float(num / den) == pytest.approx(value, abs=1e-12), mode
        # two micro-batches (rows 0 | rows 1-2): summed numerators over summed denominators
        n1, d1 = R.aggregate(tl[:1], mask[:1], mode, constant=4)
        n2, d2 = R.aggregate(tl[1:], mask[1:], mode, constant=4)
        assert float((n1 + n2) / (d1 + d2)) == pytest.approx(value, abs=1e-12), mode


def test_overlong_penalty_and_dynamic_sampling():
    pen = R.overlong_penalty(torch.tensor([5, 6, 8, 10, 11]), max_length=10, cache=4)
    assert pen.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])
    keep = R.groups_with_signal(REWARDS, GROUP, valid=VALID)
    assert keep.tolist() == [True] * 3 + [False] * 3 + [True] * 3
    # group C without its valid spread: rows 6 (0.0) and 7 (0.0) equal -> no signal
    r = REWARDS.clone()
    r[7] = 0.0
    assert R.groups_with_signal(r, GROUP, valid=VALID).tolist()[6:] == [False] * 3


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="not finite"):
        R.advantages("grpo", torch.tensor([1.0, float("nan")]), torch.ones(2, 1), 2)
    with pytest.raises(ValueError, match="one of"):
        R.advantages("ppo2", REWARDS, MASK, GROUP)
    with pytest.raises(ValueError, match="groups of 3"):
        R.advantages("grpo", torch.ones(4), torch.ones(4, 1), 3)


def test_reinforce_pp_on_the_ragged_batch_and_global_whitening():
    from aligner.algorithms.losses.common import masked_moments, masked_whiten

    # γ = 1, no KL: every response token of a valid row carries its reward; the invalid row 0
    ret = R.advantages("reinforce_pp", REWARDS, MASK, GROUP, valid=VALID)
    assert per_row(ret) == pytest.approx([1, 2, 3, 2, 2, 2, 0, 4, 0], abs=1e-12)
    base = R.advantages("reinforce_pp_baseline", REWARDS, MASK, GROUP, valid=VALID)
    assert per_row(base) == pytest.approx([-1, 0, 1, 0, 0, 0, -2, 2, 0], abs=1e-12)
    # whitened over every valid token of the batch: token-weighted mean 31/18 over 18 tokens
    m = MASK * VALID[:, None]
    values = [1, 2, 3, 2, 2, 2, 0, 4]
    n = sum(LENGTHS[:8])
    mean = sum(v * k for v, k in zip(values, LENGTHS)) / n
    var = sum(k * (v - mean) ** 2 for v, k in zip(values, LENGTHS)) / n
    assert n == 18 and mean == pytest.approx(31 / 18)
    whole = masked_whiten(ret, m)
    assert per_row(whole[:8], m[:8]) == pytest.approx([(v - mean) / math.sqrt(var + 1e-8) for v in values], abs=1e-9)
    # two data-parallel ranks holding whole groups: summed moments give the same whitening
    moments = masked_moments(ret[:6], m[:6]) + masked_moments(ret[6:], m[6:])
    split = torch.cat([masked_whiten(ret[:6], m[:6], moments), masked_whiten(ret[6:], m[6:], moments)])
    assert torch.allclose(split, whole, atol=1e-12)
