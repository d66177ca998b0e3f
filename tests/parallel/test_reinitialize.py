"""aligner.parallel.destroy() ends a job's process groups so that the same processes can
start fresh ones: two ranks fit, destroy, and fit again, and the second run trains exactly
as the first (the same seed, data and losses)."""
import torch

from aligner.parallel import ParallelConfig, destroy, initialize, set_seed
from aligner.parallel.spawn import spawn_local


def fit_destroy_fit(root):
    from aligner.algorithms.sft import SFTAlgorithm
    from tests.training import layouts as L

    torch.set_num_threads(1)
    losses = []
    for run in range(2):
        initialize(ParallelConfig(seed=3, timeout_minutes=1))  # data parallel over the two ranks
        set_seed(3)
        out = f"{root}/run{run}"
        L.make_loop(SFTAlgorithm(0), L.build_chunks(), L.sft_samples(16, 1), out, steps=2, gbs=4, mbs=2).fit()
        losses.append([row["loss"] for row in L.metrics_rows(out)])
        destroy()
    return losses


def test_a_job_fits_destroys_and_fits_again(tmp_path):
    rank0, rank1 = spawn_local(fit_destroy_fit, 2, str(tmp_path), timeout=240)
    first, second = rank0
    assert len(first) == 2 and all(loss > 0 for loss in first)
    assert second == first
    assert rank1 == rank0
