"""aligner.algorithms.losses.preference: the DPO family against hand-computed values
(plain python math, worked in the comments), the registry, and float64 gradchecks."""
import math

import pytest
import torch

from aligner.algorithms.losses import preference as L
from aligner.algorithms.losses.common import sequence_logps
from tests.algorithms.losses.values import LN2, close, nll_sigmoid, random_leaf, t

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
        lp = [sequence_logps(x, mask, average=average) for x in (pol_c, pol_r, ref_c, ref_r)]
        close(L.preference_loss("dpo", *lp, beta=1.0)[0], expected)


# per-token mean log-probs of a ragged batch: chosen Σ [−1.5, −2.4] over [3, 8] tokens and
# rejected Σ [−4.0, −1.2] over [2, 3] tokens -> ℓ_c = [−0.5, −0.3], ℓ_r = [−2.0, −0.4]
MEAN_C, MEAN_R = [-1.5 / 3, -2.4 / 8], [-4.0 / 2, -1.2 / 3]


def test_orpo_hand_computed():
    # log odds(ℓ) = ℓ − log(1 − e^ℓ); pair 1: (−0.5 − log(1 − e^−0.5)) − (−2 − log(1 − e^−2))
    want = []
    for c, r in zip(MEAN_C, MEAN_R):
        log_odds = (c - math.log(1 - math.exp(c))) - (r - math.log(1 - math.exp(r)))
        want.append(0.25 * nll_sigmoid(log_odds))  # −λ·logσ(log odds ratio), λ = β = 0.25
    # pair 1: log odds = (−0.5 + 0.932752) − (−2 + 0.145413) = 2.287339 -> 0.25·0.096706 = 0.024176
    close(want[0], 0.0241765, 1e-6)
    zeros = t([0.0, 0.0])
    loss, stats = L.preference_loss("orpo", t(MEAN_C), t(MEAN_R), zeros, zeros, 0.25)
    close(loss, sum(want) / 2)
    close(stats["rewards/chosen"], 0.25 * (-0.5 - 0.3) / 2, 1e-7)  # β·ℓ_c without a reference
    # the reference log-probs are not read
    close(L.preference_loss("orpo", t(MEAN_C), t(MEAN_R), t([5.0, 1.0]), t([-3.0, 2.0]), 0.25)[0], sum(want) / 2)
    # the paper's objective: + the chosen NLL (sft_weight 1): + mean(0.5, 0.3)
    total, stats = L.preference_loss("orpo", t(MEAN_C), t(MEAN_R), zeros, zeros, 0.25, chosen_nll=-t(MEAN_C),
                                     sft_weight=1.0)
    close(total, sum(want) / 2 + 0.4)
    # near P = 1 (ℓ → 0⁻) log(1 − e^ℓ) stays finite: ℓ = −1e−9 gives log odds ≈ −log(1e−9)
    tiny = L.preference_loss("orpo", t([-1e-9]), t([-1e-9]), t([0.0]), t([0.0]), 1.0)[0]
    close(tiny, LN2, 1e-12)


def test_simpo_hand_computed():
    # −logσ(β(ℓ_c − ℓ_r) − γ), β = 2, γ = 0.5: pair 1 2·1.5 − 0.5 = 2.5, pair 2 2·0.1 − 0.5 = −0.3
    zeros = t([0.0, 0.0])
    loss, stats = L.preference_loss("simpo", t(MEAN_C), t(MEAN_R), zeros, zeros, 2.0, gamma=0.5)
    close(loss, (nll_sigmoid(2.5) + nll_sigmoid(-0.3)) / 2)
    close(loss, (0.0788897 + 0.8543552) / 2, 1e-6)
    close(stats["rewards/margins"], 2.0 * (1.5 + 0.1) / 2, 1e-7)
    # γ = 0: the reference-free DPO on mean log-probs
    close(L.preference_loss("simpo", t(MEAN_C), t(MEAN_R), zeros, zeros, 2.0, gamma=0.0)[0],
          (nll_sigmoid(3.0) + nll_sigmoid(0.2)) / 2)


def test_registry_and_errors():
    assert list(L.PREFERENCE_LOSSES) == ["dpo", "ipo", "rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl", "margin_dpo", "scaled_dpo",
                                         "orpo", "simpo"]
    # the pair fields each loss declares (what the DPO trainer checks the data and config against)
    assert {k: e.inputs for k, e in L.PREFERENCE_LOSSES.items() if e.inputs} == {
        "rpo_sq": ("reward_gap", "eta"), "rpo_fwd_kl": ("reward_gap", "eta"), "rpo_bwd_kl": ("reward_gap", "eta"),
        "margin_dpo": ("strength", "margin"), "scaled_dpo": ("strength",), "simpo": ("gamma",)}
    # the reference-free, length-normalised ones
    assert [k for k, e in L.PREFERENCE_LOSSES.items() if not e.reference] == ["orpo", "simpo"]
    assert [k for k, e in L.PREFERENCE_LOSSES.items() if e.length_normalised] == ["orpo", "simpo"]

    @L.register_preference_loss("hinge_test")
    def hinge(pc, pr, rc, rr, beta):
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
    with pytest.raises(ValueError, match=r"inputs \['gold'\] are not among"):
        L.register_preference_loss("gold_test", inputs=("gold",))


def test_gradcheck_preference_losses():
    pc, pr, rc, rr = (random_leaf(4, seed=s, scale=2.0) for s in (4, 5, 6, 7))
    # per-token mean log-probs are < 0 (ORPO's odds need P < 1)
    pc, pr = (x.detach().abs().add(0.05).neg().requires_grad_() for x in (pc, pr))
    nll = random_leaf(4, seed=8).detach().abs().requires_grad_()
    extra = {"strength": torch.tensor([1.0, 2.0, -3.0, 1.0], dtype=torch.float64),
             "reward_gap": torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64), "eta": 1.5}
    for kind in L.PREFERENCE_LOSSES:
        fn = lambda a, b, c, d, n: L.preference_loss(kind, a, b, c, d, 0.3, chosen_nll=n, sft_weight=0.2, **extra)[0]
        assert torch.autograd.gradcheck(fn, (pc, pr, rc, rr, nll)), kind
