"""The learning rate a step trains with is the schedule's value for that step, and the log says so.

Step k (1-based) uses lr(k): ``lr * k / W`` during W warmup steps, then the decay
(cosine here) from ``lr`` at step W to ``min_lr`` at the last step. Checked four ways:
one step with warmup moves the exported weights (Adam's first update is about lr(1) per
element); the lr each update applied, read back from Adam's state, is the logged one;
the logged lr sequence equals the formula; a run resumed from a checkpoint logs the same
sequence.
"""
import json
import math
import os
import shutil

import pytest
import torch

from aligner.parallel import ParallelConfig, initialize
from aligner.parallel.spawn import spawn_local
from tests.training import layouts as L

LR, MIN_LR, WARMUP, STEPS = 1e-2, 1e-3, 3, 8


def formula(k, steps=STEPS, warmup=WARMUP):
    if k <= warmup:
        return LR * k / warmup
    ratio = (k - warmup) / (steps - warmup)
    return MIN_LR + 0.5 * (1 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def _loop(out, steps, warmup, **kw):
    from aligner.algorithms.sft import SFTAlgorithm
    from aligner.training.config import OptimSection, TrainerSection
    from aligner.training.loop import TrainingLoop

    (model,) = L.build_chunks()
    return TrainingLoop(
        SFTAlgorithm(0), [model], L.sft_samples(32, 1), model_cfg=L.model_cfg(),
        optim=OptimSection(lr=LR, min_lr=MIN_LR, warmup_steps=warmup, schedule="cosine", clip_grad=1.0),
        trainer=TrainerSection(max_steps=steps, global_batch_size=4, micro_batch_size=2, out_dir=out,
                               progress=False, tensorboard=False, keep_last=5, **kw),
    )


def job(root):
    from safetensors.torch import load_file

    from aligner.models import export_hf
    from aligner.parallel import set_seed

    torch.set_num_threads(1)
    initialize(ParallelConfig(seed=3))
    set_seed(3)
    out = {}
    # one step, five warmup steps: the exported weights move by about lr(1) = lr / 5 per element
    loop = _loop(f"{root}/one", 1, 5, export_hf=True)
    export_hf([m.module for m in loop.models], L.model_cfg(), f"{root}/init_hf")
    loop.fit()
    before, after = load_file(f"{root}/init_hf/model.safetensors"), load_file(f"{root}/one/hf/model.safetensors")
    out["max_update"] = max(float((after[k] - before[k]).abs().max()) for k in before)
    out["one_lr"] = [r["lr"] for r in L.metrics_rows(f"{root}/one")]
    # the lr each update applied, read back from Adam's state: p_k = p_{k-1} - lr_k * u_k with
    # u_k = m_hat / (sqrt(v_hat) + eps) (weight decay 0)
    set_seed(3)
    loop = _loop(f"{root}/applied", STEPS, WARMUP, export_hf=False)
    out["applied"] = []
    for _ in range(STEPS):
        adams = [opt.optimizer for opt in loop.optimizer.chained_optimizers]  # torch AdamW
        groups = [(adam, g) for adam in adams for g in adam.param_groups]
        before = {id(p): p.detach().clone() for _, g in groups for p in g["params"]}
        logged = loop.train_step()["lr"]
        implied = []
        for adam, group in groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = adam.state[p]
                t = float(state["step"])
                u = (state["exp_avg"] / (1 - beta1**t)) / ((state["exp_avg_sq"] / (1 - beta2**t)).sqrt() + group["eps"])
                big = u.abs() > 0.5
                implied.append(((before[id(p)] - p.detach())[big] / u[big]).double())
        out["applied"].append((logged, float(torch.cat(implied).median())))
    # the whole schedule, with a checkpoint at step 4 ...
    set_seed(3)
    _loop(f"{root}/whole", STEPS, WARMUP, save_interval=4, export_hf=False).fit()
    out["whole"] = [(r["step"], r["lr"]) for r in L.metrics_rows(f"{root}/whole")]
    # ... resumed from it in a new folder
    os.makedirs(f"{root}/resumed/checkpoints")
    shutil.copytree(f"{root}/whole/checkpoints/step_0000004", f"{root}/resumed/checkpoints/step_0000004")
    with open(f"{root}/resumed/checkpoints/latest", "w") as f:
        json.dump({"step": 4, "dir": "step_0000004"}, f)
    set_seed(3)
    _loop(f"{root}/resumed", STEPS, WARMUP, export_hf=False).fit()
    out["resumed"] = [(r["step"], r["lr"]) for r in L.metrics_rows(f"{root}/resumed")]
    return out


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return spawn_local(job, 1, str(tmp_path_factory.mktemp("lr")), timeout=600)[0]


def test_first_warmup_step_trains_at_its_learning_rate(result):
    assert result["one_lr"] == [pytest.approx(LR / 5, rel=1e-12)]
    # Adam's first update is lr * g / (|g| + eps) per element: lr(1) for any sizeable gradient
    assert result["max_update"] == pytest.approx(LR / 5, rel=1e-3)


def test_logged_lr_is_the_lr_the_update_applied(result):
    assert len(result["applied"]) == STEPS
    for k, (logged, implied) in enumerate(result["applied"], start=1):
        assert logged == pytest.approx(formula(k), rel=1e-12), k
        assert implied == pytest.approx(logged, rel=1e-4), k


def test_logged_lr_is_the_schedule_formula(result):
    assert [s for s, _ in result["whole"]] == list(range(1, STEPS + 1))
    for step, lr in result["whole"]:
        assert lr == pytest.approx(formula(step), rel=1e-12, abs=1e-15), step
    assert result["whole"][-1][1] == pytest.approx(MIN_LR)


def test_resume_continues_the_schedule(result):
    assert result["resumed"] == [pytest.approx(x, rel=1e-12) for x in result["whole"][4:]]
