"""DPO with LoRA: the reference is the base with the adapters disabled, on the policy's
own weights (no host copy, no second model). It logs, step for step (1e-6), what DPO logs
with the reference log-probs precomputed once from the initial policy (adapters at
B = 0, i.e. the base), and what DPO logs with an explicit frozen copy of the base as a
second model for its reference; the run saves a checkpoint and resumes with the same
metrics; at the end it exports the merged model (``hf/``) and the adapters (``hf_peft/``).
Parameter bytes: the base once (the explicit copy: twice); the optimizer's parameters are
the adapters only. The checkpoint holds the adapters and their optimizer state only, with
the base's fingerprint: a resume onto another base is refused in one line naming both."""
import contextlib
import json
import math
from pathlib import Path

import pytest
import torch

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

    class SecondModelReference:
        """The resident reference pass run on another model (the loop's schedule over it)."""

        def __init__(self, loop, chunks):
            self.loop, self.chunks = loop, chunks

        @contextlib.contextmanager
        def active(self):
            policy = self.loop.models
            self.loop.models = self.chunks
            try:
                yield self.chunks
            finally:
                self.loop.models = policy

    class CopyReferenceDPO(DPOAlgorithm):
        """DPO whose reference is an explicit frozen copy of the base (a second model)."""

        def __init__(self, copy, **kw):
            super().__init__(0, **kw)
            self.copy = copy

        def setup(self, loop):
            super().setup(loop)
            self._host_ref = SecondModelReference(loop, self.copy)

    def fit(reference, out, max_steps=STEPS, lora=True, copy=False):
        set_seed(5)
        model = build_model(_model_cfg()).to(get_device())
        extra = []
        if copy:  # the same initial weights again: the base, frozen, as a second model
            set_seed(5)
            extra = [build_model(_model_cfg()).to(get_device()).eval().requires_grad_(False)]
        if lora:
            apply_lora([model], _model_cfg(), LoraSettings(rank=4, alpha=8.0, seed=5))
        algo = CopyReferenceDPO(extra, beta=0.5, reference=reference) if copy else \
            DPOAlgorithm(0, beta=0.5, reference=reference)
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
        params = list(model.parameters()) + [p for m in extra for p in m.parameters()]
        optimized = [p for g in loop.policy.optimizer.param_groups for p in g["params"]]
        return {
            "metrics": metrics,
            "mode": getattr(getattr(algo, "_host_ref", None), "mode", None),
            "host_copy": hasattr(getattr(algo, "_host_ref", None), "_weights"),
            "param_bytes": sum(p.numel() * p.element_size() for p in params),
            "adapter_bytes": sum(p.numel() * p.element_size() for p in params if p.requires_grad),
            "optimized_bytes": sum(p.numel() * p.element_size() for p in optimized),
            "base_bytes": sum(p.numel() * p.element_size() for p in params if not p.requires_grad),
            "adapters": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        }

    out = {"resident": fit("resident", "resident"), "precompute": fit("precompute", "precompute"),
           "copy": fit("resident", "copy", copy=True)}
    out["exported"] = sorted(p.name for p in Path(out_dir, "precompute").iterdir() if p.name.startswith("hf"))
    out["peft_config"] = json.loads(Path(out_dir, "precompute", "hf_peft", "adapter_config.json").read_text())
    fit("resident", "resumed", max_steps=2)  # stops at step 2 with a checkpoint
    out["resumed"] = fit("resident", "resumed")  # resumes at step 2
    fit("precompute", "full", max_steps=1, lora=False)  # a whole-model checkpoint, for its size

    # the checkpoints: tensors saved, bytes, the base fingerprint
    from megatron.core import dist_checkpointing

    from aligner.models.checkpoint import base_fingerprint, find_latest, load_checkpoint

    for name in ("resumed", "full"):
        step_dir = find_latest(Path(out_dir, name, "checkpoints"))
        meta = dist_checkpointing.load_tensors_metadata(str(step_dir))
        sizes = {k: math.prod(t.global_shape) * t.dtype.itemsize for k, t in meta.items()}
        out[f"{name}_ckpt"] = {"keys": sorted(meta), "tensor_bytes": sizes,
                               "bytes": sum(f.stat().st_size for f in step_dir.rglob("*") if f.is_file()),
                               "extra": json.loads((step_dir / "extra.json").read_text())}
    step_dir = find_latest(Path(out_dir, "resumed", "checkpoints"))
    set_seed(5)
    same = build_model(_model_cfg()).to(get_device())
    apply_lora([same], _model_cfg(), LoraSettings(rank=4, alpha=8.0, seed=5))
    out["fingerprint"] = base_fingerprint([same])
    load_checkpoint(step_dir, [same])
    trained = {n: p.detach().clone() for n, p in same.named_parameters() if p.requires_grad}
    set_seed(6)  # another base (other initial weights), the same adapters
    other = build_model(_model_cfg()).to(get_device())
    apply_lora([other], _model_cfg(), LoraSettings(rank=4, alpha=8.0, seed=5))
    out["other_fingerprint"] = base_fingerprint([other])
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    try:
        load_checkpoint(step_dir, [other])
    except ValueError as exc:
        out["refused"], out["refused_type"] = str(exc), type(exc).__name__
    out["other_unchanged"] = all(torch.equal(p, before[n]) for n, p in other.named_parameters())
    out["adapters_loaded"] = trained
    out["adapters_saved"] = out["resumed"]["adapters"]
    import io
    from contextlib import redirect_stderr

    from aligner.cli.export import main as export_main

    err = io.StringIO()
    with redirect_stderr(err):
        out["export_rc"] = export_main([str(step_dir), str(Path(out_dir, "exported"))])
    out["export_error"] = err.getvalue()
    with torch.no_grad():  # one base value changed: another fingerprint
        next(p for p in same.parameters() if not p.requires_grad).view(-1)[0] += 1e-3
    out["nudged_fingerprint"] = base_fingerprint([same])
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


def test_lora_dpo_equals_dpo_with_an_explicit_frozen_copy_of_the_base(out):
    res, copy = out["resident"], out["copy"]
    _assert_same(res["metrics"], copy["metrics"])
    assert all(abs(r["rewards/margins"]) > 1e-3 for r in res["metrics"][1:])
    # the explicit reference holds the base a second time; adapters off holds it once
    assert copy["base_bytes"] == 2 * res["base_bytes"] and copy["adapter_bytes"] == res["adapter_bytes"]
    assert copy["param_bytes"] - res["param_bytes"] == res["base_bytes"]
    print(f"DPO parameter bytes: LoRA, reference = adapters off {res['param_bytes']}; LoRA with an explicit frozen"
          f" copy of the base {copy['param_bytes']}")


def test_lora_checkpoint_holds_the_adapters_and_their_optimizer_state_only(out):
    lora, full = out["resumed_ckpt"], out["full_ckpt"]
    adapters = out["adapters_saved"]
    model_keys = [k for k in lora["keys"] if not k.startswith("optimizer.")]
    assert len(model_keys) == len({k.replace("decoder.layers.", "") for k in model_keys})
    # every saved model tensor is an adapter (layers stacked: one key per adapter tensor of all layers)
    assert model_keys and all(".lora_" in k for k in model_keys), model_keys
    assert len(model_keys) == len(adapters) // 2  # two layers share a key
    optim_keys = [k for k in lora["keys"] if k.startswith("optimizer.")]
    assert optim_keys and all(".lora_" in k for k in optim_keys), optim_keys
    assert any("exp_avg_sq" in k for k in optim_keys)
    assert any(k.endswith("word_embeddings.weight") for k in full["keys"])
    assert lora["extra"]["base_fingerprint"] == out["fingerprint"] and "base_fingerprint" not in full["extra"]
    # loaded onto the same base: the trained adapters
    for name, value in adapters.items():
        assert torch.equal(out["adapters_loaded"][name], value), name
    # tensor bytes: the adapters, and Adam's two moments of each
    adapter_bytes = sum(v.numel() * v.element_size() for v in adapters.values())
    model_bytes = sum(b for k, b in lora["tensor_bytes"].items() if not k.startswith("optimizer."))
    optim_bytes = sum(b for k, b in lora["tensor_bytes"].items() if k.startswith("optimizer."))
    assert model_bytes == adapter_bytes and optim_bytes == 2 * adapter_bytes
    full_bytes = sum(full["tensor_bytes"].values())
    assert full_bytes > 3 * model_bytes and lora["bytes"] < full["bytes"]
    print(f"checkpoint bytes (files): whole model {full['bytes']}, LoRA rank 4 {lora['bytes']}")


def test_lora_checkpoint_refuses_another_base_in_one_line(out):
    fp, other = out["fingerprint"], out["other_fingerprint"]
    assert len(fp) == 16 and fp != other and out["nudged_fingerprint"] not in (fp, other)
    msg = out["refused"]
    assert "\n" not in msg and fp in msg and other in msg, msg
    assert out["refused_type"] == "CheckpointError"  # a user error: one line and exit status 2 on the command line
    assert out["other_unchanged"]
    # `aligner export` of an adapter checkpoint: refused in one line (it holds no base)
    assert out["export_rc"] == 2 and "LoRA adapters only" in out["export_error"]
    assert out["export_error"].count("\n") == 1 and fp in out["export_error"]
