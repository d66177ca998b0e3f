"""Training checkpoints.

Layout-free resume: a TP=2 run trains 4 steps (megatron-core fp32 Adam, cosine schedule)
and checkpoints after step 3; resumed from that checkpoint at TP=1 and at PP=2, step 4's
loss equals the uninterrupted run's (fp32, 1e-6). Model, optimizer moments, LR schedule
and data position all travel through the checkpoint.

Crash safety: an unfinished save (a ``.tmp-*`` directory) never becomes ``latest``, a
save that fails its checks writes nothing, ``keep_last`` keeps the newest complete
checkpoints, RNG streams are restored.
"""
import json
import shutil

import pytest

from aligner.parallel import ParallelConfig, initialize
from aligner.parallel.spawn import spawn_local

STEPS, SAVE_AT = 4, 3


def _model_cfg():
    from aligner.models import ModelConfig

    return ModelConfig(vocab_size=24, hidden_size=48, ffn_hidden_size=96, num_layers=2, num_attention_heads=4,
                       num_query_groups=2, max_position_embeddings=32, make_vocab_size_divisible_by=8, pad_token_id=0)


def train(root, run, tp, pp, make_init=False):
    """Train ``run`` to STEPS at TP=tp, PP=pp (resuming from its latest checkpoint if any);
    returns the logged training losses."""
    import os

    from megatron.core import dist_checkpointing

    from aligner.algorithms.sft import SFTAlgorithm
    from aligner.models import build_model
    from aligner.parallel import set_seed
    from aligner.training.config import OptimSection, TrainerSection
    from aligner.training.loop import TrainingLoop
    from tests.training.fit_driver import samples

    initialize(ParallelConfig(tp=tp, pp=pp, seed=3))
    set_seed(3)
    cfg = _model_cfg()
    model = build_model(cfg)
    init = os.path.join(root, "init")  # identical initial weights in every layout
    if make_init:
        if int(os.environ["RANK"]) == 0:
            os.makedirs(init)
        import torch.distributed as dist

        dist.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), init)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), init))
    out_dir = os.path.join(root, run)
    trainer = TrainingLoop(
        SFTAlgorithm(pad_id=0), [model], samples(128, 0), model_cfg=cfg,
        optim=OptimSection(lr=3e-3, warmup_steps=2, schedule="cosine", min_lr=3e-4, weight_decay=0.01),
        trainer=TrainerSection(max_steps=STEPS, global_batch_size=16, micro_batch_size=4, out_dir=out_dir,
                               save_interval=SAVE_AT, progress=False, tensorboard=False, export_hf=False,
                               keep_last=3),
    )
    trainer.fit()
    rows = [json.loads(line) for line in open(f"{out_dir}/metrics.jsonl")]
    return [r["loss"] for r in rows if r["split"] == "train"]


def crash_checks(root):
    """save / find_latest / load_checkpoint around an unfinished save, at world size 1."""
    import os
    import random

    import numpy as np
    import torch

    from aligner.models import build_model, find_latest, load_checkpoint, save_checkpoint
    from aligner.models.checkpoint import list_checkpoints

    initialize(ParallelConfig(seed=5))
    ckpt = os.path.join(root, "crash")
    model = build_model(_model_cfg())
    norm = model.decoder.final_layernorm.weight
    seen = {}
    for step in range(1, 5):
        with torch.no_grad():
            norm.fill_(float(step))
        save_checkpoint(ckpt, step, [model], extra={"consumed_samples": 16 * step}, keep_last=2,
                        model_config=_model_cfg().to_dict())
    seen["after_keep_last"] = [p.name for p in list_checkpoints(ckpt)]
    seen["latest"] = find_latest(ckpt).name
    # RNG streams continue from the checkpoint
    draws = (random.random(), float(np.random.rand()), torch.rand(2).tolist())
    load_checkpoint(ckpt, [model])
    seen["rng_restored"] = draws == (random.random(), float(np.random.rand()), torch.rand(2).tolist())
    # a save killed after writing its tensors: step 5's directory without extra.json
    shutil.copytree(os.path.join(ckpt, "step_0000004"), os.path.join(ckpt, "step_0000005.tmp-killed"))
    os.remove(os.path.join(ckpt, "step_0000005.tmp-killed", "extra.json"))
    with torch.no_grad():
        norm.fill_(0.0)
    seen["latest_after_crash"] = find_latest(ckpt).name
    seen["listed_after_crash"] = [p.name for p in list_checkpoints(ckpt)]
    extra = load_checkpoint(ckpt, [model])
    seen["loaded"] = (extra["step"], extra["consumed_samples"], float(norm[0]))
    # a save whose extra data is not JSON fails before writing anything
    before = sorted(os.listdir(ckpt))
    try:
        save_checkpoint(ckpt, 6, [model], extra={"sampler": object()})
    except TypeError as exc:
        seen["bad_extra"] = str(exc)
    seen["unchanged_after_bad_extra"] = sorted(os.listdir(ckpt)) == before
    # the next complete save removes the unfinished one
    with torch.no_grad():
        norm.fill_(6.0)
    save_checkpoint(ckpt, 6, [model], extra={}, keep_last=2)
    seen["after_next_save"] = sorted(os.listdir(ckpt))
    # a `latest` naming a checkpoint that is gone
    shutil.rmtree(os.path.join(ckpt, "step_0000006"))
    try:
        find_latest(ckpt)
    except FileNotFoundError as exc:
        seen["dangling_latest"] = str(exc)
    return seen


def resume_tp1_then_crash_checks(root):
    return {"losses": train(root, "tp1", 1, 1), "crash": crash_checks(root)}


def _checkpoint_after_step3(root, run):
    """A copy of the uninterrupted run as it stood when step 3's checkpoint was written."""
    shutil.copytree(root / "whole", root / run)
    shutil.rmtree(root / run / "checkpoints" / f"step_{STEPS:07d}")
    (root / run / "checkpoints" / "latest").write_text(json.dumps({"step": SAVE_AT, "dir": f"step_{SAVE_AT:07d}"}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    whole = spawn_local(train, 2, str(root), "whole", 2, 1, True, timeout=300)[0]
    saved = sorted(p.name for p in (root / "whole" / "checkpoints").iterdir())
    _checkpoint_after_step3(root, "tp1")
    _checkpoint_after_step3(root, "pp2")
    tp1 = spawn_local(resume_tp1_then_crash_checks, 1, str(root), timeout=300)[0]
    pp2 = spawn_local(train, 2, str(root), "pp2", 1, 2, timeout=300)
    return {"whole": whole, "saved": saved, "tp1": tp1["losses"], "pp2": pp2, "crash": tp1["crash"]}


def test_resume_at_another_layout_continues_the_run(runs):
    whole, tp1 = runs["whole"], runs["tp1"]
    assert runs["saved"] == ["latest", "step_0000003", "step_0000004"]
    assert len(whole) == STEPS and len(tp1) == STEPS
    assert tp1[:SAVE_AT] == whole[:SAVE_AT]  # the resumed run keeps the logged steps before the checkpoint
    assert abs(tp1[3] - whole[3]) < 1e-6, (tp1[3], whole[3])
    for rank_losses in runs["pp2"]:
        assert abs(rank_losses[3] - whole[3]) < 1e-6, (rank_losses[3], whole[3])
    assert abs(whole[3] - whole[2]) > 1e-3  # step 4 is a different point: the comparison means something


def test_keep_last_and_rng(runs):
    seen = runs["crash"]
    assert seen["after_keep_last"] == ["step_0000003", "step_0000004"]
    assert seen["latest"] == "step_0000004"
    assert seen["rng_restored"]


def test_unfinished_save_never_becomes_latest(runs):
    seen = runs["crash"]
    assert seen["latest_after_crash"] == "step_0000004"
    assert seen["listed_after_crash"] == ["step_0000003", "step_0000004"]
    assert seen["loaded"] == (4, 64, 4.0)
    assert "extra must be JSON-serialisable" in seen["bad_extra"]
    assert seen["unchanged_after_bad_extra"]
    assert seen["after_next_save"] == ["latest", "step_0000004", "step_0000006"]
    assert "step_0000006" in seen["dangling_latest"] and "missing or incomplete" in seen["dangling_latest"]
