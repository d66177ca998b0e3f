"""A complete SFT run on a synthetic learnable task (reverse a sequence), as a program.

``python -m tests.training.fit_driver OUT_DIR STEPS SAVE_INTERVAL [SLEEP]`` trains with the
shared loop (checkpoints every SAVE_INTERVAL steps, resume from the latest) and writes
``OUT_DIR/result.json``. SLEEP seconds per step make a kill during training easy to time.
"""
import json
import sys
import time

import torch


def samples(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(3, 7, (1,), generator=g))
        body = torch.randint(3, 20, (k,), generator=g)
        tokens = torch.cat([torch.tensor([1]), body, torch.tensor([2]), body.flip(0), torch.tensor([2])])
        mask = torch.cat([torch.zeros(k + 2), torch.ones(k + 1)])
        out.append({"tokens": tokens, "loss_mask": mask})
    return out


def main(out_dir, steps, save_interval, sleep=0.0):
    from aligner.algorithms.sft import SFTAlgorithm
    from aligner.models import ModelConfig, build_model
    from aligner.parallel import ParallelConfig, initialize, set_seed
    from aligner.training.config import OptimSection, TrainerSection
    from aligner.training.loop import TrainingLoop

    initialize(ParallelConfig(seed=3))
    torch.set_num_threads(1)
    set_seed(3)
    cfg = ModelConfig(vocab_size=24, hidden_size=48, ffn_hidden_size=96, num_layers=2, num_attention_heads=4,
                      max_position_embeddings=32, make_vocab_size_divisible_by=8, pad_token_id=0)
    model = build_model(cfg)
    algo = SFTAlgorithm(pad_id=0)
    if sleep:
        step = algo.microbatches

        def slow(*a, **k):
            time.sleep(sleep)
            return step(*a, **k)

        algo.microbatches = slow
    trainer = TrainingLoop(
        algo, [model], samples(256, 0), val_data=samples(64, 1), model_cfg=cfg,
        optim=OptimSection(lr=3e-3, warmup_steps=5, schedule="cosine", min_lr=3e-4),
        trainer=TrainerSection(max_steps=steps, global_batch_size=16, micro_batch_size=8, out_dir=out_dir,
                               save_interval=save_interval, val_interval=20, progress=False, tensorboard=False,
                               export_hf=True),
    )
    result = trainer.fit()
    with open(f"{out_dir}/result.json", "w") as f:
        json.dump(result, f, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]) if len(sys.argv) > 4 else 0.0)
