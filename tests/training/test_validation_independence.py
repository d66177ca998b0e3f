"""Validation does not change training.

The same DPO run (10 steps, dropout on so that every random stream matters) with
validation every 3 steps and without validation logs identical training metrics and
ends with bit-identical weights: with the precomputed reference, with the resident one
(whose reference passes run between training steps), and with an algorithm whose loss
draws random numbers from torch's generator and megatron-core's RNG tracker, in training
and in validation alike (the loop restores every stream around validation).
"""
import pytest
import torch

from aligner.algorithms.dpo import DPOAlgorithm
from aligner.parallel import ParallelConfig, initialize
from aligner.parallel.spawn import spawn_local
from tests.training import layouts as L

STEPS = 10
TIMING = ("step_time", "tokens_per_s")


class RandomisedDPO(DPOAlgorithm):
    """DPO whose loss also draws random numbers (outside the reference pass)."""

    def loss(self, batch, logits):
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        if not self._collect:
            torch.rand(3)
            with get_cuda_rng_tracker().fork():
                torch.rand(3)
        return super().loss(batch, logits)


CASES = {
    "precompute": lambda: DPOAlgorithm(0, beta=0.5, reference="precompute"),
    "resident": lambda: DPOAlgorithm(0, beta=0.5, reference="resident"),
    "randomised": lambda: RandomisedDPO(0, beta=0.5, reference="precompute"),
}


def _run(out, case, validate):
    from aligner.models.gpt import build_model
    from aligner.parallel import set_seed

    set_seed(11)
    model = build_model(L.model_cfg(), hidden_dropout=0.1, attention_dropout=0.1)
    loop = L.make_loop(
        CASES[case](), [model], L.pair_samples(24, 1), out,
        val=L.pair_samples(7, 2) if validate else None, steps=STEPS, gbs=4, mbs=2,
        val_interval=3 if validate else 0, lr=3e-3,
    )
    loop.fit()
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in L.metrics_rows(out)]
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return rows, weights, len(L.metrics_rows(out, "val"))


def job(root):
    torch.set_num_threads(1)
    initialize(ParallelConfig(seed=11))
    return {
        case: {"plain": _run(f"{root}/{case}_plain", case, False),
               "validated": _run(f"{root}/{case}_validated", case, True)}
        for case in CASES
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return spawn_local(job, 1, str(tmp_path_factory.mktemp("valind")), timeout=900)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_validation_leaves_training_unchanged(runs, case):
    (rows_a, weights_a, n_val_a), (rows_b, weights_b, n_val_b) = runs[case]["plain"], runs[case]["validated"]
    assert n_val_a == 0 and n_val_b == 5  # steps 0, 3, 6, 9 and the end
    assert len(rows_a) == len(rows_b) == STEPS
    assert rows_a[-1]["loss"] != rows_a[0]["loss"]
    for a, b in zip(rows_a, rows_b):
        assert a == b, (a, b)
    for name, w in weights_a.items():
        assert torch.equal(w, weights_b[name]), name
