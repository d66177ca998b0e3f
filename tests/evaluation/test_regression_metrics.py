"""Per-attribute MSE / Pearson with missing labels, streamed across batches and "ranks"."""
import math

import pytest
import torch

from aligner.evaluation.regression_metrics import RegressionAccumulator, regression_metrics

NAN = float("nan")
PRED = torch.tensor([[1.0, 0.0], [2.0, 1.0], [3.0, 4.0]])
LABELS = torch.tensor([[1.0, NAN], [3.0, 1.0], [2.0, 3.0]])
MASK = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])


def test_hand_computed_metrics():
    m = regression_metrics(PRED, LABELS, MASK, ["a", "b"])
    # a: errors 0, −1, 1 -> MSE 2/3. Pearson: x = 1,2,3 and y = 1,3,2 (means 2, 2):
    #    Σdx·dy = (−1)(−1) + 0·1 + 1·0 = 1, Σdx² = 2, Σdy² = 2 -> r = 1 / sqrt(2·2) = 0.5
    assert m["mse/a"] == pytest.approx(2 / 3, abs=1e-12)
    assert m["pearson/a"] == pytest.approx(0.5, abs=1e-12)
    # b: the NaN label is missing; pairs (1, 1), (4, 3): MSE (0 + 1) / 2 = 0.5, Pearson of 2 rising points = 1
    assert m["mse/b"] == pytest.approx(0.5, abs=1e-12)
    assert m["pearson/b"] == pytest.approx(1.0, abs=1e-12)
    assert m["count/a"] == 3 and m["count/b"] == 2
    # overall MSE over the 5 present labels: (2 + 1) / 5
    assert m["mse"] == pytest.approx(0.6, abs=1e-12)


def test_pearson_agrees_with_torch_corrcoef():
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(50, 3, generator=gen) * 4
    labels = (pred + torch.randn(50, 3, generator=gen)).round().clamp(0, 4)
    mask = (torch.rand(50, 3, generator=gen) > 0.3).float()
    m = regression_metrics(pred, labels, mask, ["x", "y", "z"])
    for j, name in enumerate("xyz"):
        sel = mask[:, j] > 0
        ref = torch.corrcoef(torch.stack([pred[sel, j].double(), labels[sel, j].double()]))[0, 1]
        assert m[f"pearson/{name}"] == pytest.approx(float(ref), abs=1e-10)
        assert m[f"mse/{name}"] == pytest.approx(float(((pred[sel, j] - labels[sel, j]).double() ** 2).mean()), abs=1e-6)


def test_streaming_across_batches_and_ranks():
    whole = regression_metrics(PRED, LABELS, MASK, ["a", "b"])
    rank0 = RegressionAccumulator(["a", "b"]).update(PRED[:1], LABELS[:1], MASK[:1])
    rank0.update(PRED[1:2], LABELS[1:2], MASK[1:2])  # two batches on one rank
    rank1 = RegressionAccumulator(["a", "b"]).update(PRED[2:], LABELS[2:], MASK[2:])
    summed = RegressionAccumulator(["a", "b"], state=rank0.state + rank1.state)  # what all_reduce gives
    merged = rank0.merge(rank1)
    for acc in (summed, merged):
        got = acc.compute()
        assert got.keys() == whole.keys()
        for k in whole:
            assert got[k] == pytest.approx(whole[k], abs=1e-12), k


def test_undefined_pearson_is_nan_and_bad_input_raises():
    m = regression_metrics(torch.tensor([[1.0], [1.0]]), torch.tensor([[0.0], [2.0]]), torch.ones(2, 1), ["c"])
    assert math.isnan(m["pearson/c"]) and m["mse/c"] == pytest.approx(1.0)
    empty = regression_metrics(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1), ["c"])
    assert math.isnan(empty["mse/c"]) and empty["count/c"] == 0
    with pytest.raises(ValueError, match=r"pred must be \[n, 2\]"):
        regression_metrics(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), ["a", "b"])
    with pytest.raises(ValueError, match="only 0 and 1"):
        regression_metrics(torch.zeros(2, 1), torch.zeros(2, 1), torch.full((2, 1), 0.5), ["a"])
    with pytest.raises(ValueError, match="non-finite"):
        regression_metrics(torch.tensor([[NAN]]), torch.zeros(1, 1), torch.ones(1, 1), ["a"])
    with pytest.raises(ValueError, match="cannot be merged"):
        RegressionAccumulator(["a"]).merge(RegressionAccumulator(["b"]))
