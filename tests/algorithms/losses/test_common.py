"""aligner.algorithms.losses.common: masked reductions, whitening and group reductions."""
import math

import torch

from aligner.algorithms.losses import common as C
from tests.algorithms.losses.values import t


def test_sequence_logps_sum_and_mean():
    lp = t([-1.0, -2.0, -3.0, 7.0], [-0.5, -0.5, float("nan"), 0.0])
    mask = t([0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0])
    # row 0: response tokens -2, -3 -> sum -5, mean -2.5; row 1: -0.5, -0.5 -> -1, -0.5 (NaN masked away)
    assert C.sequence_logps(lp, mask).tolist() == [-5.0, -1.0]
    assert C.sequence_logps(lp, mask, average=True).tolist() == [-2.5, -0.5]


def test_masked_whiten_and_summable_moments():
    x = t([[1.0, 2.0, 3.0, 100.0]])
    mask = t([[1.0, 1.0, 1.0, 0.0]])
    # mean 2, population variance (1 + 0 + 1) / 3 = 2/3
    s = math.sqrt(2 / 3)
    out = C.masked_whiten(x, mask)
    torch.testing.assert_close(out, t([[-1 / s, 0.0, 1 / s, 0.0]]), atol=1e-7, rtol=0)
    # moments from two "ranks" summed equal the moments of the whole
    m = C.masked_moments(x[:, :2], mask[:, :2]) + C.masked_moments(x[:, 2:], mask[:, 2:])
    assert m.tolist() == [3.0, 6.0, 14.0]
    torch.testing.assert_close(C.masked_whiten(x, mask, moments=m), out)
    kept = C.masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(kept, t([[-1 / s + 2, 2.0, 1 / s + 2, 0.0]]), atol=1e-7, rtol=0)


def test_group_softmax_by_consecutive_blocks_and_by_ids():
    logits = t([math.log(3), 0.0, 0.0, 0.0])
    # groups of 2: [3, 1] / 4 and [1, 1] / 2
    torch.testing.assert_close(C.group_softmax(logits, 2), t([0.75, 0.25, 0.5, 0.5]))
    # the same groups interleaved by explicit ids
    torch.testing.assert_close(C.group_softmax(logits[[0, 2, 1, 3]], torch.tensor([0, 1, 0, 1])),
                               t([0.75, 0.5, 0.25, 0.5]))
