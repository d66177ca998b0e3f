"""A DPO run of the shared loop, as a program one can kill and run again.

``python -m tests.training.dpo_fit_driver OUT_DIR STEPS SAVE_INTERVAL SLEEP REFERENCE`` trains
DPO (``REFERENCE``: precompute | resident) on 26 random pairs with global batch 8 (3 steps per
epoch, 2 pairs of each epoch unused, so a run of more than 3 steps trains every pair against
its reference in later epochs), validates every 2 steps, checkpoints every SAVE_INTERVAL
steps, resumes from the latest checkpoint, and writes ``OUT_DIR/result.json``. The world
size comes from the torchrun variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): with
2 ranks the layout is DP=2. SLEEP seconds per micro-batch make a kill during training easy
to time. The initial weights are a seeded random initialisation, so the same command
rebuilds them after a kill.
"""
import json
import sys
import time

import torch


def main(out_dir, steps, save_interval, sleep, reference):
    from aligner.algorithms.dpo import DPOAlgorithm
    from aligner.models.gpt import build_model
    from aligner.parallel import ParallelConfig, get_device, initialize, set_seed
    from aligner.training.config import OptimSection, TrainerSection
    from aligner.training.loop import TrainingLoop
    from tests.training.test_parallel_equivalence import _model_cfg, _samples

    initialize(ParallelConfig(seed=3))
    torch.set_num_threads(1)
    set_seed(3)
    model = build_model(_model_cfg()).to(get_device())
    algo = DPOAlgorithm(0, beta=0.5, reference=reference)
    if sleep:
        collate = algo.microbatches

        def slow(*a, **k):
            time.sleep(sleep)
            return collate(*a, **k)

        algo.microbatches = slow
    val = [dict(s, index=i) for i, s in enumerate(_samples("pairs", n=6, seed=11))]
    loop = TrainingLoop(
        algo, [model], _samples("pairs", n=26), val_data=val,
        optim=OptimSection(lr=1e-2, clip_grad=1.0, warmup_steps=2, schedule="cosine", min_lr=1e-3),
        trainer=TrainerSection(max_steps=steps, global_batch_size=8, micro_batch_size=2, out_dir=out_dir,
                               save_interval=save_interval, val_interval=2, keep_last=2, seed=7, progress=False,
                               tensorboard=False, export_hf=False),
    )
    result = loop.fit()
    if torch.distributed.get_rank() == 0:
        with open(f"{out_dir}/result.json", "w") as f:
            json.dump(result, f, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
