"""The CPU bridge fails loudly when a megatron-core upgrade moves a place it bridges.

Each site named in ``aligner/parallel/cpu_bridge.py``'s docstring is looked up by name in
the installed megatron-core source (read from the file, so a site the bridge has already
replaced in this process is still checked), then the bridged behaviour is checked on this
CPU against hand-computed values. On a GPU machine the bridge stays disengaged; that
decision is checked there, and the CPU behaviour checks are skipped.
"""
import ast
import importlib
import inspect
import math
import re
import sys

import pytest
import torch

from aligner.parallel import cpu_bridge

CURRENT_DEVICE = r"torch\.cuda\.current_device\(\)"
CUDA_DEVICE = r"""device=["']cuda["']"""

SITES = [
    # (module, object as Class.member or function, regex the bridged code path contains)
    # 1. torch.cuda.current_device() used as a device
    ("megatron.core.models.common.embeddings.rotary_pos_embedding", "RotaryEmbedding.__init__", CURRENT_DEVICE),
    ("megatron.core.utils", "GlobalMemoryBuffer.get_tensor", CURRENT_DEVICE),
    ("megatron.core.transformer.attention", "Attention._allocate_memory", CURRENT_DEVICE),
    ("megatron.core.pipeline_parallel.p2p_communication", "P2PCommunicator._communicate_shapes", CURRENT_DEVICE),
    ("megatron.core.pipeline_parallel.p2p_communication", "P2PCommunicator._communicate", CURRENT_DEVICE),
    ("megatron.core.tensor_parallel.layers", "ColumnParallelLinear.__init__", CURRENT_DEVICE),
    ("megatron.core.distributed.param_and_grad_buffer", "_ParamAndGradBuffer.__init__", CURRENT_DEVICE),
    # 2. the CUDA RNG state tracker and the generator snapshots it replaces
    ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker.fork", r"_set_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker.add", r"torch\.cuda\.manual_seed"),
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", r"torch\.cuda"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state", r"torch\.cuda"),
    ("megatron.core.tensor_parallel.random", "get_cuda_rng_tracker", r"return _CUDA_RNG_STATE_TRACKER\b"),
    ("megatron.core.tensor_parallel.random", "initialize_rng_tracker", r"_CUDA_RNG_STATE_TRACKER_INITIALIZED"),
    ("megatron.core.tensor_parallel.random", "_get_all_rng_states", r"_get_cuda_rng_state\("),
    ("megatron.core.tensor_parallel.random", "_set_all_rng_states", r"_set_cuda_rng_state\("),
    ("megatron.core.tensor_parallel.random", "CheckpointFunction.forward", r"_get_all_rng_states\(\)"),
    ("megatron.core.tensor_parallel.random", "CheckpointFunction.backward", r"_set_all_rng_states\("),
    # 3. device="cuda" tensors inside megatron.core, and the clip_grads assert
    ("megatron.core.transformer.utils", "get_default_causal_mask", CUDA_DEVICE),
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_no_pipelining", CUDA_DEVICE),
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_pipelining_without_interleaving", CUDA_DEVICE),
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_pipelining_with_interleaving", CUDA_DEVICE),
    ("megatron.core.optimizer.optimizer", "FP32Optimizer.__init__", CUDA_DEVICE),
    ("megatron.core.distributed.param_and_grad_buffer", "_ParamAndGradBuffer.__init__", CUDA_DEVICE),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32",
     r"""assert param\.grad\.type\(\) == ['"]torch\.cuda\.FloatTensor['"]"""),
    # the optimizer calls the clip function through its own module-level name, which engage() rebinds
    ("megatron.core.optimizer.optimizer", "MegatronOptimizer.clip_grad_norm", r"clip_grad_by_total_norm_fp32\("),
    # 4. tied embeddings under pipeline parallelism
    ("megatron.core.models.common.language_module.language_module",
     "LanguageModule.setup_embeddings_and_output_layer", r"weight\.data\.cuda\(\)"),
    # 5. the mixed-precision optimizer sorts parameters by their CUDA type names
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__",
     r"""param\.type\(\) in \[['"]torch\.cuda\.HalfTensor['"], ['"]torch\.cuda\.BFloat16Tensor['"]\]"""),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__",
     r"""param\.type\(\) == ['"]torch\.cuda\.FloatTensor['"]"""),
    ("megatron.core.transformer.moe.moe_utils", "RouterGatingLinearFunction.forward",
     r"te_general_gemm is not None"),
    # 6. the alltoall token dispatcher: its side stream, and the split sizes it turns into
    # NumPy arrays only for CUDA tensors before all_to_all_single
    ("megatron.core.transformer.moe.token_dispatcher", "MoEAlltoAllTokenDispatcher.__init__",
     r"torch\.cuda\.Stream\(\)"),
    ("megatron.core.transformer.moe.token_dispatcher", "MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize",
     r"torch\.cuda\.stream\(self\.cuda_dtoh_stream\)[\s\S]*maybe_move_tensor_to_cpu\([\s\S]*as_numpy=True"),
    ("megatron.core.transformer.moe.moe_utils", "maybe_move_tensor_to_cpu", r"tensor\.is_cuda"),
    # 7. uneven parts over a group: all_gather into tensors of different sizes, reduce_scatter
    ("megatron.core.tensor_parallel.mappings", "_gather_along_first_dim",
     r"torch\.distributed\.all_gather\(output_tensor_list, input_, group=group\)"),
    ("megatron.core.tensor_parallel.mappings", "_reduce_scatter_along_first_dim",
     r"torch\.distributed\.reduce_scatter\(output, input_tensor_list, group=group\)"),
    ("megatron.core.tensor_parallel.mappings", "_GatherFromSequenceParallelRegion.forward",
     r"_gather_along_first_dim\("),
    ("megatron.core.tensor_parallel.mappings", "_ReduceScatterToSequenceParallelRegion.forward",
     r"_reduce_scatter_along_first_dim\("),
]


def _module_source(module: str) -> tuple:
    mod = importlib.import_module(module)
    source = inspect.getsource(mod)  # the file: unaffected by the bridge's rebinding
    return source, ast.parse(source)


def _definition(tree: ast.Module, dotted: str):
    """The function / class node for ``name`` or ``Class.member`` at module level, or None."""
    nodes = tree.body
    found = None
    for part in dotted.split("."):
        found = next((n for n in nodes if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part), None)
        if found is None:
            return None
        nodes = found.body
    return found


@pytest.mark.parametrize("module,name,pattern", SITES, ids=[f"{m.split('.')[-1]}:{n}" for m, n, _ in SITES])
def test_bridged_site_still_exists(module, name, pattern):
    source, tree = _module_source(module)
    node = _definition(tree, name)
    assert node is not None, f"megatron-core no longer defines {module}.{name}: the CPU bridge must follow"
    segment = ast.get_source_segment(source, node)
    assert re.search(pattern, segment), (
        f"{module}.{name} no longer contains {pattern!r}: re-check the CPU bridge (aligner/parallel/cpu_bridge.py)")


def test_module_level_names_the_bridge_rebinds():
    source, tree = _module_source("megatron.core.tensor_parallel.random")
    assigned = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    assert {"_CUDA_RNG_STATE_TRACKER", "_CUDA_RNG_STATE_TRACKER_INITIALIZED"} <= assigned
    source, _ = _module_source("megatron.core.optimizer.optimizer")
    assert re.search(r"from \.clip_grads import [^\n]*\bclip_grad_by_total_norm_fp32\b", source)


# modules whose bridged sites reach torch through their ``torch`` global (the tied-embedding
# site in language_module is bridged through Tensor.cuda instead, the MoE router's and the
# uneven collectives' by binding names)
GLOBAL_SITES = sorted({m for m, _, _ in SITES} - {"megatron.core.models.common.language_module.language_module",
                                                  "megatron.core.transformer.moe.moe_utils",
                                                  "megatron.core.tensor_parallel.mappings"})


@pytest.mark.parametrize("module", GLOBAL_SITES)
def test_site_modules_are_patched_through_their_torch_global(module):
    assert module in cpu_bridge._MODULES, f"{module} has bridged sites but engage() does not load it"
    mod = importlib.import_module(module)
    assert "torch" in vars(mod), f"{module} no longer imports torch as a module global: the bridge cannot reach it"


def test_every_module_engage_loads_exists():
    for module in cpu_bridge._MODULES:
        importlib.import_module(module)  # ModuleNotFoundError names a module megatron-core moved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: checks the bridge stays off with CUDA")
def test_engage_is_a_no_op_with_cuda():
    assert cpu_bridge.needed() is False
    assert cpu_bridge.engage() is False and cpu_bridge.engaged() is False
    from megatron.core.transformer import utils as mutils

    assert mutils.torch is torch
    assert get_tracker_class() is not cpu_bridge.CpuRNGStatesTracker


def get_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    return type(mrandom.get_cuda_rng_tracker())


needs_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="the bridge is engaged only without CUDA")


@pytest.fixture(scope="module")
def engaged():
    assert cpu_bridge.needed() is True
    assert cpu_bridge.engage() is True
    assert cpu_bridge.engage() is True and cpu_bridge.engaged()  # idempotent
    assert cpu_bridge._HOOK in sys.meta_path and sys.meta_path.count(cpu_bridge._HOOK) == 1


@needs_cpu
def test_megatron_core_sees_the_cpu_and_the_rest_keeps_torch(engaged):
    from megatron.core.transformer import utils as mutils

    cpu_torch = mutils.torch
    for module in GLOBAL_SITES:
        assert sys.modules[module].torch is cpu_bridge._CPU_TORCH, module
    assert torch.cuda.current_device is not cpu_torch.cuda.current_device
    assert cpu_torch.cuda.current_device() == "cpu"
    for made in (cpu_torch.zeros(2, device="cuda"), cpu_torch.ones(1, device="cuda:1"),
                 cpu_torch.empty(3, device=torch.device("cuda", 0)), cpu_torch.tensor([1, 2], device=0),
                 cpu_torch.arange(4, device="cuda"), cpu_torch.tensor([0, 5], device="cuda", pin_memory=True)):
        assert made.device.type == "cpu"
    assert cpu_torch.full((2,), 7.0, device="cuda").tolist() == [7.0, 7.0]
    with pytest.raises((RuntimeError, AssertionError), match="CUDA"):
        torch.zeros(1, device="cuda")  # code outside megatron.core still sees the real CPU-only torch
    assert torch.Tensor.cuda is torch._C.TensorBase.cuda  # replaced only while tied embeddings are set up
    from megatron.core.models.common.language_module.language_module import LanguageModule

    assert LanguageModule.setup_embeddings_and_output_layer._aligner_cpu is True


@needs_cpu
def test_import_hook_patches_modules_loaded_later(engaged):
    # load a fresh copy of a megatron.core module through the hook (not registered in sys.modules)
    import megatron.core.transformer as parent

    spec = cpu_bridge._HOOK.find_spec("megatron.core.transformer.utils", parent.__path__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert fresh is not sys.modules["megatron.core.transformer.utils"]
    assert fresh.torch is cpu_bridge._CPU_TORCH
    assert cpu_bridge._HOOK.find_spec("json", None) is None  # other packages are left to the normal finders


@needs_cpu
def test_causal_mask_rotary_and_buffers_on_cpu(engaged):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.utils import get_default_causal_mask
    from megatron.core.utils import GlobalMemoryBuffer

    mask = get_default_causal_mask(4)
    expected = [[j > i for j in range(4)] for i in range(4)]  # True above the diagonal: masked
    assert mask.device.type == "cpu" and mask.tolist() == expected

    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, rotary_base=10000)
    emb = rope(5)  # [s, 1, 1, d]: angles pos * base^(-2i/d), the half repeated
    assert emb.device.type == "cpu" and tuple(emb.shape) == (5, 1, 1, 8)
    for pos in range(5):
        angles = [pos * 10000 ** (-2 * i / 8) for i in range(4)]
        torch.testing.assert_close(emb[pos, 0, 0], torch.tensor(angles + angles), rtol=1e-6, atol=1e-6)

    buffer = GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "scratch")
    assert buffer.device.type == "cpu" and tuple(buffer.shape) == (2, 3)


@needs_cpu
def test_rng_tracker_forks_the_cpu_generator(engaged):
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    assert isinstance(tracker, cpu_bridge.CpuRNGStatesTracker)
    saved = tracker.get_states()
    try:
        tracker.reset()
        tracker.add("test-stream", 123)
        with pytest.raises(Exception, match="seed 123 already exists"):
            tracker.add("other", 123)
        before = torch.get_rng_state()
        with tracker.fork("test-stream"):
            first = torch.rand(3)
        assert torch.equal(torch.get_rng_state(), before)  # the default stream is untouched
        with tracker.fork("test-stream"):
            second = torch.rand(3)  # the named stream continues where it stopped
        reference = torch.Generator().manual_seed(123)
        assert torch.equal(first, torch.rand(3, generator=reference))
        assert torch.equal(second, torch.rand(3, generator=reference))
        with pytest.raises(Exception, match="rng state missing is not added"):
            with tracker.fork("missing"):
                pass
        # the generator snapshots megatron-core takes are the CPU generator's
        state = mrandom._get_cuda_rng_state()
        a = torch.rand(2)
        mrandom._set_cuda_rng_state(state)
        assert torch.equal(a, torch.rand(2))
    finally:
        tracker.reset()
        tracker.set_states(saved)


@needs_cpu
def test_activation_checkpoint_replays_the_dropout_mask(engaged):
    """megatron-core's checkpoint recomputes the forward in backward from the RNG snapshot:
    the gradient of dropout(x) is the forward's own mask times 1 / (1 - p)."""
    from megatron.core.tensor_parallel import random as mrandom

    torch.manual_seed(7)
    x = torch.ones(64, requires_grad=True)
    y = mrandom.checkpoint(lambda t: torch.nn.functional.dropout(t, p=0.5, training=True), False, x)
    torch.rand(10)  # move the generator on between forward and backward
    y.sum().backward()
    kept = (y.detach() != 0).float()
    assert 0 < kept.sum() < 64
    torch.testing.assert_close(x.grad, kept * 2.0)


@needs_cpu
def test_moe_router_gating_is_a_torch_matmul(engaged):
    """The router's gating linear, x W^T (+ b), without Transformer Engine: values and gradients."""
    from megatron.core.transformer.moe import moe_utils

    x = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(3, 4, requires_grad=True)
    out = moe_utils.router_gating_linear(x, w, None, torch.float32)
    torch.testing.assert_close(out, x.detach() @ w.detach().T)
    out.sum().backward()
    torch.testing.assert_close(x.grad, w.detach().sum(0).expand(5, 4))
    torch.testing.assert_close(w.grad, x.detach().sum(0).expand(3, 4))


@needs_cpu
def test_alltoall_dispatcher_stream_and_split_sizes_on_cpu(engaged):
    """The alltoall dispatcher's side stream is the CPU's one stream, and its split sizes
    become the NumPy arrays a CUDA tensor would give (all_to_all_single's argument type)."""
    import numpy as np
    from megatron.core.transformer.moe import token_dispatcher

    stream = token_dispatcher.torch.cuda.Stream()
    assert token_dispatcher.torch.cuda.current_stream() == stream
    with token_dispatcher.torch.cuda.stream(stream):
        stream.wait_stream(token_dispatcher.torch.cuda.current_stream())
    stream.record_event().synchronize()
    splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3, 5]), as_numpy=True)
    assert isinstance(splits, np.ndarray) and splits.tolist() == [3, 5]
    counts = torch.tensor([1, 2])
    assert token_dispatcher.maybe_move_tensor_to_cpu(counts) is counts


def _uneven_collectives():
    """On each of two gloo ranks: megatron-core's gather and reduce-scatter of parts of
    different sizes (rank 0: 2 rows, rank 1: 3 rows of width 2)."""
    from megatron.core.tensor_parallel import mappings

    from aligner.parallel import ParallelConfig, initialize

    initialize(ParallelConfig())
    rank = torch.distributed.get_rank()
    group = torch.distributed.group.WORLD
    mine = torch.full((2 + rank, 2), float(rank + 1))
    gathered = mappings._gather_along_first_dim(mine, group, output_split_sizes=[2, 3])
    whole = torch.arange(10.0).reshape(5, 2) * (rank + 1)  # both ranks' [5, 2] inputs
    scattered = mappings._reduce_scatter_along_first_dim(whole, group, input_split_sizes=[2, 3])
    return gathered, scattered


@needs_cpu
def test_uneven_gather_and_reduce_scatter_over_gloo():
    from aligner.parallel.spawn import spawn_local

    out = spawn_local(_uneven_collectives, 2, timeout=120)
    want_gather = torch.tensor([[1.0, 1.0]] * 2 + [[2.0, 2.0]] * 3)
    summed = torch.arange(10.0).reshape(5, 2) * 3  # rank 0's input + rank 1's (x1 + x2)
    for rank, (gathered, scattered) in enumerate(out):
        torch.testing.assert_close(gathered, want_gather, rtol=0, atol=0)
        torch.testing.assert_close(scattered, summed[:2] if rank == 0 else summed[2:], rtol=0, atol=0)


def test_clip_grad_by_total_norm_on_cpu(engaged):
    from megatron.core.optimizer import clip_grads, optimizer

    assert clip_grads.clip_grad_by_total_norm_fp32 is optimizer.clip_grad_by_total_norm_fp32
    p1, p2, p3 = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    p1.grad = torch.tensor([3.0, 4.0])
    p2.grad = torch.tensor([0.0, 12.0])  # total norm sqrt(9 + 16 + 144) = 13; p3 has no grad
    clip_grads.clip_grad_by_total_norm_fp32([p1, p2, p3], max_norm=1.0, total_norm=13.0)
    coeff = 1.0 / (13.0 + 1e-6)
    torch.testing.assert_close(p1.grad, torch.tensor([3.0 * coeff, 4.0 * coeff]))
    torch.testing.assert_close(p2.grad, torch.tensor([0.0, 12.0 * coeff]))
    assert p3.grad is None
    assert math.isclose(torch.cat([p1.grad, p2.grad]).norm().item(), 13.0 * coeff, rel_tol=1e-6)
    # below the threshold the gradients are left as they are
    p1.grad = torch.tensor([3.0, 4.0])
    clip_grads.clip_grad_by_total_norm_fp32(p1, max_norm=10.0, total_norm=5.0)
    assert p1.grad.tolist() == [3.0, 4.0]


@needs_cpu
def test_mixed_precision_optimizer_keeps_fp32_main_params_on_cpu(engaged):
    """bf16 parameters get fp32 main copies; fp32 parameters are stepped as they are. SGD
    (lr 1e-3, gradient 1) three times from 1.0: the fp32 main weight reaches 0.997 while each
    single step would be lost to bf16 rounding (1 - 1e-3 rounds back to 1.0 in bf16); the
    bf16 parameter is the rounded main weight, 0.99609375 (bf16 spacing below 1 is 2^-8)."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    assert Float16OptimizerWithFloat16Params.__init__._aligner_cpu is True
    weight = torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
    bias = torch.nn.Parameter(torch.ones(2))
    config = OptimizerConfig(optimizer="sgd", lr=1e-3, bf16=True, params_dtype=torch.bfloat16, clip_grad=0.0)
    opt = Float16OptimizerWithFloat16Params(torch.optim.SGD([weight, bias], lr=1e-3), config, None, None)
    assert torch.Tensor.type is torch._C.TensorBase.type  # type() is torch's again after construction
    assert weight.type() == "torch.BFloat16Tensor"
    assert opt.float16_groups == [[weight]] and opt.fp32_from_fp32_groups == [[bias]]
    (main,) = opt.fp32_from_float16_groups[0]
    assert main.dtype == torch.float32 and main is weight.main_param and main.tolist() == [1.0, 1.0]
    assert opt.optimizer.param_groups[0]["params"] == [main, bias]
    assert torch.tensor(1 - 1e-3, dtype=torch.bfloat16).item() == 1.0
    for _ in range(3):
        weight.main_grad = torch.ones(2)  # DDP's fp32 gradient buffer
        bias.main_grad = torch.ones(2)
        ok, _, _ = opt.step()
        assert ok
    torch.testing.assert_close(main, torch.full((2,), 0.997), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias.detach(), torch.full((2,), 0.997), atol=1e-6, rtol=0)
    assert weight.dtype == torch.bfloat16 and weight.tolist() == [0.99609375, 0.99609375]
    # conversions through type() still convert while the bridge is engaged
    assert weight.type(torch.float32).dtype == torch.float32
