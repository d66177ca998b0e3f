"""The pure functions of the over-optimisation monitor: fits of Gao et al.'s forms recover
known coefficients from noisy points, the best-of-n estimator equals brute force over
subsets, KL_bon, ensembles, the sequence log-ratio."""
import itertools
import math

import pytest
import torch

from aligner.evaluation.overoptimization import (
    best_of_n,
    combine_ensemble,
    fit_form,
    gold_bon,
    gold_rl,
    kl_bon,
    sequence_kl,
)


@pytest.mark.parametrize("form,alpha,beta", [("rl", 1.2, 0.5), ("rl", 0.8, 0.3), ("bon", 1.5, 0.6), ("bon", 0.9, 0.2)])
def test_fits_recover_known_coefficients_from_noisy_points(form, alpha, beta):
    # 40 points over the rise and the fall, Gaussian noise of sd 0.02 (about 2-5% of the peak);
    # tolerance: 0.05 absolute on alpha and beta (measured errors: at most 0.001)
    g = torch.Generator().manual_seed(3)
    d = torch.linspace(0.05, 3.0 if form == "bon" else 6.0, 40, dtype=torch.float64)
    exact = (gold_rl if form == "rl" else gold_bon)(d, alpha, beta)
    noisy = exact + 0.02 * torch.randn(40, generator=g, dtype=torch.float64)
    fit = fit_form(d.tolist(), noisy.tolist(), form)
    assert abs(fit.alpha - alpha) < 0.05 and abs(fit.beta - beta) < 0.05, fit
    peak = math.exp(alpha / beta - 1) if form == "rl" else alpha / (2 * beta)
    assert abs(fit.d_peak - peak) / peak < 0.1
    assert fit.rmse < 0.03 and fit.points == 40
    # without noise the fit is exact
    exact_fit = fit_form(d.tolist(), exact.tolist(), form)
    assert abs(exact_fit.alpha - alpha) < 1e-9 and abs(exact_fit.beta - beta) < 1e-9


def test_fit_needs_two_points_away_from_zero_and_names_bad_input():
    assert fit_form([0.0, 0.5], [0.0, 0.3], "rl") is None
    with pytest.raises(ValueError, match="form"):
        fit_form([1, 2], [1, 2], "linear")
    with pytest.raises(ValueError, match="3 points"):
        fit_form([1, 2, 3], [1, 2], "bon")


def test_kl_bon():
    assert kl_bon(1) == 0.0
    assert math.isclose(kl_bon(2), math.log(2) - 0.5)
    assert math.isclose(kl_bon(16), math.log(16) - 15 / 16)


def _brute_force_bon(proxy, gold, n):
    """Average over every n-subset of each prompt's samples of the gold of the proxy-best
    (ties to the later sample, as a stable ascending sort does)."""
    per_prompt = []
    for p_row, g_row in zip(proxy.tolist(), gold.tolist()):
        picks = []
        for subset in itertools.combinations(range(len(p_row)), n):
            best = max(subset, key=lambda i: (p_row[i], i))
            picks.append(g_row[best])
        per_prompt.append(sum(picks) / len(picks))
    return sum(per_prompt) / len(per_prompt)


def test_best_of_n_equals_brute_force_over_subsets():
    g = torch.Generator().manual_seed(0)
    proxy = torch.randn(5, 7, generator=g, dtype=torch.float64)
    proxy[0, 3] = proxy[0, 5]  # a tie
    gold = torch.randn(5, 7, generator=g, dtype=torch.float64)
    for n in range(1, 8):
        row = best_of_n(proxy, gold, n)
        assert math.isclose(row["gold"], _brute_force_bon(proxy, gold, n), rel_tol=1e-12, abs_tol=1e-12)
        assert math.isclose(row["kl_bon"], kl_bon(n))
    one = best_of_n(proxy, gold, 1)
    assert math.isclose(one["gold"], float(gold.mean())) and math.isclose(one["proxy"], float(proxy.mean()))
    # n = N picks the proxy-best sample of every prompt
    assert math.isclose(best_of_n(proxy, gold, 7)["proxy"], float(proxy.max(1).values.mean()))
    # SE over prompts of the per-prompt estimates
    assert math.isclose(one["gold_se"], float(gold.mean(1).std() / math.sqrt(5)))


def test_ensembles():
    scores = torch.tensor([[1.0, 2.0], [3.0, 2.0], [2.0, 5.0]])
    mean, var = combine_ensemble(scores, "mean")
    assert mean.tolist() == [2.0, 3.0]
    assert torch.allclose(var, torch.tensor([2 / 3, 2.0], dtype=torch.float64))
    assert combine_ensemble(scores, "min")[0].tolist() == [1.0, 2.0]
    assert torch.allclose(combine_ensemble(scores, "mean_minus_var", 0.5)[0],
                          torch.tensor([2 - 1 / 3, 2.0], dtype=torch.float64))
    assert combine_ensemble(scores[:1], "mean")[1].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="ensemble mode"):
        combine_ensemble(scores, "max")


def test_sequence_kl_sums_response_tokens_only():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    ref = torch.tensor([[-9.0, -2.5, -2.0], [-0.5, -1.5, -0.5]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    assert sequence_kl(logp, ref, mask).tolist() == [0.5 - 1.0, 1.0]


def test_a_peak_is_reported_only_within_the_measured_range():
    from aligner.evaluation.overoptimization import describe_peak

    d = [0.5, 1.0, 1.5]
    # gold falls from the start (α < 0): the formula's α / (2β) = -0.75 is no distance
    falling = fit_form(d, [float(gold_bon(x, -0.3, 0.2)) for x in d], "bon")
    assert falling.alpha == pytest.approx(-0.3) and falling.beta == pytest.approx(0.2)
    assert falling.d_peak is None and falling.gold_peak is None
    assert describe_peak(falling, 1.5) == "no peak within the measured range (d <= 1.500)"
    beyond = fit_form(d, [float(gold_bon(x, 1.0, 0.1)) for x in d], "bon")  # d* = 5
    assert beyond.d_peak == pytest.approx(5.0)
    assert describe_peak(beyond, 1.5) == ("no peak within the measured range (d <= 1.500); the fitted curve would"
                                          " peak at d = 5.000")
    inside = fit_form(d, [float(gold_bon(x, 1.0, 0.5)) for x in d], "bon")  # d* = 1
    assert describe_peak(inside, 1.5) == "peak at d = 1.000"


def test_the_warning_needs_a_drop_beyond_two_standard_errors():
    from aligner.evaluation.overoptimization import gold_drop, is_overoptimized

    # noise: one sample of 8 below its best; paired differences [0, 0, 0, 1, 0, 0, 0, 0]
    best, now = [1, 1, 0, 1, 0, 0, 1, 0], [1, 1, 0, 0, 0, 0, 1, 0]
    drop, se = gold_drop(best, now)
    assert drop == 0.125 and se == pytest.approx(math.sqrt(1 / 8) / math.sqrt(8))  # sd 0.354 / sqrt(8)
    assert not is_overoptimized(drop, se, proxy_rise=0.5, warn_drop=0.1)
    # a real fall: differences six 1s and two 0s, mean 0.75, SE sqrt(3/14 / 8) = 0.164
    drop, se = gold_drop([1] * 8, [0] * 6 + [1] * 2)
    assert drop == 0.75 and se == pytest.approx(math.sqrt(3 / 14 / 8))
    assert is_overoptimized(drop, se, proxy_rise=0.5, warn_drop=0.1)
    assert not is_overoptimized(drop, se, proxy_rise=-0.5, warn_drop=0.1)  # the proxy fell too
    assert not is_overoptimized(drop, se, proxy_rise=0.5, warn_drop=0.8)  # smaller than warn_drop
    # evaluations of other sizes compare unpaired; one sample has no SE: never significant
    drop, se = gold_drop([1, 0] * 4, [0] * 6)
    assert drop == 0.5 and se == pytest.approx(math.sqrt(2 / 7) / math.sqrt(8))
    assert not is_overoptimized(*gold_drop([1.0], [0.0]), proxy_rise=1.0, warn_drop=0.1)
