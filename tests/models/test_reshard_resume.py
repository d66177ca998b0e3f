"""Training checkpoints are layout-free: 3 steps at TP=2, save, resume at TP=1 and at PP=2;
the next step's loss equals an uninterrupted TP=2 run's (fp32, 1e-6). Model, optimizer
(Adam moments), LR schedule and data position all travel through the checkpoint."""
import shutil

import pytest

from aligner.parallel import ParallelConfig, initialize
from aligner.parallel.spawn import spawn_local


def train(out_dir, tp, pp, steps):
    import torch

    from aligner.algorithms.sft import SFTAlgorithm
    from aligner.models import ModelConfig, build_model
    from aligner.parallel import set_seed
    from aligner.training.config import OptimSection, TrainerSection
    from aligner.training.loop import Trainer
    from tests.training.fit_driver import samples

    initialize(ParallelConfig(tp=tp, pp=pp, seed=3))
    set_seed(3)
    cfg = ModelConfig(vocab_size=24, hidden_size=48, ffn_hidden_size=96, num_layers=2, num_attention_heads=4,
                      num_query_groups=2, max_position_embeddings=32, make_vocab_size_divisible_by=8, pad_token_id=0)
    model = build_model(cfg)
    # identical initial weights in every layout, made once at world size 1
    import os

    from megatron.core import dist_checkpointing

    init = os.path.join(os.path.dirname(out_dir), "init")
    state = dist_checkpointing.load(model.sharded_state_dict(), init)
    model.load_state_dict(state)
    trainer = Trainer(
        SFTAlgorithm(pad_id=0), [model], samples(128, 0), model_cfg=cfg,
        optim=OptimSection(lr=3e-3, warmup_steps=2, schedule="cosine", min_lr=3e-4, weight_decay=0.01),
        trainer=TrainerSection(max_steps=steps, global_batch_size=16, micro_batch_size=4, out_dir=out_dir,
                               progress=False, tensorboard=False, export_hf=False, keep_last=3),
    )
    trainer.fit()
    import json

    rows = [json.loads(l) for l in open(f"{out_dir}/metrics.jsonl")]
    return [r["loss"] for r in rows if r["split"] == "train"]


def make_init(root):
    from megatron.core import dist_checkpointing

    from aligner.models import ModelConfig, build_model

    initialize(ParallelConfig(seed=3))
    cfg = ModelConfig(vocab_size=24, hidden_size=48, ffn_hidden_size=96, num_layers=2, num_attention_heads=4,
                      num_query_groups=2, max_position_embeddings=32, make_vocab_size_divisible_by=8, pad_token_id=0)
    import os

    os.makedirs(f"{root}/init")
    dist_checkpointing.save(build_model(cfg).sharded_state_dict(), f"{root}/init")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    spawn_local(make_init, 1, str(root), timeout=200)
    whole = spawn_local(train, 2, str(root / "whole"), 2, 1, 4, timeout=300)[0]
    spawn_local(train, 2, str(root / "part"), 2, 1, 3, timeout=300)
    shutil.copytree(root / "part", root / "tp1")
    shutil.copytree(root / "part", root / "pp2")
    tp1 = spawn_local(train, 1, str(root / "tp1"), 1, 1, 4, timeout=300)[0]
    pp2 = spawn_local(train, 2, str(root / "pp2"), 1, 2, 4, timeout=300)
    return whole, tp1, pp2


def test_resume_at_another_layout_continues_the_run(runs):
    whole, tp1, pp2 = runs
    assert len(whole) == 4 and len(tp1) == 4
    assert tp1[:3] == whole[:3]  # the resumed run keeps the first three logged steps
    assert abs(tp1[3] - whole[3]) < 1e-6, (tp1[3], whole[3])
    for rank_losses in pp2:
        assert abs(rank_losses[3] - whole[3]) < 1e-6, (rank_losses[3], whole[3])
    assert whole[3] != whole[2]
