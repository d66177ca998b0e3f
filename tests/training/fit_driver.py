"""A complete run of the shared loop, as a program one can kill with SIGKILL and run again.

``python -m tests.training.fit_driver OUT_DIR STEPS SAVE_INTERVAL [SLEEP [ALGORITHM]]``
trains with the shared loop (checkpoints every SAVE_INTERVAL steps, resume from the latest)
and writes ``OUT_DIR/result.json`` (rank 0). SLEEP seconds per micro-batch make a kill
during training easy to time. The initial weights are a seeded random initialisation, so
the same command rebuilds them after a kill. The world size comes from the torchrun
variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): with 2 ranks the layout is DP=2.

ALGORITHM:
- ``sft`` (default): a synthetic learnable task (reverse a sequence), 256 samples, global
  batch 16, cosine schedule, validation every 20 steps, HF export.
- ``dpo:precompute`` / ``dpo:resident``: DPO with that reference mode on 26 random pairs
  with global batch 8 (3 steps per epoch, 2 pairs of each epoch unused, so a run of more
  than 3 steps trains every pair against its reference in later epochs), validation every
  2 steps, the last 2 checkpoints kept. ``dpo:precompute:orpo`` (any registered loss type
  after the second colon): the same with that loss, ORPO with its SFT term.
- ``kto:precompute`` / ``kto:resident``: KTO with that reference mode on the same 26 rows
  as labelled responses (a pair split in two, or one desirable response), otherwise as DPO.
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


def _sft(out_dir, steps, save_interval):
    from aligner.algorithms.sft import SFTAlgorithm
    from aligner.models import ModelConfig, build_model
    from aligner.training.config import OptimSection, TrainerSection

    cfg = ModelConfig(vocab_size=24, hidden_size=48, ffn_hidden_size=96, num_layers=2, num_attention_heads=4,
                      max_position_embeddings=32, make_vocab_size_divisible_by=8, pad_token_id=0)
    return SFTAlgorithm(pad_id=0), build_model(cfg), dict(
        train_data=samples(256, 0), val_data=samples(64, 1), model_cfg=cfg,
        optim=OptimSection(lr=3e-3, warmup_steps=5, schedule="cosine", min_lr=3e-4),
        trainer=TrainerSection(max_steps=steps, global_batch_size=16, micro_batch_size=8, out_dir=out_dir,
                               save_interval=save_interval, val_interval=20, progress=False, tensorboard=False,
                               export_hf=True))


LOSS_OPTIONS = {"orpo": {"sft_weight": 1.0}, "simpo": {"beta": 2.0, "gamma": 0.5}}  # per loss type


def _dpo(out_dir, steps, save_interval, reference, loss_type="dpo"):
    from aligner.algorithms.dpo import DPOAlgorithm
    from aligner.models.gpt import build_model
    from aligner.parallel import get_device
    from aligner.training.config import OptimSection, TrainerSection
    from tests.training.test_parallel_equivalence import _model_cfg, _samples

    val = [dict(s, index=i) for i, s in enumerate(_samples("pairs", n=6, seed=11))]
    algo = DPOAlgorithm(0, reference=reference, loss_type=loss_type, **{"beta": 0.5, **LOSS_OPTIONS.get(loss_type, {})})
    return algo, build_model(_model_cfg()).to(get_device()), dict(
        train_data=_samples("pairs", n=26), val_data=val,
        optim=OptimSection(lr=1e-2, clip_grad=1.0, warmup_steps=2, schedule="cosine", min_lr=1e-3),
        trainer=TrainerSection(max_steps=steps, global_batch_size=8, micro_batch_size=2, out_dir=out_dir,
                               save_interval=save_interval, val_interval=2, keep_last=2, seed=7, progress=False,
                               tensorboard=False, export_hf=False))


def _kto(out_dir, steps, save_interval, reference):
    from aligner.algorithms.kto import KTOAlgorithm

    _, model, options = _dpo(out_dir, steps, save_interval, "precompute")
    from tests.training.test_parallel_equivalence import _samples

    val = [dict(s, index=i) for i, s in enumerate(_samples("unpaired", n=6, seed=11))]
    # the single responses desirable (26 desirable, 13 undesirable): desirable-led updates raise the
    # mismatched sequences' log-probs too, so that the reference point is positive in later steps
    train = [dict(s, labels=torch.ones_like(s["labels"])) if len(s["responses"]) == 1 else s
             for s in _samples("unpaired", n=26)]
    options.update(train_data=train, val_data=val)
    return KTOAlgorithm(0, beta=0.5, desirable_weight=1.0, reference=reference), model, options


def main(out_dir, steps, save_interval, sleep=0.0, algorithm="sft"):
    from aligner.parallel import ParallelConfig, initialize, set_seed
    from aligner.training.loop import TrainingLoop

    initialize(ParallelConfig(seed=3))
    torch.set_num_threads(1)
    set_seed(3)
    if algorithm == "sft":
        algo, model, options = _sft(out_dir, steps, save_interval)
    elif algorithm.startswith("dpo:"):
        algo, model, options = _dpo(out_dir, steps, save_interval, *algorithm.split(":")[1:])
    elif algorithm.startswith("kto:"):
        algo, model, options = _kto(out_dir, steps, save_interval, algorithm.split(":")[1])
    else:
        raise SystemExit(f"ALGORITHM {algorithm!r}: expected sft, dpo:precompute or dpo:resident"
                         " (optionally :LOSS_TYPE), kto:precompute or kto:resident")
    if sleep:
        collate = algo.microbatches

        def slow(*a, **k):
            time.sleep(sleep)
            return collate(*a, **k)

        algo.microbatches = slow
    loop = TrainingLoop(algo, [model], options.pop("train_data"), **options)
    result = loop.fit()
    if torch.distributed.get_rank() == 0:
        with open(f"{out_dir}/result.json", "w") as f:
            json.dump(result, f, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]) if len(sys.argv) > 4 else 0.0,
         sys.argv[5] if len(sys.argv) > 5 else "sft")
