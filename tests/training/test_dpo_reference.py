"""DPO's reference over several epochs: the precomputed table covers every training pair
(epoch 0's batches and its unused tail), so 3 epochs of 26 pairs at global batch 8 (2 pairs
per epoch beyond the last full batch, trained in later epochs after the reshuffle) log the
same metrics step for step as the resident reference, which recomputes the reference
log-probs of each step's own pairs (1e-6); at DP=1 and DP=2."""
import pytest
import torch

from aligner.parallel import ParallelConfig, initialize
from aligner.parallel.spawn import spawn_local

PAIRS, GBS, EPOCHS = 26, 8, 3
TIMING = ("step_time", "tokens_per_s")


def run_both(out_dir):
    from aligner.algorithms.dpo import DPOAlgorithm
    from aligner.models.gpt import build_model
    from aligner.parallel import get_device, set_seed
    from aligner.training.config import OptimSection, TrainerSection
    from aligner.training.loop import TrainingLoop
    from tests.training.test_parallel_equivalence import _model_cfg, _samples

    initialize(ParallelConfig(seed=5))
    out = {}
    for reference in ("precompute", "resident"):
        set_seed(5)
        model = build_model(_model_cfg()).to(get_device())
        algo = DPOAlgorithm(0, beta=0.5, reference=reference)
        loop = TrainingLoop(
            algo, [model], _samples("pairs", n=PAIRS),
            optim=OptimSection(lr=1e-2, clip_grad=1.0),
            trainer=TrainerSection(max_epochs=EPOCHS, max_steps=-1, global_batch_size=GBS, micro_batch_size=2,
                                   out_dir=f"{out_dir}/{reference}", export_hf=False, progress=False,
                                   tensorboard=False, resume=False),
        )
        algo.setup(loop)
        out[reference] = {"steps": [loop.train_step() for _ in range(loop.max_steps)], "table": algo._ref.clone(),
                          "unused": loop.unused_per_epoch, "steps_per_epoch": loop.steps_per_epoch}
    return out


@pytest.mark.parametrize("world", [1, 2], ids=["dp1", "dp2"])
def test_precompute_equals_resident_over_epochs(tmp_path, world):
    for rank_out in spawn_local(run_both, world, str(tmp_path), timeout=600):
        pre, res = rank_out["precompute"], rank_out["resident"]
        assert (pre["steps_per_epoch"], pre["unused"]) == (3, 2)
        assert len(pre["steps"]) == len(res["steps"]) == EPOCHS * 3
        for step, (a, b) in enumerate(zip(pre["steps"], res["steps"]), 1):
            assert set(a) == set(b)
            for key in sorted(set(a) - set(TIMING)):
                assert abs(a[key] - b[key]) <= 1e-6, (step, key, a[key], b[key])
        # every training pair has its reference (token counts > 0), the unused tail included
        assert bool((pre["table"][:PAIRS, 2:] > 0).all())
        assert pre["steps"][0]["rewards/margins"] == 0.0 and pre["steps"][-1]["rewards/margins"] > 0.1
