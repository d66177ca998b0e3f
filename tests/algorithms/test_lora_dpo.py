"""DPO with LoRA: the reference is the base with the adapters disabled, on the policy's
own weights (no host copy, no second model). It logs, step for step (1e-6), what DPO logs
with the reference log-probs precomputed once from the initial policy (adapters at
B = 0, i.e. the base), and the run saves a checkpoint and resumes with the same metrics;
at the end it exports the merged model (``hf/``) and the adapters (``hf_peft/``).
Parameter bytes: the base once; the optimizer's parameters are the adapters only."""
import json
from pathlib import Path

import pytest

from aligner.parallel import ParallelConfig, initialize
from aligner.parallel.spawn import spawn_local
from tests.training.test_dpo_reference import _assert_same

STEPS, GBS = 4, 4


def run_all(out_dir):
    from aligner.algorithms.dpo import DPOAlgorithm
    from aligner.models.gpt import build_model
    from aligner.models.lora import LoraSettings, apply_lora
    from aligner.parallel import get_device, set_seed
    from aligner.training.config import OptimSection, TrainerSection
    from aligner.training.loop import TrainingLoop
    from tests.training.test_parallel_equivalence import _model_cfg, _samples

    initialize(ParallelConfig(seed=5))

    def fit(reference, out, max_steps=STEPS):
        set_seed(5)
        model = build_model(_model_cfg()).to(get_device())
        apply_lora([model], _model_cfg(), LoraSettings(rank=4, alpha=8.0, seed=5))
        algo = DPOAlgorithm(0, beta=0.5, reference=reference)
        loop = TrainingLoop(
            algo, [model], _samples("pairs", n=16),
            optim=OptimSection(lr=2e-2, clip_grad=1.0),
            trainer=TrainerSection(max_steps=max_steps, global_batch_size=GBS, micro_batch_size=2,
                                   out_dir=f"{out_dir}/{out}", export_hf=out == "precompute", progress=False,
                                   tensorboard=False, resume=True, log_interval=1),
            model_cfg=_model_cfg(),
        )
        loop.fit()
        metrics = [json.loads(line) for line in (Path(out_dir) / out / "metrics.jsonl").read_text().splitlines()]
        params = list(model.parameters())
        optimized = [p for g in loop.policy.optimizer.param_groups for p in g["params"]]
        return {
            "metrics": metrics,
            "mode": getattr(getattr(algo, "_host_ref", None), "mode", None),
            "host_copy": hasattr(getattr(algo, "_host_ref", None), "_weights"),
            "param_bytes": sum(p.numel() * p.element_size() for p in params),
            "adapter_bytes": sum(p.numel() * p.element_size() for p in params if p.requires_grad),
            "optimized_bytes": sum(p.numel() * p.element_size() for p in optimized),
            "base_bytes": sum(p.numel() * p.element_size() for p in params if not p.requires_grad),
        }

    out = {"resident": fit("resident", "resident"), "precompute": fit("precompute", "precompute")}
    out["exported"] = sorted(p.name for p in Path(out_dir, "precompute").iterdir() if p.name.startswith("hf"))
    out["peft_config"] = json.loads(Path(out_dir, "precompute", "hf_peft", "adapter_config.json").read_text())
    fit("resident", "resumed", max_steps=2)  # stops at step 2 with a checkpoint
    out["resumed"] = fit("resident", "resumed")  # resumes at step 2
    return out


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return spawn_local(run_all, 1, str(tmp_path_factory.mktemp("lora_dpo")), timeout=600)[0]


def test_lora_dpo_reference_is_the_base_with_adapters_disabled(out):
    res, pre = out["resident"], out["precompute"]
    assert res["mode"] == "adapters" and not res["host_copy"]
    assert [r["step"] for r in res["metrics"]] == list(range(1, STEPS + 1))
    _assert_same(res["metrics"], pre["metrics"])
    # step 1: policy = reference; later the adapters have moved the policy off the base
    assert res["metrics"][0]["rewards/margins"] == 0.0
    assert all(abs(r["rewards/margins"]) > 1e-3 for r in res["metrics"][1:])
    # one copy of the weights; gradients and optimizer state over the adapters only
    assert res["param_bytes"] == res["base_bytes"] + res["adapter_bytes"]
    assert res["optimized_bytes"] == res["adapter_bytes"] < res["base_bytes"] / 4
    print(f"LoRA DPO bytes: parameters {res['param_bytes']} (base {res['base_bytes']}, adapters"
          f" {res['adapter_bytes']}), reference 0 extra")


def test_lora_dpo_resumes_with_the_same_metrics(out):
    _assert_same(out["resumed"]["metrics"], out["resident"]["metrics"])


def test_lora_run_exports_merged_and_peft(out):
    assert out["exported"] == ["hf", "hf_peft"]
    assert out["peft_config"]["r"] == 4 and out["peft_config"]["lora_alpha"] == 8.0
    assert out["peft_config"]["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                    "up_proj", "v_proj"]
