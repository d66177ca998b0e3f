"""aligner.algorithms.losses.advantages: every registered estimator against hand-computed
values on a small ragged batch, GAE against an independent loop, the registry's
declarations, DAPO's shaping and group filter."""
import math

import pytest
import torch

from aligner.algorithms.losses import advantages as A
from aligner.algorithms.losses.common import masked_moments, masked_whiten
from tests.algorithms.losses.values import t

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


def test_registry_declares_inputs_whitening_and_groups():
    assert list(A.ADVANTAGE_ESTIMATORS) == ["rloo", "grpo", "dr_grpo", "reinforce_pp", "reinforce_pp_baseline", "gae"]
    assert {n for n, e in A.ADVANTAGE_ESTIMATORS.items() if e.whiten} == {"reinforce_pp", "reinforce_pp_baseline",
                                                                           "gae"}
    assert {n for n, e in A.ADVANTAGE_ESTIMATORS.items() if e.needs_group} == {"rloo", "grpo", "dr_grpo",
                                                                                "reinforce_pp_baseline"}
    assert A.ADVANTAGE_ESTIMATORS["gae"].inputs == ("token_kl", "kl_coef", "values", "gamma", "lam")
    with pytest.raises(ValueError, match=r"needs \['values', 'lam'\]"):
        A.compute_advantages("gae", REWARDS, MASK, GROUP, gamma=1.0)
    with pytest.raises(ValueError, match="registered twice"):
        A.register_advantage("rloo")(lambda *a, **k: None)


def test_rloo_by_hand_and_identity():
    adv = per_row(A.compute_advantages("rloo", REWARDS, MASK, GROUP, valid=VALID))
    assert adv == pytest.approx([-1.5, 0.0, 1.5, 0, 0, 0, -4.0, 4.0, 0.0], abs=1e-12)
    g = torch.Generator().manual_seed(0)
    r = torch.randn(24, generator=g, dtype=torch.float64)
    m = torch.ones(24, 3, dtype=torch.float64)
    got = A.compute_advantages("rloo", r, m, 4)[:, 0]
    groups = r.view(6, 4)
    want = (4 / 3 * (groups - groups.mean(-1, keepdim=True))).reshape(-1)
    assert torch.allclose(got, want, atol=1e-12)


def test_rloo_by_group_ids():
    rewards = t([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 6.0, 2.0])
    ones = torch.ones(8, 1, dtype=torch.float64)
    adv = A.compute_advantages("rloo", rewards, ones, 4)[:, 0]
    # group 1: 1 − (2+3+4)/3 = −2; 2 − 8/3 = −2/3; 3 − 7/3 = 2/3; 4 − 2 = 2
    # group 2: 0 − 8/3; 0 − 8/3; 6 − 2/3 = 16/3; 2 − 2 = 0
    torch.testing.assert_close(adv, t([-2.0, -2 / 3, 2 / 3, 2.0, -8 / 3, -8 / 3, 16 / 3, 0.0]))
    # explicit group ids (interleaved) give the same numbers
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    perm = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])
    torch.testing.assert_close(A.compute_advantages("rloo", rewards[perm], ones, ids[perm])[:, 0], adv[perm])


def test_kl_goes_into_the_sequence_reward_of_an_estimator_without_token_kl():
    ones = torch.ones(3, 2, dtype=torch.float64)
    # mean_t KL_t per row: 0.5, 0, 1 -> r' = r − 2·KL = [0, 2, 1]: A = [0 − 1.5, 2 − 0.5, 1 − 1]
    token_kl = t([[0.5, 0.5], [0.0, 0.0], [1.0, 1.0]])
    adv = per_row(A.compute_advantages("rloo", t([1.0, 2.0, 3.0]), ones, 3, token_kl=token_kl, kl_coef=2.0), ones)
    assert adv == pytest.approx([-1.5, 1.5, 0.0], abs=1e-12)


def test_grpo_by_hand():
    adv = per_row(A.compute_advantages("grpo", REWARDS, MASK, GROUP, valid=VALID))
    s = math.sqrt(8.0)
    e = A.GRPO_EPS
    want = [-1 / (1 + e), 0.0, 1 / (1 + e), 0, 0, 0, -2 / (s + e), 2 / (s + e), 0.0]
    assert adv == pytest.approx(want, abs=1e-12)


def test_dr_grpo_by_hand():
    adv = per_row(A.compute_advantages("dr_grpo", REWARDS, MASK, GROUP, valid=VALID))
    assert adv == pytest.approx([-1, 0, 1, 0, 0, 0, -2, 2, 0], abs=1e-12)


def test_reinforce_pp_returns_by_hand():
    mask = torch.tensor([[0, 1, 1, 1]], dtype=torch.float64)
    kl = torch.tensor([[0.0, 0.1, 0.2, 0.3]], dtype=torch.float64)
    ret = A.compute_advantages("reinforce_pp", t([2.0]), mask, 1, token_kl=kl, kl_coef=0.5, gamma=0.9)
    assert ret[0].tolist() == pytest.approx([0.0, 1.3585, 1.565, 1.85], abs=1e-12)
    base = A.compute_advantages("reinforce_pp_baseline", t([2.0, 4.0]), torch.ones(2, 2, dtype=torch.float64), 2,
                                gamma=1.0)
    assert base.tolist() == [[-1.0, -1.0], [1.0, 1.0]]


def test_reinforce_pp_on_the_ragged_batch_and_global_whitening():
    # γ = 1, no KL: every response token of a valid row carries its reward; the invalid row 0
    ret = A.compute_advantages("reinforce_pp", REWARDS, MASK, GROUP, valid=VALID, gamma=1.0)
    assert per_row(ret) == pytest.approx([1, 2, 3, 2, 2, 2, 0, 4, 0], abs=1e-12)
    base = A.compute_advantages("reinforce_pp_baseline", REWARDS, MASK, GROUP, valid=VALID, gamma=1.0)
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


def test_ppo_token_rewards():
    token_kl = t([[0.0, 0.5, 1.0, 4.0]])  # |d| = 0.5, 1 on the response tokens
    mask = t([[0.0, 1.0, 1.0, 0.0]])
    rewards = A.ppo_token_rewards(t([2.0]), token_kl, mask, kl_coef=0.1)
    # r = −0.1·KL on response tokens, plus the score 2 on the last response token
    torch.testing.assert_close(rewards, t([[0.0, -0.05, -0.1 + 2.0, 0.0]]))
    with pytest.raises(ValueError, match="no response token"):
        A.ppo_token_rewards(t([2.0]), token_kl, torch.zeros_like(mask), 0.1)


def test_gae_hand_example():
    # row 0: prompt token, 3 response tokens, padding; masked positions hold junk that must not matter
    rewards = t([9.0, 0.0, 0.0, 1.0, 7.0], [0.0, 0.0, 0.0, 0.0, 2.0])
    values = t([5.0, 0.5, 0.6, 0.7, 3.0], [0.0, 0.0, 0.0, 1.0, 1.0])
    mask = t([0.0, 1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0, 1.0])
    adv, ret = A.gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)  # γλ = 0.72
    # row 0: t=3: δ = 1 + 0.9·0 − 0.7 = 0.3, A = 0.3
    #        t=2: δ = 0 + 0.9·0.7 − 0.6 = 0.03, A = 0.03 + 0.72·0.3 = 0.246
    #        t=1: δ = 0 + 0.9·0.6 − 0.5 = 0.04, A = 0.04 + 0.72·0.246 = 0.21712
    # row 1: t=4: δ = 2 − 1 = 1, A = 1;  t=3: δ = 0.9·1 − 1 = −0.1, A = −0.1 + 0.72 = 0.62
    torch.testing.assert_close(adv, t([0.0, 0.21712, 0.246, 0.3, 0.0], [0.0, 0.0, 0.0, 0.62, 1.0]))
    torch.testing.assert_close(ret, t([0.0, 0.71712, 0.846, 1.0, 0.0], [0.0, 0.0, 0.0, 1.62, 2.0]))
    # γ = λ = 1: A_t = Σ_{k≥t} r_k − V_t (Monte Carlo): row 0 -> 1 − 0.5, 1 − 0.6, 1 − 0.7
    adv1, _ = A.gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv1[0], t([0.0, 0.5, 0.4, 0.3, 0.0]))


def test_gae_estimator_is_token_rewards_then_gae():
    # the registered "gae": score 1 on the last token, −0.5·KL on each, then GAE (γ = 0.9, λ = 0.8)
    token_kl = t([[0.0, 0.2, 0.4, 0.0]])
    mask = t([[0.0, 1.0, 1.0, 0.0]])
    values = t([[0.0, 0.5, 0.25, 0.0]])
    adv = A.compute_advantages("gae", t([1.0]), mask, 1, token_kl=token_kl, kl_coef=0.5, values=values,
                               gamma=0.9, lam=0.8)
    # r = [0, −0.1, 1 − 0.2]; t=2: δ = 0.8 − 0.25 = 0.55; t=1: δ = −0.1 + 0.9·0.25 − 0.5 = −0.375,
    # A = −0.375 + 0.72·0.55 = 0.021
    torch.testing.assert_close(adv, t([[0.0, 0.021, 0.55, 0.0]]))


def _gae_loop(rewards, values, mask, gamma, lam):
    """Independent reference: per row, walk the response positions backwards in Python floats."""
    adv = [[0.0] * len(r) for r in rewards]
    for b in range(len(rewards)):
        pos = [i for i in range(len(rewards[b])) if mask[b][i]]
        next_v, next_a = 0.0, 0.0
        for i in reversed(pos):
            delta = rewards[b][i] + gamma * next_v - values[b][i]
            a = delta + gamma * lam * next_a
            adv[b][i] = a
            next_v, next_a = values[b][i], a
    return adv


def test_gae_matches_an_independent_loop_on_ragged_masks():
    g = torch.Generator().manual_seed(0)
    b, s = 6, 17
    rewards = torch.randn(b, s, generator=g, dtype=torch.float64)
    values = torch.randn(b, s, generator=g, dtype=torch.float64)
    mask = torch.zeros(b, s)
    for i in range(b):  # ragged: each row its own prompt length and response length
        start = int(torch.randint(0, 6, (1,), generator=g))
        length = int(torch.randint(1, s - start + 1, (1,), generator=g))
        mask[i, start:start + length] = 1.0
    mask[2, 9] = 0.0  # a hole inside a response is skipped over
    for gamma, lam in ((0.9, 0.8), (0.99, 0.95), (1.0, 0.95)):
        adv, ret = A.gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
        ref = torch.tensor(_gae_loop(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam), dtype=torch.float64)
        torch.testing.assert_close(adv, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(ret, torch.where(mask.bool(), ref + values, torch.zeros_like(ref)), atol=1e-6,
                                   rtol=0)


def test_overlong_penalty_and_dynamic_sampling():
    pen = A.overlong_penalty(torch.tensor([5, 6, 8, 10, 11]), max_length=10, cache=4)
    assert pen.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])
    keep = A.groups_with_signal(REWARDS, GROUP, valid=VALID)
    assert keep.tolist() == [True] * 3 + [False] * 3 + [True] * 3
    # group C without its valid spread: rows 6 (0.0) and 7 (0.0) equal -> no signal
    r = REWARDS.clone()
    r[7] = 0.0
    assert A.groups_with_signal(r, GROUP, valid=VALID).tolist()[6:] == [False] * 3


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="not finite"):
        A.compute_advantages("grpo", torch.tensor([1.0, float("nan")]), torch.ones(2, 1), 2)
    with pytest.raises(ValueError, match="one of"):
        A.compute_advantages("ppo2", REWARDS, MASK, GROUP)
    with pytest.raises(ValueError, match="groups of 3"):
        A.compute_advantages("grpo", torch.ones(4), torch.ones(4, 1), 3)
