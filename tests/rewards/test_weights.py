"""aligner.rewards.weights: attribute outputs combined into one reward, ``r = w · ŷ``."""
import pytest
import torch

from aligner.rewards import weights as L
from tests.algorithms.losses.values import t


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
