"""The CPU bridge fails loudly when a megatron-core upgrade moves a place it bridges.

Each site the bridge relies on is checked in the installed megatron-core source by name,
then the bridged behaviour is checked on this CPU. (On a GPU machine the bridge is not
engaged and the behaviour checks are skipped.)"""
import importlib
import inspect

import pytest
import torch

from aligner.parallel import cpu_bridge

SITES = [
    # (module, object, text the bridged code path contains)
    ("megatron.core.models.common.embeddings.rotary_pos_embedding", "RotaryEmbedding", "current_device()"),
    ("megatron.core.transformer.utils", "get_default_causal_mask", 'device="cuda"'),
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_no_pipelining", 'device="cuda"'),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32", "torch.cuda.FloatTensor"),
    ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker", "def fork"),
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", "cuda"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state", "cuda"),
    ("megatron.core.models.common.language_module.language_module", "LanguageModule", "weight.data.cuda()"),
]


@pytest.mark.parametrize("module,name,text", SITES, ids=[f"{m.split('.')[-1]}.{n}" for m, n, _ in SITES])
def test_bridged_site_still_exists(module, name, text):
    mod = importlib.import_module(module)
    assert hasattr(mod, name), f"megatron-core moved {module}.{name}: the CPU bridge must follow"
    obj = getattr(mod, name)
    if getattr(obj, "_aligner_cpu", False) or obj is getattr(cpu_bridge, "_clip_grad_by_total_norm_fp32", None):
        return  # already replaced by the bridge in this process
    source = inspect.getsource(obj)
    assert text in source, f"{module}.{name} no longer contains {text!r}: re-check the CPU bridge"


needs_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="the bridge is engaged only without CUDA")


@needs_cpu
def test_bridged_behaviour_on_cpu():
    assert cpu_bridge.needed()
    cpu_bridge.engage()
    from megatron.core.optimizer import clip_grads
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.tolist()[0] == [False, True, True, True]
    # the RNG tracker forks the CPU generator and restores the default stream afterwards
    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("test-stream", 123)
    before = torch.get_rng_state()
    with tracker.fork("test-stream"):
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(123)
    assert torch.equal(a, torch.rand(3))
    torch.set_rng_state(before)
    # gradient clipping on CPU tensors: scale by max_norm / (total_norm + 1e-6), by hand
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])  # norm 5
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=5.0)
    torch.testing.assert_close(p.grad, torch.tensor([3.0, 4.0]) * (1.0 / (5.0 + 1e-6)))
    # megatron.core modules see "cpu" as the current device; code outside keeps real torch
    from megatron.core.transformer import utils as mutils

    assert mutils.torch.cuda.current_device() == "cpu" and torch.cuda.current_device is not mutils.torch.cuda.current_device
