"""aligner.algorithms.losses.kto: KTO's reference point and value against hand-computed
values (plain python math, worked in the comments), and a float64 gradcheck."""
import math

import pytest
import torch

from aligner.algorithms.losses import kto as K
from tests.algorithms.losses.values import close, random_leaf, t


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_mismatched_rows_rotate_by_one():
    assert K.mismatched_rows(4).tolist() == [3, 0, 1, 2]  # (x_1, y_4), (x_2, y_1), ... as TRL pairs them
    with pytest.raises(ValueError, match=">= 2 rows"):
        K.mismatched_rows(1)


def test_mismatched_rows_pass_over_a_shared_prompt():
    # rows of prompts [a, a, b, b, c]: the rotation gives [4, 0, 1, 2, 3]; row 1's partner (row 0)
    # shares its prompt, so it takes row 4 (c); row 3's (row 2, b) likewise takes row 1 (a)
    assert K.mismatched_rows(5, ["a", "a", "b", "b", "c"]).tolist() == [4, 4, 1, 1, 3]
    assert K.mismatched_rows(3, ["a", "a", "a"]).tolist() == [2, 0, 1]  # one prompt only: the rotation
    assert K.mismatched_rows(3, ["a", "b", "c"]).tolist() == [2, 0, 1]  # distinct prompts: TRL's rotation


def test_reference_point_is_the_clamped_detached_mean():
    # mean([0.5, −0.1, 0.2]) = 0.2
    kl = t([0.5, -0.1, 0.2]).requires_grad_()
    z = K.kto_reference_point(kl, t([0.0, 0.0, 0.0]))
    close(z, 0.2)
    assert not z.requires_grad
    close(K.kto_reference_point(t([-1.0, 0.5]), t([0.0, 0.0])), 0.0)  # mean −0.25 clamps to 0


def test_kto_value_hand_computed():
    # ρ = [1.0, −0.5, 2.0, 0.3]; labels [desirable, undesirable, desirable, undesirable]; β = 0.5, z = 0.2
    pol, ref = t([-3.0, -4.5, -1.0, -2.7]), t([-4.0, -4.0, -3.0, -3.0])
    d = torch.tensor([True, False, True, False])
    loss, stats = K.kto_loss(pol, ref, d, torch.tensor(0.2, dtype=torch.float64), 0.5, desirable_weight=1.5,
                             undesirable_weight=0.8)
    want = [1.5 * (1 - sig(0.5 * (1.0 - 0.2))), 0.8 * (1 - sig(0.5 * (0.2 + 0.5))),
            1.5 * (1 - sig(0.5 * (2.0 - 0.2))), 0.8 * (1 - sig(0.5 * (0.2 - 0.3)))]
    # e.g. row 1: 1.5·(1 − σ(0.4)) = 1.5·0.401312 = 0.601968
    close(want[0], 0.601968, 1e-6)
    close(loss, sum(want) / 4)
    close(stats["rewards/chosen"], 0.5 * (1.0 + 2.0) / 2, 1e-7)
    close(stats["rewards/rejected"], 0.5 * (-0.5 + 0.3) / 2, 1e-7)
    close(stats["kl"], 0.2, 1e-7)
    # policy = reference and z = 0: every response is worth λ/2
    same, _ = K.kto_loss(ref, ref, d, torch.tensor(0.0), 0.5, desirable_weight=1.5, undesirable_weight=0.8)
    close(same, (1.5 + 0.8 + 1.5 + 0.8) / 2 / 4)


def test_kto_gradcheck_and_errors():
    pol, ref = random_leaf(5, seed=1), random_leaf(5, seed=2)
    d = torch.tensor([True, False, True, True, False])
    fn = lambda p, r: K.kto_loss(p, r, d, torch.tensor(0.3, dtype=torch.float64), 0.7, 1.0, 1.33)[0]
    assert torch.autograd.gradcheck(fn, (pol, ref))
    with pytest.raises(ValueError, match="desirable has shape"):
        K.kto_loss(t([1.0, 2.0]), t([1.0, 2.0]), torch.tensor([True]), 0.0, 0.1)
    with pytest.raises(ValueError, match="beta must be > 0"):
        K.kto_loss(t([1.0]), t([1.0]), torch.tensor([True]), 0.0, 0.0)


def test_kto_on_a_ragged_batch_with_its_mismatched_rows_by_hand():
    # three responses of 1, 3 and 2 tokens (padding masked), labels [D, U, D]; β = 1, λ_D = 1, λ_U = 2
    from aligner.algorithms.losses.common import sequence_logps

    mask = t([[1, 0, 0], [1, 1, 1], [1, 1, 0]])
    pol = sequence_logps(t([[-1.0, 9.0, 9.0], [-0.5, -0.5, -1.0], [-2.0, -1.0, 9.0]]), mask)  # [-1, -2, -3]
    ref = sequence_logps(t([[-1.5, 7.0, 7.0], [-1.0, -1.0, -1.0], [-1.0, -1.0, 7.0]]), mask)  # [-1.5, -3, -2]
    assert pol.tolist() == [-1.0, -2.0, -3.0] and ref.tolist() == [-1.5, -3.0, -2.0]
    # mismatched rows (rotation by one): x1 with y3, x2 with y1, x3 with y2; policy − reference there
    assert K.mismatched_rows(3).tolist() == [2, 0, 1]
    z = K.kto_reference_point(t([-2.6, -1.1, -2.2]), t([-2.9, -1.0, -2.6]))  # mean(0.3, −0.1, 0.4) = 0.2
    close(z, 0.2)
    loss, stats = K.kto_loss(pol, ref, torch.tensor([True, False, True]), z, 1.0, 1.0, 2.0)
    # ρ = [0.5, 1, −1]: D 1 − σ(0.5 − 0.2) = 0.425557; U 2(1 − σ(0.2 − 1)) = 2·0.689974; D 1 − σ(−1.2) = 0.768525
    close(loss, (0.425557483 + 2 * 0.689974481 + 0.768524783) / 3, 1e-8)
    close(stats["rewards/chosen"], (0.5 - 1.0) / 2, 1e-7)
    close(stats["rewards/rejected"], 1.0, 1e-7)


def test_sft_term_on_the_desirable_responses_of_a_ragged_batch_by_hand():
    # the batch above: token log-probs of three responses of 1, 3 and 2 tokens, labels [D, U, D]
    from aligner.algorithms.losses.common import sequence_logps

    mask = t([[1, 0, 0], [1, 1, 1], [1, 1, 0]])
    tokens = t([[-1.0, 9.0, 9.0], [-0.5, -0.5, -1.0], [-2.0, -1.0, 9.0]]).requires_grad_()
    pol = sequence_logps(tokens, mask)  # [-1, -2, -3]
    ref = t([-1.5, -3.0, -2.0])
    d = torch.tensor([True, False, True])
    z = torch.tensor(0.2, dtype=torch.float64)
    nll = -pol / mask.sum(-1)  # per-token mean NLL: [1, 2/3, 1.5]
    base, _ = K.kto_loss(pol, ref, d, z, 1.0, 1.0, 2.0)
    kto_part = (0.425557483 + 2 * 0.689974481 + 0.768524783) / 3
    close(base, kto_part, 1e-8)
    loss, stats = K.kto_loss(pol, ref, d, z, 1.0, 1.0, 2.0, desirable_nll=nll, sft_weight=0.5)
    # the desirable rows' NLL: (1 + 1.5) / 2 = 1.25 (the undesirable row's 2/3 is not counted); 0.5 · 1.25 = 0.625
    close(stats["loss/sft"], 1.25, 1e-12)
    close(stats["loss/kto"], kto_part, 1e-8)
    close(loss, kto_part + 0.625, 1e-8)
    # the SFT term's gradient on the token log-probs: −w / (n_D · |y|) on a desirable row's response
    # tokens: row 1 −0.5 / (2 · 1) = −0.25, row 3 −0.5 / (2 · 2) = −0.125; nothing on row 2 nor on padding
    (g_sft,) = torch.autograd.grad(loss - base, tokens)
    torch.testing.assert_close(g_sft, t([[-0.25, 0, 0], [0, 0, 0], [-0.125, -0.125, 0]]), atol=1e-12, rtol=0)
    # as the share of a batch of 6 responses, 4 desirable: Σv / 6 + 0.5 · (1 + 1.5) / 4
    share, _ = K.kto_loss(pol, ref, d, z, 1.0, 1.0, 2.0, desirable_nll=nll, sft_weight=0.5, totals=(6, 4))
    close(share, kto_part * 3 / 6 + 0.5 * 2.5 / 4, 1e-8)
    # no desirable response: the term is 0
    none, stats = K.kto_loss(pol, ref, torch.tensor([False] * 3), z, 1.0, desirable_nll=nll, sft_weight=0.5)
    close(stats["loss/sft"], 0.0)
    close(none, stats["loss/kto"], 1e-12)
    with pytest.raises(ValueError, match="needs desirable_nll"):
        K.kto_loss(pol, ref, d, z, 1.0, sft_weight=0.5)
