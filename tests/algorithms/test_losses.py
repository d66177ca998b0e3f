"""aligner.algorithms.losses against hand-computed values (plain python math, worked in the
comments), plus float64 gradchecks of the main losses."""
import math

import pytest
import torch

from aligner.algorithms import losses as L

LN2 = 0.6931471805599453


def softplus(x):  # −logσ(−x) = log(1 + e^x), plain math
    return math.log1p(math.exp(x))


def nll_sigmoid(x):  # −logσ(x)
    return softplus(-x)


def t(*rows, dtype=torch.float64):
    return torch.tensor(rows if len(rows) > 1 else rows[0], dtype=dtype)


def close(a, b, tol=1e-9):
    a = a.detach() if torch.is_tensor(a) else a
    assert abs(float(a) - float(b)) < tol, (float(a), float(b))


# ====================================================================== reductions


def test_sequence_logps_sum_and_mean():
    lp = t([-1.0, -2.0, -3.0, 7.0], [-0.5, -0.5, float("nan"), 0.0])
    mask = t([0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0])
    # row 0: response tokens -2, -3 -> sum -5, mean -2.5; row 1: -0.5, -0.5 -> -1, -0.5 (NaN masked away)
    assert L.sequence_logps(lp, mask).tolist() == [-5.0, -1.0]
    assert L.sequence_logps(lp, mask, average=True).tolist() == [-2.5, -0.5]


def test_masked_whiten_and_summable_moments():
    x = t([[1.0, 2.0, 3.0, 100.0]])
    mask = t([[1.0, 1.0, 1.0, 0.0]])
    # mean 2, population variance (1 + 0 + 1) / 3 = 2/3
    s = math.sqrt(2 / 3)
    out = L.masked_whiten(x, mask)
    torch.testing.assert_close(out, t([[-1 / s, 0.0, 1 / s, 0.0]]), atol=1e-7, rtol=0)
    # moments from two "ranks" summed equal the moments of the whole
    m = L.masked_moments(x[:, :2], mask[:, :2]) + L.masked_moments(x[:, 2:], mask[:, 2:])
    assert m.tolist() == [3.0, 6.0, 14.0]
    torch.testing.assert_close(L.masked_whiten(x, mask, moments=m), out)
    kept = L.masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(kept, t([[-1 / s + 2, 2.0, 1 / s + 2, 0.0]]), atol=1e-7, rtol=0)


# ====================================================================== reward models


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


def test_combine_attributes_rewardbench_weights():
    values = t([4.0, 3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 4.0])
    r = L.combine_attributes(values, L.REWARDBENCH_WEIGHTS_70B, L.HELPSTEER2_ATTRIBUTES)
    # 0.65·4 + 0.8·3 + 0.45·2 + 0.55·1 − 0.4·0 = 2.6 + 2.4 + 0.9 + 0.55 = 6.45 ; −0.4·4 = −1.6
    torch.testing.assert_close(r, t([6.45, -1.6]))
    # goodness: helpfulness, correctness, coherence only
    g = L.combine_attributes(values, L.GOODNESS_WEIGHTS, L.HELPSTEER2_ATTRIBUTES)
    torch.testing.assert_close(g, t([2.6 + 2.4 + 0.9, 0.0]))
    torch.testing.assert_close(L.combine_attributes(values, [1.0, 0, 0, 0, 1.0]), t([4.0, 4.0]))
    with pytest.raises(ValueError, match="not among"):
        L.combine_attributes(values, {"humour": 1.0}, L.HELPSTEER2_ATTRIBUTES)
    with pytest.raises(ValueError, match="3 attribute weights for a head of 5"):
        L.combine_attributes(values, [1.0, 2.0, 3.0])


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


# ====================================================================== DPO family

BETA = 0.5
PC, PR, RC, RR = [-10.0, -5.0], [-12.0, -5.0], [-11.0, -5.0], [-11.0, -5.0]
# ρ_c = PC − RC = [1, 0], ρ_r = PR − RR = [−1, 0], Δ = [2, 0], βΔ = [1, 0]


def pref(kind, **kw):
    return L.preference_loss(kind, t(PC), t(PR), t(RC), t(RR), kw.pop("beta", BETA), **kw)


def test_dpo_value_and_stats():
    loss, stats = pref("dpo")
    # mean(−logσ(1), −logσ(0)) = (0.3132617 + 0.6931472) / 2 = 0.5032044
    close(loss, (nll_sigmoid(1) + LN2) / 2)
    close(loss, 0.5032044, 1e-6)
    close(stats["rewards/chosen"], 0.25, 1e-7)  # mean(β·1, β·0)
    close(stats["rewards/rejected"], -0.25, 1e-7)
    close(stats["rewards/margins"], 0.5, 1e-7)
    close(stats["rewards/accuracy"], 0.5, 1e-7)  # the tie is not counted as correct
    assert all(not v.requires_grad and v.numel() == 1 for v in stats.values())


def test_identical_chosen_and_rejected_give_ln2():
    x = t([-3.0, -7.5, -1.25])
    r = t([-2.0, -9.0, -0.5])
    for kind, kw in (("dpo", {}), ("margin_dpo", {"strength": t([0.0, 0.0, 0.0])}),
                     ("scaled_dpo", {"strength": t([1.0, -1.0, 1.0])})):
        loss, stats = L.preference_loss(kind, x, x, r, r, 0.1, **kw)
        assert abs(float(loss) - math.log(2)) < 1e-15, kind
        assert float(stats["rewards/margins"]) == 0.0
    # the other kinds at Δ = 0: IPO (0 − 1/(2β))² = 25 for β 0.1; RPO with zero reward gap: 0
    close(L.preference_loss("ipo", x, x, r, r, 0.1)[0], 25.0)
    for kind in ("rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl"):
        close(L.preference_loss(kind, x, x, r, r, 0.1, reward_gap=t([0.0, 0.0, 0.0]))[0], 0.0, 1e-15)


def test_ipo():
    # 1/(2β) = 1: mean((2 − 1)², (0 − 1)²) = 1
    close(pref("ipo")[0], 1.0)
    # β = 0.25: 1/(2β) = 2: mean((2 − 2)², (0 − 2)²) = 2
    close(pref("ipo", beta=0.25)[0], 2.0)


GAP = [1.0, -1.0]  # r*_c − r*_r; with η = 2: ηgap = [2, −2]


def test_rpo_sq():
    # mean((1 − 2)², (0 + 2)²) = (1 + 4) / 2 = 2.5
    close(pref("rpo_sq", reward_gap=t(GAP), eta=2.0)[0], 2.5)


def bern_kl(p, q):
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_rpo_kl_directions():
    # backward: KL(σ(ηgap) ‖ σ(βΔ)); pair 1: KL(σ(2) ‖ σ(1)), pair 2: KL(σ(−2) ‖ σ(0))
    bwd = (bern_kl(sig(2), sig(1)) + bern_kl(sig(-2), 0.5)) / 2
    fwd = (bern_kl(sig(1), sig(2)) + bern_kl(0.5, sig(-2))) / 2
    close(bwd, (0.0671308 + 0.3278133) / 2, 1e-6)
    close(fwd, (0.0826077 + 0.4337808) / 2, 1e-6)
    close(pref("rpo_bwd_kl", reward_gap=t(GAP), eta=2.0)[0], bwd)
    close(pref("rpo_fwd_kl", reward_gap=t(GAP), eta=2.0)[0], fwd)
    assert abs(bwd - fwd) > 1e-3  # the two directions really differ here


def test_margin_and_scaled_dpo():
    # margin: βΔ − m = [1 − 2, 0 − 1] = [−1, −1] -> −logσ(−1) = 1.3132617 each
    close(pref("margin_dpo", strength=t([2.0, -1.0]))[0], nll_sigmoid(-1))
    close(pref("margin_dpo", margin=t([1.0, 0.0]))[0], (LN2 + LN2) / 2)  # [1 − 1, 0 − 0]
    # scaled: mean(2·−logσ(1), 3·−logσ(0)) = (0.6265234 + 2.0794415) / 2
    close(pref("scaled_dpo", strength=t([2.0, 3.0]))[0], (2 * nll_sigmoid(1) + 3 * LN2) / 2)


def test_sft_mixing():
    nll = t([1.5, 2.5])  # mean 2.0
    loss, stats = pref("dpo", chosen_nll=nll, sft_weight=0.3, preference_weight=0.7)
    dpo = (nll_sigmoid(1) + LN2) / 2
    close(loss, 0.7 * dpo + 0.3 * 2.0)
    close(stats["loss/sft"], 2.0)
    close(stats["loss/preference"], dpo)
    # weight 0: logged, not added
    loss0, stats0 = pref("dpo", chosen_nll=nll)
    close(loss0, dpo)
    close(stats0["loss/sft"], 2.0)
    with pytest.raises(ValueError, match="chosen_nll"):
        pref("dpo", sft_weight=0.5)


def test_summed_vs_averaged_log_ratios():
    mask = t([[1.0, 1.0, 1.0]])
    pol_c, ref_c = t([[-1.0, -1.0, -1.0]]), t([[-2.0, -2.0, -2.0]])
    pol_r = ref_r = t([[-1.0, -1.0, -1.0]])
    for average, expected in ((False, nll_sigmoid(3)), (True, nll_sigmoid(1))):  # ρ_c = 3 summed, 1 averaged
        lp = [L.sequence_logps(x, mask, average=average) for x in (pol_c, pol_r, ref_c, ref_r)]
        close(L.preference_loss("dpo", *lp, beta=1.0)[0], expected)


def test_registry_and_errors():
    assert set(L.PREFERENCE_LOSSES) == {"dpo", "ipo", "rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl", "margin_dpo", "scaled_dpo"}

    @L.register_preference_loss("hinge_test")
    def hinge(pc, pr, rc, rr, beta, **_):
        return torch.relu(1 - beta * ((pc - rc) - (pr - rr)))

    try:
        close(pref("hinge_test")[0], (0.0 + 1.0) / 2)  # relu(1 − [1, 0])
        with pytest.raises(ValueError, match="already registered"):
            L.register_preference_loss("hinge_test")(hinge)
    finally:
        L.PREFERENCE_LOSSES.pop("hinge_test")
    with pytest.raises(ValueError, match="unknown preference loss 'dpoo'"):
        pref("dpoo")
    with pytest.raises(ValueError, match="reward_gap"):
        pref("rpo_sq")
    with pytest.raises(ValueError, match="ref_rejected_logps has shape"):
        L.preference_loss("dpo", t(PC), t(PR), t(RC), t([1.0]), 0.1)
    with pytest.raises(ValueError, match="empty"):
        L.preference_loss("dpo", *(torch.zeros(0),) * 4, beta=0.1)


# ====================================================================== PPO / REINFORCE


def test_ppo_token_rewards():
    logps = t([[0.0, -1.0, -2.0, 5.0]])
    init = t([[0.0, -1.5, -1.0, 9.0]])
    mask = t([[0.0, 1.0, 1.0, 0.0]])
    rewards, stats = L.ppo_token_rewards(t([2.0]), logps, init, mask, kl_coef=0.1)
    # |d| = |0.5|, |−1| on response tokens; r = −0.1·|d|, plus the score 2 on the last response token
    torch.testing.assert_close(rewards, t([[0.0, -0.05, -0.1 + 2.0, 0.0]]))
    close(stats["kl"], 0.75)
    k1, _ = L.ppo_token_rewards(t([2.0]), logps, init, mask, kl_coef=0.1, kl_kind="k1")
    torch.testing.assert_close(k1, t([[0.0, -0.05, 0.1 + 2.0, 0.0]]))
    # k3 = exp(−d) − 1 + d: d = 0.5 -> 0.1065307, d = −1 -> e − 2 = 0.7182818
    k3 = L.kl_penalty(logps, init, "k3")
    close(k3[0, 1], math.exp(-0.5) - 0.5, 1e-12)
    close(k3[0, 2], math.e - 2, 1e-12)
    with pytest.raises(ValueError, match="no response token"):
        L.ppo_token_rewards(t([2.0]), logps, init, torch.zeros_like(mask), 0.1)


def test_gae_hand_example():
    # row 0: prompt token, 3 response tokens, padding; masked positions hold junk that must not matter
    rewards = t([9.0, 0.0, 0.0, 1.0, 7.0], [0.0, 0.0, 0.0, 0.0, 2.0])
    values = t([5.0, 0.5, 0.6, 0.7, 3.0], [0.0, 0.0, 0.0, 1.0, 1.0])
    mask = t([0.0, 1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0, 1.0])
    adv, ret = L.gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)  # γλ = 0.72
    # row 0: t=3: δ = 1 + 0.9·0 − 0.7 = 0.3, A = 0.3
    #        t=2: δ = 0 + 0.9·0.7 − 0.6 = 0.03, A = 0.03 + 0.72·0.3 = 0.246
    #        t=1: δ = 0 + 0.9·0.6 − 0.5 = 0.04, A = 0.04 + 0.72·0.246 = 0.21712
    # row 1: t=4: δ = 2 − 1 = 1, A = 1;  t=3: δ = 0.9·1 − 1 = −0.1, A = −0.1 + 0.72 = 0.62
    torch.testing.assert_close(adv, t([0.0, 0.21712, 0.246, 0.3, 0.0], [0.0, 0.0, 0.0, 0.62, 1.0]))
    torch.testing.assert_close(ret, t([0.0, 0.71712, 0.846, 1.0, 0.0], [0.0, 0.0, 0.0, 1.62, 2.0]))
    # γ = λ = 1: A_t = Σ_{k≥t} r_k − V_t (Monte Carlo): row 0 -> 1 − 0.5, 1 − 0.6, 1 − 0.7
    adv1, _ = L.gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv1[0], t([0.0, 0.5, 0.4, 0.3, 0.0]))


def test_ppo_policy_loss_reference_sanity_value():
    logps = torch.log(t([[0.5, 1.0, 1.5]])).requires_grad_()
    loss, stats = L.ppo_policy_loss(logps, torch.zeros(1, 3, dtype=torch.float64), t([[1.0, -1.0, 2.0]]),
                                    torch.ones(1, 3))
    # max(−0.5, −0.8) = −0.5 ; max(1, 1) = 1 ; max(−3, −2.4) = −2.4 -> mean −1.9/3 = −0.6333
    close(loss, -1.9 / 3)
    close(loss, -0.6333, 1e-4)
    close(stats["clipfrac"], 1 / 3)


def test_ppo_policy_loss_clips_both_sides():
    ratios = [0.5, 0.5, 1.5, 1.5, 3.0]
    logps = torch.log(t([ratios])).requires_grad_()
    adv = t([[1.0, -1.0, 1.0, -1.0, 100.0]])
    mask = t([[1.0, 1.0, 1.0, 1.0, 0.0]])  # the last token is not a response token
    loss, stats = L.ppo_policy_loss(logps, torch.zeros_like(logps), adv, mask, clip_eps=0.2)
    # (0.5, +1): max(−0.5, −0.8) = −0.5   unclipped
    # (0.5, −1): max( 0.5,  0.8) =  0.8   clipped at 1 − ε (pessimistic side)
    # (1.5, +1): max(−1.5, −1.2) = −1.2   clipped at 1 + ε
    # (1.5, −1): max( 1.5,  1.2) =  1.5   unclipped
    # mean over the 4 response tokens: 0.6 / 4 = 0.15
    close(loss, 0.15)
    close(stats["clipfrac"], 0.5)
    loss.backward()
    # d/dlogp of −A·ratio is −A·ratio on unclipped tokens (/4), 0 where the clip is active or masked
    torch.testing.assert_close(logps.grad, t([[-0.5 / 4, 0.0, 0.0, 1.5 / 4, 0.0]]))


def test_ppo_policy_loss_entropy_bonus():
    logps = torch.log(t([[0.5, 1.0, 1.5]]))
    loss, stats = L.ppo_policy_loss(logps, torch.zeros(1, 3, dtype=torch.float64), t([[1.0, -1.0, 2.0]]),
                                    torch.ones(1, 3), entropy=t([[1.0, 2.0, 3.0]]), entropy_coef=0.01)
    close(loss, -1.9 / 3 - 0.01 * 2.0)
    close(stats["entropy"], 2.0)
    with pytest.raises(ValueError, match="entropy"):
        L.ppo_policy_loss(logps, logps, logps, torch.ones(1, 3), entropy_coef=0.01)


def test_ppo_value_loss():
    values = t([[1.0, 2.0, 9.0]]).requires_grad_()
    old = t([[0.5, 2.0, 0.0]])
    returns = t([[2.0, 1.0, 0.0]])
    mask = t([[1.0, 1.0, 0.0]])
    loss, stats = L.ppo_value_loss(values, old, returns, mask, clip=0.2)
    # token 1: V_c = 0.5 + clip(0.5) = 0.7; max((0.7 − 2)², (1 − 2)²) = max(1.69, 1) = 1.69 (clipped)
    # token 2: V_c = 2; max(1, 1) = 1.   L = 0.5 · (1.69 + 1) / 2 = 0.6725
    close(loss, 0.6725)
    close(stats["clipfrac"], 0.5)
    loss.backward()
    # token 1 uses the clipped branch (no gradient: V − V_old is beyond c); token 2: 0.5·2(V − R)/2 = 0.5
    torch.testing.assert_close(values.grad, t([[0.0, 0.5, 0.0]]))


def test_rloo_advantages():
    rewards = t([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 6.0, 2.0])
    adv = L.rloo_advantages(rewards, 4)
    # group 1: 1 − (2+3+4)/3 = −2; 2 − 8/3 = −2/3; 3 − 7/3 = 2/3; 4 − 2 = 2
    # group 2: 0 − 8/3; 0 − 8/3; 6 − 2/3 = 16/3; 2 − 2 = 0
    torch.testing.assert_close(adv, t([-2.0, -2 / 3, 2 / 3, 2.0, -8 / 3, -8 / 3, 16 / 3, 0.0]))
    # explicit group ids (interleaved) give the same numbers
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    perm = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])
    torch.testing.assert_close(L.rloo_advantages(rewards[perm], ids[perm]), adv[perm])
    # KL-shaped reward: r' = r − 0.5·seq_kl; group 1 r' = [0.5, 2, 3, 4]
    kl = t([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    adv_kl = L.rloo_advantages(rewards, 4, seq_kl=kl, kl_coef=0.5)
    close(adv_kl[0], 0.5 - 3.0)
    close(adv_kl[1], 2.0 - (0.5 + 3 + 4) / 3)
    with pytest.raises(ValueError, match="at least 2"):
        L.rloo_advantages(rewards[:3], torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="groups of 3"):
        L.rloo_advantages(rewards, 3)


def test_reinforce_loss_broadcasts_sequence_advantages():
    logps = t([[-1.0, -2.0, 0.0], [-0.5, -0.5, -1.0]]).requires_grad_()
    mask = t([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss, _ = L.reinforce_loss(logps, t([2.0, -1.0]), mask)
    # −logπ·A: row 0: 1·2, 2·2; row 1: 0.5·(−1), 0.5·(−1), 1·(−1) -> (2 + 4 − 2) / 5 tokens = 0.8
    close(loss, 0.8)
    loss.backward()
    torch.testing.assert_close(logps.grad, t([[-0.4, -0.4, 0.0], [0.2, 0.2, 0.2]]))
    # one sequence at a time gives the same per-token terms (no micro-batch-size dependence)
    per_token = t([[2.0, 2.0, 0.0], [-1.0, -1.0, -1.0]])
    close(L.reinforce_loss(logps, per_token, mask)[0], 0.8)


# ====================================================================== SteerLM 2.0


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
    loss, stats = L.steerlm2_loss(policy, t([10.0, 20.0, 4.0, 6.0]), attr, p_y, q_prime, 2)
    # w − b = [0.25, −0.25 | −0.25, 0.25]; NLL = [10, 20, 4, 8]; T̄ = 10, G = 2
    # L = (0.25·10 − 0.25·20 − 0.25·4 + 0.25·8) / (2·10) = −1.5 / 20 = −0.075
    close(loss, -0.075)
    loss.backward()
    torch.testing.assert_close(policy.grad, t([-0.0125, 0.0125, 0.0125, -0.0125]))
    kl1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    kl2 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    close(stats["kl_w_b"], (kl1 + kl2) / 2, 1e-6)
    close(stats["weight_max"], (0.75 + 0.5) / 2, 1e-6)


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


# ====================================================================== gradients


def _g(*shape, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).requires_grad_()


def test_gradcheck_reward_losses():
    pred, labels = _g(3, 4, seed=1), torch.randn(3, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: L.masked_mse_loss(p, labels, mask)[0], (pred,))
    rc, rr = _g(5, seed=2), _g(5, seed=3)
    strength = torch.tensor([1.0, -2.0, 3.0, 1.0, -1.0], dtype=torch.float64)
    for kind in L.BT_KINDS:
        assert torch.autograd.gradcheck(
            lambda a, b: L.bradley_terry_loss(a, b, kind=kind, strength=strength)[0], (rc, rr)), kind


def test_gradcheck_preference_losses():
    pc, pr, rc, rr = (_g(4, seed=s, scale=2.0) for s in (4, 5, 6, 7))
    nll = _g(4, seed=8).detach().abs().requires_grad_()
    extra = {"strength": torch.tensor([1.0, 2.0, -3.0, 1.0], dtype=torch.float64),
             "reward_gap": torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64), "eta": 1.5}
    for kind in L.PREFERENCE_LOSSES:
        fn = lambda a, b, c, d, n: L.preference_loss(kind, a, b, c, d, 0.3, chosen_nll=n, sft_weight=0.2, **extra)[0]
        assert torch.autograd.gradcheck(fn, (pc, pr, rc, rr, nll)), kind


def test_gradcheck_rl_losses():
    # ratios kept away from the clip boundaries 0.8 / 1.2 and from ties (the kinks)
    logps = torch.log(torch.tensor([[0.5, 0.9, 1.1, 1.6], [1.05, 0.7, 1.3, 0.95]], dtype=torch.float64))
    logps.requires_grad_()
    old = torch.zeros(2, 4, dtype=torch.float64)
    adv = torch.tensor([[1.0, -2.0, 0.5, -1.0], [2.0, 1.0, -0.5, 0.3]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float64)
    ent = _g(2, 4, seed=9)
    assert torch.autograd.gradcheck(
        lambda lp, e: L.ppo_policy_loss(lp, old, adv, mask, entropy=e, entropy_coef=0.01)[0], (logps, ent))
    values = torch.tensor([[1.0, 2.0, 0.3, 0.0], [0.5, -1.0, 2.0, 1.0]], dtype=torch.float64, requires_grad=True)
    old_v = torch.tensor([[0.5, 2.1, 0.0, 0.0], [0.45, -0.5, 2.0, 1.1]], dtype=torch.float64)
    returns = torch.tensor([[2.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.5]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: L.ppo_value_loss(v, old_v, returns, mask)[0], (values,))
    assert torch.autograd.gradcheck(
        lambda lp: L.reinforce_loss(lp, torch.tensor([1.0, -0.5], dtype=torch.float64), mask)[0], (logps,))
