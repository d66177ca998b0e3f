"""Run megatron-core on a CPU-only torch.

megatron-core assumes CUDA in three kinds of places (measured with megatron-core 0.16.1,
torch 2.13 CPU, gloo, local layer spec):

1. ``torch.cuda.current_device()`` used as a device (rotary embedding, attention's
   global memory buffer, p2p communication in the pipeline schedules);
2. the CUDA RNG state tracker (``tensor_parallel.random``), which snapshots and restores
   CUDA generator states around model-parallel regions;
3. tensors created with ``device="cuda"`` inside megatron.core modules (pipeline
   schedules, ``transformer.utils.get_default_causal_mask``, optimizer, DDP buffers), plus
   one assert on ``torch.cuda.FloatTensor`` in ``optimizer.clip_grads``.

:func:`engage` bridges exactly these, and only when CUDA is absent:

1./3. every ``megatron.core`` module whose global ``torch`` is the torch module (those
   loaded already, and through an import hook those loaded later) sees :data:`_CPU_TORCH`: the same module, except that tensor factories map a
   CUDA device to the CPU and ``torch.cuda`` answers "cpu" for ``current_device`` and
   does nothing for ``synchronize`` / ``empty_cache``. Code outside megatron.core keeps
   the real torch.
2. the tracker is replaced by :class:`CpuRNGStatesTracker`, the same bookkeeping over the
   CPU generator.
3. ``clip_grad_by_total_norm_fp32`` is replaced by the same scaling without the CUDA type
   assert.
4. tied embeddings under pipeline parallelism: ``LanguageModule.setup_embeddings_and_output_layer``
   moves the last stage's embedding copy with ``weight.data.cuda()``; while it runs,
   ``Tensor.cuda`` leaves the tensor on the CPU.
5. the mixed-precision optimizer (bf16 / fp16 parameters, fp32 main parameters and
   gradients): ``Float16OptimizerWithFloat16Params.__init__`` sorts parameters by
   ``param.type()`` against the CUDA spellings (``torch.cuda.BFloat16Tensor``, ...) and
   raises ``TypeError`` for anything else; while it runs, ``Tensor.type()`` without
   arguments spells a CPU tensor's type as its CUDA twin, so the same three groups
   (float16 params, their fp32 copies, fp32 params) are formed from CPU tensors.
6. the mixture-of-experts layer: the router's gating linear reads
   ``moe_utils.te_general_gemm``, unbound without Transformer Engine
   (:func:`_bridge_moe_router`). The ``alltoall`` token dispatcher (expert parallelism,
   docs/moe.md) creates a side stream for its device-to-host copies of the split sizes
   (``torch.cuda.Stream``, ``torch.cuda.stream``, ``record_event``): ``torch.cuda`` as
   megatron.core sees it has one stream that never waits (:class:`_CpuStream`), since CPU
   work runs in program order; and its ``maybe_move_tensor_to_cpu`` turns only CUDA tensors
   into the NumPy split sizes ``all_to_all_single`` takes, so on the CPU it is replaced by
   the same conversion for CPU tensors (:func:`_bridge_moe_dispatcher`). gloo runs the
   collectives both dispatchers call (all-gather, reduce-scatter, all-to-all with splits)
   when every rank's part has the same size; for item 7 they do not.
7. uneven parts over a group: with TP > 1 the ``alltoall`` dispatcher gathers and
   reduce-scatters tokens over the TP group in parts of different sizes
   (``tensor_parallel.mappings._gather_along_first_dim`` / ``_reduce_scatter_along_first_dim``
   with split sizes: ``all_gather`` into tensors of different sizes and ``reduce_scatter``,
   which gloo refuses). They are rebound to the same results from collectives gloo has:
   parts padded to the largest for the gather, an all-reduce and each rank's own part for
   the reduce-scatter (:func:`_bridge_uneven_collectives`).

Nothing else in aligner knows it runs on a CPU. ``tests/parallel/test_bridge.py``
checks each bridged place, so a megatron-core upgrade that moves one fails loudly.
"""
from __future__ import annotations

import contextlib
import sys
import types

import torch
from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

_ENGAGED = False

# Factories whose ``device`` argument megatron-core sets to CUDA.
_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint",
    "empty_like", "zeros_like", "ones_like", "full_like", "as_tensor", "linspace",
)


def _to_cpu_device(device):
    """Map any CUDA spelling (str, int, torch.device) to ``"cpu"``; leave others alone."""
    if device is None:
        return None
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"
    if str(device).startswith("cuda"):
        return "cpu"
    return device


def _cpu_factory(fn):
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)  # pinning needs an accelerator
        return fn(*args, **kwargs)

    factory.__name__ = fn.__name__
    factory.__doc__ = fn.__doc__
    return factory


class _CpuEvent:
    """A CUDA event on the CPU: work is done when it is recorded, so waiting is a no-op."""

    def synchronize(self):
        return None

    def wait(self, stream=None):
        return None

    def query(self):
        return True


class _CpuStream:
    """A CUDA stream on the CPU. Work on a CPU runs in program order, so the side stream
    megatron-core's ``alltoall`` token dispatcher creates for its device-to-host copies
    (``MoEAlltoAllTokenDispatcher.cuda_dtoh_stream``) is the one stream there is: waiting
    on another stream and synchronising on a recorded event do nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        return None

    def wait_event(self, event):
        return None

    def record_event(self, event=None):
        return event if event is not None else _CpuEvent()

    def synchronize(self):
        return None

    def __eq__(self, other):
        return isinstance(other, _CpuStream)

    def __hash__(self):
        return 0


_THE_STREAM = _CpuStream()


class _CpuCuda(types.ModuleType):
    """``torch.cuda`` as megatron.core sees it on a CPU: the current device is the CPU, and
    there is one stream (:class:`_CpuStream`)."""

    Stream = _CpuStream
    Event = _CpuEvent

    def __init__(self):
        super().__init__("torch.cuda")

    @staticmethod
    def current_stream(*args, **kwargs):
        return _THE_STREAM

    @staticmethod
    def stream(stream):
        return contextlib.nullcontext()

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(*args, **kwargs):
        return None

    @staticmethod
    def empty_cache():
        return None

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CpuTorch(types.ModuleType):
    """``torch`` as megatron.core sees it on a CPU (see the module docstring)."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


_CPU_TORCH = _CpuTorch()


class CpuRNGStatesTracker(CudaRNGStatesTracker):
    """megatron-core's ``CudaRNGStatesTracker`` over the CPU generator.

    Same interface: ``reset``, ``get_states``, ``set_states``, ``add(name, seed)`` and
    ``fork(name)``, which runs its body with the named generator state and saves the state
    it leaves behind.
    """

    def __init__(self, *args, **kwargs):
        self.use_cudagraphable_rng = False
        self.is_inference_rng_tracker = False
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = states

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron-core's clip by total norm, without its ``torch.cuda.FloatTensor`` assert."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for g in grads:
            g.mul_(clip_coeff)


def _cuda_type_name(tensor: torch.Tensor) -> str:
    """``tensor.type()`` spelt as for the CUDA twin: ``torch.BFloat16Tensor`` ->
    ``torch.cuda.BFloat16Tensor`` (already-CUDA and sparse spellings are left alone)."""
    name = torch._C.TensorBase.type(tensor)
    if name.startswith("torch.") and name.count(".") == 1:
        return "torch.cuda." + name[len("torch."):]
    return name


def _bridge_float16_optimizer() -> None:
    """Item 5 of the module docstring: wrap ``Float16OptimizerWithFloat16Params.__init__``."""
    from megatron.core.optimizer import optimizer

    cls = optimizer.Float16OptimizerWithFloat16Params
    if getattr(cls.__init__, "_aligner_cpu", False):  # engage() is idempotent
        return
    original = cls.__init__

    def __init__(self, *args, **kwargs):
        real = torch.Tensor.type

        def type_(tensor, dtype=None, non_blocking=False, **kw):
            # only the no-argument query is answered differently; conversions are real
            if dtype is None and not kw:
                return _cuda_type_name(tensor)
            return real(tensor, dtype, non_blocking, **kw)

        torch.Tensor.type = type_
        try:
            original(self, *args, **kwargs)
        finally:
            torch.Tensor.type = real  # outside the constructor, type() is torch's again

    __init__._aligner_cpu = True
    __init__.__wrapped__ = original
    cls.__init__ = __init__


# Modules whose CUDA uses the bridge must cover; imported on engage so they are patched.
_MODULES = (
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.inference.contexts.static_context",
    "megatron.core.utils",
    "megatron.core.transformer.moe.token_dispatcher",
)


def needed() -> bool:
    """True when this torch has no usable CUDA device: the bridge is then required."""
    return not torch.cuda.is_available()


def patch_loaded_modules() -> int:
    """Point every loaded megatron.core module's ``torch`` at the CPU view; returns count."""
    count = 0
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(module, "torch", None) is torch:
            module.torch = _CPU_TORCH
            count += 1
    return count


class _PatchOnImport:
    """Import hook: a megatron.core module loaded after :func:`engage` gets the CPU view too."""

    def find_spec(self, name, path=None, target=None):
        if not name.startswith("megatron.core"):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                exec_module = spec.loader.exec_module

                def patched_exec(module, _exec=exec_module):
                    _exec(module)
                    if getattr(module, "torch", None) is torch:
                        module.torch = _CPU_TORCH

                spec.loader.exec_module = patched_exec
                return spec
            if spec is not None:
                return spec
        return None


_HOOK = _PatchOnImport()


def engage() -> bool:
    """Bridge megatron-core to the CPU if CUDA is absent. Idempotent; returns engaged."""
    global _ENGAGED
    if not needed():
        return False
    import importlib

    for name in _MODULES:
        importlib.import_module(name)
    patch_loaded_modules()
    if _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)

    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.tensor_parallel import random as mrandom

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    if not isinstance(mrandom._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
        mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # megatron-core snapshots the CUDA generator around checkpointed regions.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # Tied embeddings under pipeline parallelism: the last stage's copy of the word
    # embeddings is moved with ``weight.data.cuda()`` before its all-reduce
    # (LanguageModule.setup_embeddings_and_output_layer); on the CPU it stays where it is.
    from megatron.core.models.common.language_module import language_module

    cls = language_module.LanguageModule
    if not getattr(cls.setup_embeddings_and_output_layer, "_aligner_cpu", False):
        original = cls.setup_embeddings_and_output_layer

        def setup_embeddings_and_output_layer(self, *args, **kwargs):
            real = torch.Tensor.cuda
            torch.Tensor.cuda = lambda t, *a, **k: t
            try:
                return original(self, *args, **kwargs)
            finally:
                torch.Tensor.cuda = real

        setup_embeddings_and_output_layer._aligner_cpu = True
        cls.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer
    _bridge_float16_optimizer()
    _bridge_moe_router()
    _bridge_moe_dispatcher()
    _bridge_uneven_collectives()
    _ENGAGED = True
    return True


def _maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
    """``moe_utils.maybe_move_tensor_to_cpu`` for tensors already on the CPU: the same
    result a CUDA tensor gets (a NumPy array when ``as_numpy``), which is what the
    ``alltoall`` dispatcher's split sizes must be for ``all_to_all_single``."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.cpu().numpy()
    return tensor


def _bridge_moe_dispatcher() -> None:
    """The ``alltoall`` token dispatcher on a CPU (item 6 of the module docstring): its
    device-to-host copies of the split sizes go through ``maybe_move_tensor_to_cpu``,
    which converts only CUDA tensors to the NumPy arrays ``all_to_all_single`` is given;
    on a CPU they stayed tensors, which gloo's binding refuses. Its side stream is
    :class:`_CpuStream` (``torch.cuda`` as megatron.core sees it)."""
    from megatron.core.transformer.moe import token_dispatcher  # loaded on engage only, as _MODULES

    token_dispatcher.maybe_move_tensor_to_cpu = _maybe_move_tensor_to_cpu


def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
    """megatron-core's ``mappings._gather_along_first_dim`` where the ranks' parts differ in
    size (``output_split_sizes``, the alltoall dispatcher's gather of tokens over TP):
    gloo's ``all_gather`` takes only equal sizes, so each part is padded to the largest,
    gathered, and the padding cut off. Equal parts take megatron-core's own path."""
    if output_split_sizes is None or group.size() == 1:
        return _MEGATRON_GATHER(input_, group, output_split_sizes, use_global_buffer)
    sizes = [int(n) for n in output_split_sizes]
    longest = max(sizes)
    padded = input_.new_zeros((longest,) + tuple(input_.shape[1:]))
    padded[: input_.shape[0]] = input_
    parts = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)


def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
    """megatron-core's ``mappings._reduce_scatter_along_first_dim`` where the ranks' parts
    differ in size (``input_split_sizes``, the alltoall dispatcher's combine over TP): gloo
    has no reduce-scatter of uneven parts, so the whole tensor is summed over the group
    (``all_reduce``) and each rank keeps its part (the same sums). Equal parts take
    megatron-core's own path."""
    if input_split_sizes is None or group.size() == 1:
        return _MEGATRON_REDUCE_SCATTER(input_, group, input_split_sizes, use_global_buffer)
    sizes = [int(n) for n in input_split_sizes]
    total = input_.clone().contiguous()
    torch.distributed.all_reduce(total, group=group)
    start = sum(sizes[: group.rank()])
    return total[start: start + sizes[group.rank()]].clone()


_MEGATRON_GATHER = None
_MEGATRON_REDUCE_SCATTER = None


def _bridge_uneven_collectives() -> None:
    """Item 7 of the module docstring: rebind the two uneven-split helpers of
    ``tensor_parallel.mappings`` (every autograd function of that module calls them by their
    module-level names)."""
    global _MEGATRON_GATHER, _MEGATRON_REDUCE_SCATTER
    from megatron.core.tensor_parallel import mappings  # loaded on engage only, as _MODULES

    if getattr(mappings._gather_along_first_dim, "_aligner_cpu", False):  # engage() is idempotent
        return
    _MEGATRON_GATHER = mappings._gather_along_first_dim
    _MEGATRON_REDUCE_SCATTER = mappings._reduce_scatter_along_first_dim
    _gather_along_first_dim._aligner_cpu = True
    _reduce_scatter_along_first_dim._aligner_cpu = True
    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim


def _bridge_moe_router() -> None:
    """The MoE router's gating linear (``moe_utils.RouterGatingLinearFunction``) tests
    ``te_general_gemm is not None``, a name ``moe_utils`` binds only when Transformer
    Engine imports; without it the router raises ``NameError``. Bound to None here, the
    router takes its torch matmul."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def engaged() -> bool:
    return _ENGAGED
