"""Process groups, device and seeds: the one parallel-state core every algorithm shares.

A job is a set of ranks started by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``MASTER_ADDR``/``MASTER_PORT``), by Slurm ``srun`` (``SLURM_PROCID``/``SLURM_NTASKS``/
``SLURM_LOCALID``/``SLURM_NODELIST``) or a plain ``python`` (world size 1). On GPUs the
backend is NCCL, one device per local rank; without CUDA it is gloo and megatron-core is
bridged to the CPU (:mod:`aligner.parallel.cpu_bridge`).

Layout: ``world = tp * pp * cp * dp`` (expert parallelism divides ``dp * cp``); the layout
is validated before any process group exists.
"""
from __future__ import annotations

import datetime
import os
import random
import re
import socket
import sys
from dataclasses import dataclass
from typing import Optional

import torch


class LayoutError(ValueError):
    """A parallel layout that cannot work; the message names the config keys and numbers."""


@dataclass
class ParallelConfig:
    """Parallel layout (config group ``parallel``).

    tp: tensor-parallel size; pp: pipeline-parallel size; vpp: virtual pipeline stages per
    rank (interleaved 1F1B) or None; cp: context-parallel size; ep: expert-parallel size;
    dp is what the world size leaves (``world / (tp * pp * cp)``). ``backend``: ``auto``
    (NCCL on GPU, gloo on CPU), ``nccl`` or ``gloo``. ``seed`` drives megatron-core's
    data-parallel / tensor-parallel RNG streams.
    """

    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    cp: int = 1
    ep: int = 1
    backend: str = "auto"
    seed: int = 1234
    timeout_minutes: int = 30


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def validate_layout(
    parallel: ParallelConfig,
    world_size: int,
    *,
    num_layers: Optional[int] = None,
    num_attention_heads: Optional[int] = None,
    num_query_groups: Optional[int] = None,
    vocab_size: Optional[int] = None,
    num_experts: Optional[int] = None,
    layer_spec: Optional[str] = None,
    sequence_parallel: Optional[bool] = None,
) -> int:
    """Check a layout before anything is initialised; returns the data-parallel size.

    ``layer_spec``: the layer spec the model will be built with (``te``, ``fused`` or
    ``local``, as resolved by ``aligner.models.layer_spec``), when known; context
    parallelism needs TE's attention. ``sequence_parallel``: whether training splits the
    sequence over TP, when known (megatron-core's MoE layer trains at TP > 1 only with it). Raises :class:`LayoutError` naming the config keys
    and their values.
    """
    for key in ("tp", "pp", "cp", "ep"):
        value = getattr(parallel, key)
        if not isinstance(value, int) or value < 1:
            raise LayoutError(f"parallel.{key} must be a positive integer, got {value!r}")
    if parallel.vpp is not None and (not isinstance(parallel.vpp, int) or parallel.vpp < 1):
        raise LayoutError(f"parallel.vpp must be a positive integer or null, got {parallel.vpp!r}")
    if parallel.vpp is not None and parallel.pp == 1:
        raise LayoutError(
            f"parallel.vpp = {parallel.vpp} (virtual pipeline stages) needs pipeline parallelism, but"
            f" parallel.pp = 1; set parallel.vpp = null or parallel.pp > 1"
        )
    if parallel.backend not in ("auto", "nccl", "gloo"):
        raise LayoutError(f"parallel.backend must be one of auto, nccl, gloo; got {parallel.backend!r}")
    if parallel.cp > 1 and layer_spec is not None and layer_spec != "te":
        raise LayoutError(
            f"parallel.cp = {parallel.cp}: context parallelism needs Transformer Engine's attention, and this"
            f" install builds the {layer_spec!r} layer spec, which has no context-parallel attention; set parallel.cp = 1"
        )
    model_parallel = parallel.tp * parallel.pp * parallel.cp
    if world_size % model_parallel != 0:
        raise LayoutError(
            f"world size {world_size} is not divisible by parallel.tp * parallel.pp * parallel.cp"
            f" = {parallel.tp} * {parallel.pp} * {parallel.cp} = {model_parallel}"
        )
    dp = world_size // model_parallel
    if (dp * parallel.cp) % parallel.ep != 0:
        raise LayoutError(
            f"parallel.ep = {parallel.ep} must divide data-parallel x context-parallel size"
            f" {dp} * {parallel.cp} = {dp * parallel.cp}"
        )
    if num_attention_heads is not None and num_attention_heads % parallel.tp != 0:
        raise LayoutError(
            f"model.num_attention_heads = {num_attention_heads} is not divisible by"
            f" parallel.tp = {parallel.tp}"
        )
    if num_query_groups is not None and num_query_groups % parallel.tp != 0:
        raise LayoutError(
            f"model.num_query_groups = {num_query_groups} (key/value heads) is not divisible by"
            f" parallel.tp = {parallel.tp}"
        )
    if num_layers is not None:
        stages = parallel.pp * (parallel.vpp or 1)
        if stages > num_layers:
            raise LayoutError(
                f"parallel.pp * parallel.vpp = {stages} pipeline stages exceed"
                f" model.num_layers = {num_layers}"
            )
        if num_layers % stages != 0:
            raise LayoutError(
                f"model.num_layers = {num_layers} is not divisible by parallel.pp"
                f"{' * parallel.vpp' if parallel.vpp else ''} = {stages}"
            )
    if num_experts is not None and num_experts % parallel.ep != 0:
        raise LayoutError(
            f"model.num_experts = {num_experts} is not divisible by parallel.ep = {parallel.ep}"
        )
    if num_experts is not None and parallel.tp > 1 and sequence_parallel is False:
        raise LayoutError(
            f"model.num_experts = {num_experts} at parallel.tp = {parallel.tp} needs"
            " parallel.sequence_parallel = true (megatron-core's MoE layer trains at TP > 1 only with it)"
        )
    if vocab_size is not None and vocab_size < parallel.tp:
        raise LayoutError(f"model.vocab_size = {vocab_size} is smaller than parallel.tp = {parallel.tp}")
    return dp


def _first_slurm_host(nodelist: str, key: Optional[str] = "SLURM_NODELIST") -> str:
    """First host of a Slurm node list: ``node[003-005,007],gpu1`` -> ``node003``,
    ``rack[1-2]-n[01-04]-ib`` -> ``rack1-n01-ib`` (each bracket expands to its first value)."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    if first.count("[") != first.count("]"):
        raise ValueError(f"environment variable {key} = {nodelist!r} is not a Slurm node list: unbalanced brackets")
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], first)


def _env_int(env, key: str, default: Optional[int] = None) -> int:
    value = env.get(key)
    if value is None or value == "":
        if default is None:
            raise ValueError(f"environment variable {key} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key} = {value!r} is not an integer") from None


_EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
_LOWEST_PORT = 10000  # below: the well-known and registered services' ports


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a rendezvous server that binds it moments later.

    Drawn below the kernel's ephemeral range (``ip_local_port_range``): a port the kernel
    picks (``bind(0)``) lies in that range, where it can be handed to another process's
    outgoing connection (gloo's pairs in a neighbouring job) before the server binds it;
    below the range nothing takes it unasked. The kernel's pick where the range cannot be
    read or leaves no room."""
    try:
        with open(_EPHEMERAL_RANGE) as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    draw = random.SystemRandom()
    for _ in range(64 if low > _LOWEST_PORT + 1000 else 0):
        port = draw.randrange(_LOWEST_PORT, low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_dist_env(environ=None) -> DistEnv:
    """Where this process sits in the job, from torchrun or Slurm variables (torchrun first).

    torchrun: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``.
    Slurm (one task per GPU under ``srun``): ``SLURM_PROCID``, ``SLURM_NTASKS``,
    ``SLURM_LOCALID``; the rendezvous host is ``MASTER_ADDR`` if set, else the first host of
    ``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST`` / ``SLURM_NODELIST``; port
    ``MASTER_PORT`` or 29500. Neither: a single process. Raises ``ValueError`` naming the
    variable for a non-integer value or a rank outside the world.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        denv = DistEnv(
            rank=_env_int(env, "RANK"),
            world_size=_env_int(env, "WORLD_SIZE"),
            local_rank=_env_int(env, "LOCAL_RANK", 0),
            master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
            master_port=_env_int(env, "MASTER_PORT", 29500),
            launcher="torchrun",
        )
        names = ("RANK", "WORLD_SIZE")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        key = next((k for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(k)), None)
        nodelist = env[key] if key else "127.0.0.1"
        denv = DistEnv(
            rank=_env_int(env, "SLURM_PROCID"),
            world_size=_env_int(env, "SLURM_NTASKS"),
            local_rank=_env_int(env, "SLURM_LOCALID", 0),
            master_addr=env.get("MASTER_ADDR") or _first_slurm_host(nodelist, key),
            master_port=_env_int(env, "MASTER_PORT", 29500),
            launcher="slurm",
        )
        names = ("SLURM_PROCID", "SLURM_NTASKS")
    else:
        return DistEnv(0, 1, 0, "127.0.0.1", _env_int(env, "MASTER_PORT", 0) or free_port(), "single")
    if denv.world_size < 1 or not 0 <= denv.rank < denv.world_size:
        raise ValueError(
            f"{names[0]} = {denv.rank} is not a rank of a world of {names[1]} = {denv.world_size}"
        )
    return denv


_DEVICE: Optional[torch.device] = None
# How many times this process has torn its process groups down (destroy). torch keeps one
# rendezvous store per port for the whole process and restarts its group names at 0 after
# a teardown, so the groups of a second initialize would read the first ones' addresses
# from the store (and wait on ranks that no longer listen there): each generation of
# groups keeps its keys under its own prefix. Every rank initializes and destroys in step.
_GENERATION = 0


def get_device() -> torch.device:
    """The device this rank computes on (``cuda:<local_rank>`` or ``cpu``)."""
    if _DEVICE is not None:
        return _DEVICE
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def initialize(parallel: Optional[ParallelConfig] = None, **model_dims) -> DistEnv:
    """Start torch.distributed and megatron-core's parallel state for ``parallel``.

    ``model_dims`` (num_layers, num_attention_heads, num_query_groups, vocab_size,
    num_experts, layer_spec) are checked against the layout before any process group is created.
    Idempotent for the same layout within a process.
    """
    global _DEVICE
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel = parallel or ParallelConfig()
    denv = read_dist_env()
    validate_layout(parallel, denv.world_size, **model_dims)

    use_cuda = torch.cuda.is_available()
    backend = parallel.backend if parallel.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise LayoutError("parallel.backend = nccl needs CUDA, and this torch sees no GPU")
    if use_cuda:
        torch.cuda.set_device(denv.local_rank % torch.cuda.device_count())
        _DEVICE = torch.device("cuda", torch.cuda.current_device())
    else:
        from aligner.parallel import cpu_bridge  # loaded only where CUDA is absent: the bridge is for CPUs alone

        cpu_bridge.engage()
        _DEVICE = torch.device("cpu")

    if not torch.distributed.is_initialized():
        timeout = datetime.timedelta(minutes=parallel.timeout_minutes)
        store, _, _ = next(torch.distributed.rendezvous(f"tcp://{denv.master_addr}:{denv.master_port}",
                                                        rank=denv.rank, world_size=denv.world_size, timeout=timeout))
        store.set_timeout(timeout)
        torch.distributed.init_process_group(
            backend=backend,
            store=torch.distributed.PrefixStore(f"aligner_generation_{_GENERATION}", store),
            rank=denv.rank,
            world_size=denv.world_size,
            timeout=timeout,
        )
    if parallel_state.model_parallel_is_initialized():
        current = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_expert_model_parallel_world_size(),
        )
        if current != (parallel.tp, parallel.pp, parallel.ep):
            raise LayoutError(
                f"megatron-core is already initialised with tp={current[0]}, pp={current[1]}, ep={current[2]};"
                f" call aligner.parallel.destroy() before asking for tp={parallel.tp}, pp={parallel.pp},"
                f" ep={parallel.ep}"
            )
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tp,
            pipeline_model_parallel_size=parallel.pp,
            virtual_pipeline_model_parallel_size=parallel.vpp,
            context_parallel_size=parallel.cp,
            expert_model_parallel_size=parallel.ep,
            distributed_timeout_minutes=parallel.timeout_minutes,
            create_gloo_process_groups=True,
        )
    if not use_cuda:
        from aligner.parallel import cpu_bridge  # CPUs alone (see above)

        cpu_bridge.patch_loaded_modules()
    model_parallel_cuda_manual_seed(parallel.seed)
    return denv


def set_seed(seed: int) -> None:
    """Seed Python, NumPy, torch and megatron-core's model-parallel RNG streams."""
    import random

    import numpy as np
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if parallel_state.model_parallel_is_initialized():
        model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    """Tear down megatron-core's parallel state and the default process group; a later
    :func:`initialize` starts fresh ones (any layout)."""
    global _DEVICE, _GENERATION
    parallel_state = sys.modules.get("megatron.core.parallel_state")  # not loaded: nothing to tear down

    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        _GENERATION += 1
    _DEVICE = None


def is_initialized() -> bool:
    from megatron.core import parallel_state

    return torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized()


# A batch's sequence length is padded to a multiple of 8 · TP: tensor (and sequence)
# parallelism splits the sequence over the TP ranks, and a multiple of 8 keeps the matrix
# shapes aligned for tensor cores.
SEQUENCE_MULTIPLE = 8


def padded_length(length: int) -> int:
    """``length`` rounded up to a multiple of 8 · (the TP size) (at least one multiple)."""
    from megatron.core import parallel_state as ps

    multiple = SEQUENCE_MULTIPLE * ps.get_tensor_model_parallel_world_size()
    return max(1, -(-int(length) // multiple)) * multiple


def ranks() -> dict:
    """This rank's coordinates: global rank and tp / pp / dp ranks and sizes."""
    from megatron.core import parallel_state as ps

    return {
        "rank": torch.distributed.get_rank(),
        "world_size": torch.distributed.get_world_size(),
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "tp_size": ps.get_tensor_model_parallel_world_size(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "pp_size": ps.get_pipeline_model_parallel_world_size(),
        "dp_rank": ps.get_data_parallel_rank(),
        "dp_size": ps.get_data_parallel_world_size(),
    }
