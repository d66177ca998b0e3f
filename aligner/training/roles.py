"""Models by role: trainable roles with their own optimizer, frozen roles, the reference
policy, offload to host memory, one checkpoint for every trainable role (docs/online_core.md).

Roles (all built for the job's one TP / PP / DP layout):

- ``policy``: trainable, the causal LM being optimised (the only role of SFT / RM / DPO).
- ``critic``: trainable, a value-head model (PPO).
- ``reference``: frozen, the initial policy (:class:`ReferencePolicy`): either a host-memory
  copy of the initial weights swapped into the policy's own modules for a forward
  (``mode="host"``: no second model in device memory), or a second model
  (``mode="model"``: no swapping, one more model's memory).
- ``reward``: frozen, a reward model (or no model at all: see :mod:`aligner.rewards`).

A :class:`TrainableRole` owns its megatron-core ``DistributedDataParallel`` chunks, its
megatron-core optimizer and its LR / weight-decay schedule (:func:`build_trainable_role`;
the training loop builds the ``policy`` role with it). :func:`run_schedule` runs
megatron-core's pipeline schedule (no pipelining, 1F1B, interleaved) over any role's
chunks with an algorithm's forward and loss. :class:`RoleSet` holds the roles of a job and
gives the checkpoint its parts: with one trainable role exactly what the loop always
saved (model chunks, optimizer, scheduler); with several, one model state with every
role's tensors under its own key prefix (``policy.``, ``critic.``), every role's optimizer
state and every role's schedule — one atomic checkpoint, resumable at another layout.

Offload (``role.offload()`` / ``role.onload()``): parameters (and, for trainable roles,
optimizer states) move to host memory between phases; the module
objects stay, so anything holding a parameter (the rollout engine) sees the values again
after ``onload``. On a CPU the same code path runs (host and device are one; the storage
is released from the parameters and given back), which is how it is tested.

Shape notation: b rows, s positions, v/p vocabulary slice of this TP rank.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch

from aligner.parallel import get_device
from aligner.training.batching import filler_like, to_device


# ------------------------------------------------------------------------------ schedule
def run_schedule(chunks: Sequence[torch.nn.Module], microbatches: List[dict], forward: Callable,
                 loss: Callable, *, forward_only: bool, count: Optional[Callable[[dict], int]] = None) -> List[dict]:
    """megatron-core's forward(-backward) schedule for this layout over ``microbatches``.

    chunks: this rank's model chunks of one role (DDP-wrapped for a trainable role; plain
    modules for forward-only roles). forward(model, batch) -> the model output;
    loss(batch, output) -> ``(loss_sum, count, metrics)`` (the convention of
    :mod:`aligner.training.algorithm`; with ``calculate_per_token_loss`` megatron-core
    divides gradients by the count summed over micro-batches and data-parallel ranks).
    With pipeline stages every micro-batch must have the same ``tokens`` shape [b, s] (the
    stages exchange fixed-shape activations); without, shapes may differ. Returns the metric
    dicts of the last pipeline stage.

    count(batch): the count ``loss`` will return for a micro-batch, from the micro-batch
    alone (every pipeline stage needs it before the loss exists). A training schedule of an
    MoE model weighs each micro-batch's router losses by it
    (:func:`aligner.models.moe.weighted_losses`; the last stage checks that the loss agrees);
    such a schedule without ``count`` is refused.

    A micro-batch marked ``filler`` (:func:`aligner.training.batching.filler_like`)
    runs its forward and a backward of zeros and counts for nothing: ``loss`` is not
    called (the loss is 0, the count 0, no metrics) and an MoE model's routers run it
    out of training mode (no load-balancing or z-loss attached or logged, no token
    counts in :class:`aligner.models.moe.RouterStats`).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not microbatches:
        return []
    rows, seq = microbatches[0]["tokens"].shape[:2]
    if ps.get_pipeline_model_parallel_world_size() > 1:  # without stages any shapes run
        for i, mb in enumerate(microbatches):
            if tuple(mb["tokens"].shape[:2]) != (rows, seq):
                raise ValueError(f"micro-batch {i} has tokens {tuple(mb['tokens'].shape)}; every micro-batch of a"
                                 f" pipelined schedule needs [{rows}, {seq}]")

    from aligner.models.moe import routers, weighted_losses  # megatron-core: loaded when a schedule runs

    weighed = not forward_only and any(r.config.moe_aux_loss_coeff or r.config.moe_z_loss_coeff
                                       for c in chunks for r in routers(c))
    if weighed and count is None:
        raise ValueError("a training schedule of an MoE model with router losses needs the micro-batches' loss"
                         " counts (run_schedule's count) to weigh them")

    def forward_step(data_iterator, model):
        batch = to_device(next(data_iterator), get_device())
        if batch.get("filler"):
            with silent_routers(model):
                output = forward(model, batch)
            return output, _filler_loss
        units = int(count(batch)) if weighed else None
        if weighed:
            with weighted_losses(model, units):
                output = forward(model, batch)
        else:
            output = forward(model, batch)

        def loss_func(out):
            value, n, metrics = loss(batch, out)
            n = torch.as_tensor(n, dtype=torch.int).reshape(())
            if units is not None and int(n) != units:
                raise RuntimeError(f"the loss counted {int(n)} for a micro-batch whose count was given as {units}"
                                   " (run_schedule's count disagrees with the loss)")
            return value, n, metrics

        return output, loss_func

    chunks = list(chunks)
    iters = [iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches)
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iters,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq,
        micro_batch_size=rows,
        forward_only=forward_only,
    )


def _filler_loss(output):
    return output.reshape(-1)[:1].sum() * 0.0, torch.zeros((), dtype=torch.int), {}


@contextlib.contextmanager
def silent_routers(model) -> Iterator[None]:
    """An MoE model's routers out of training mode for one forward (a filler micro-batch's):
    megatron-core attaches and logs their auxiliary losses in training mode only. Nothing
    for a dense model."""
    from aligner.models.moe import routers  # megatron-core: loaded when a schedule runs

    found = [r for r in routers(model) if r.training]
    for r in found:
        r.training = False
    try:
        yield
    finally:
        for r in found:
            r.training = True


def in_step_with_experts(microbatches: List[dict], template: Optional[Callable[[], dict]] = None) -> List[dict]:
    """``microbatches`` topped up so that every data-parallel rank runs as many as the
    largest count among them. With an MoE model's experts split over the data-parallel
    ranks (EP > 1) every forward and backward exchanges tokens between those ranks, so a
    rank with fewer micro-batches (an uneven split of a mini-batch, of a last validation
    batch, packing's variable bins) would leave the others waiting: it runs filler
    micro-batches (:func:`aligner.training.batching.filler_like` of its last one, or of
    ``template()`` when it has none) whose loss, count and metrics are zero. Without expert parallelism the list is
    returned as it is, with no collective. Every data-parallel rank must call it."""
    from megatron.core import parallel_state as ps  # loaded when training runs, not with config checks

    if ps.get_expert_model_parallel_world_size() == 1:
        return microbatches
    count = torch.tensor([len(microbatches)], dtype=torch.int64, device=get_device())
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX,
                                 group=ps.get_data_parallel_group(with_context_parallel=True))
    missing = int(count.item()) - len(microbatches)
    if missing <= 0:
        return microbatches
    if not microbatches and template is None:
        raise ValueError(f"this data-parallel rank has no micro-batch while another has {int(count.item())}"
                         " (expert parallelism): a filler needs a micro-batch or a template to copy")
    like = microbatches[-1] if microbatches else template()
    return list(microbatches) + [filler_like(like) for _ in range(missing)]


# ------------------------------------------------------------------------------ offload
class _Offload:
    """Moves tensors to host memory and back, keeping the tensor / parameter objects."""

    def __init__(self):
        self.host: Dict[int, torch.Tensor] = {}
        self.device: Dict[int, torch.device] = {}

    def out(self, tensors: Sequence[torch.Tensor]) -> None:
        for t in tensors:
            if id(t) in self.host or t.numel() == 0:
                continue
            self.device[id(t)] = t.device
            # on a GPU this copies to host memory; on a CPU it keeps the storage itself
            self.host[id(t)] = t.data.to("cpu")
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)

    def back(self, tensors: Sequence[torch.Tensor]) -> None:
        for t in tensors:
            host = self.host.pop(id(t), None)
            if host is not None:
                t.data = host.to(self.device.pop(id(t)))


def _optimizer_states(optimizer) -> List[torch.Tensor]:
    out = []
    inner = getattr(optimizer, "optimizer", None)
    if inner is None:
        return out
    for state in inner.state.values():
        out += [v for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
    return out


# ------------------------------------------------------------------------------ roles
@dataclass
class FrozenRole:
    """A forward-only role (reward model, reference as a second model): model chunks, eval mode."""

    name: str
    chunks: List[torch.nn.Module]
    _offload: _Offload = field(default_factory=_Offload, repr=False)

    def __post_init__(self):
        for c in self.chunks:
            c.eval()
            for p in c.parameters():
                p.requires_grad_(False)

    def parameters(self) -> List[torch.Tensor]:
        return [p for c in self.chunks for p in c.parameters()]

    def offload(self) -> None:
        self._offload.out(self.parameters())

    def onload(self) -> None:
        self._offload.back(self.parameters())

    @property
    def offloaded(self) -> bool:
        return bool(self._offload.host)


@dataclass
class TrainableRole:
    """A trainable role: DDP-wrapped chunks, megatron-core optimizer and LR schedule.

    export_head: the head the role's HF export has (None: causal LM; ``"value"``: a
    sequence-classification model).
    """

    name: str
    chunks: List[torch.nn.Module]  # megatron-core DistributedDataParallel
    optimizer: object
    scheduler: object
    export_head: Optional[str] = None
    model_cfg: object = None  # the role's architecture when it differs from the policy's
    # ids of parameters another role owns (a base shared under a second adapter set): never offloaded by this role
    borrowed: frozenset = field(default_factory=frozenset, repr=False)
    _offload: _Offload = field(default_factory=_Offload, repr=False)

    @property
    def modules(self) -> List[torch.nn.Module]:
        """The unwrapped model chunks (AlignerGPTModel)."""
        # aligner.models is megatron-core: loaded when roles hold models (roles is imported
        # by config checks, through the algorithms)
        from aligner.models.gpt import unwrap_model

        return unwrap_model(self.chunks)

    def zero_grad(self) -> None:
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self):
        """Optimizer step (gradient clipping inside) and one scheduler step; ``(ok, grad_norm)``."""
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        return ok, grad_norm

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train(self, mode: bool = True) -> None:
        for c in self.chunks:
            c.train(mode)

    def _tensors(self) -> List[torch.Tensor]:
        # Parameters that are views into DDP's contiguous buffer (the distributed optimizer)
        # and the gradient buffers (parameters' main_grad views into them) stay put: moving
        # a buffer would leave its views on the old storage.
        params = [p for c in self.chunks for p in c.module.parameters()
                  if p._base is None and id(p) not in self.borrowed]
        return params + _optimizer_states(self.optimizer)

    def offload(self) -> None:
        self._offload.out(self._tensors())

    def onload(self) -> None:
        self._offload.back(self._tensors())

    @property
    def offloaded(self) -> bool:
        return bool(self._offload.host)


def build_trainable_role(name: str, models: List[torch.nn.Module], optim, max_steps: int,
                         export_head: Optional[str] = None, model_cfg=None) -> TrainableRole:
    """Wrap ``models`` (this rank's chunks) in megatron-core DDP and build the role's
    optimizer and LR / weight-decay schedule from ``optim`` (an OptimSection); the LR
    decays over ``max_steps`` optimizer steps of this role."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    bf16 = any(p.dtype == torch.bfloat16 for m in models for p in m.parameters())
    for m in models:
        m.config.calculate_per_token_loss = True
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=optim.distributed,
        average_in_collective=False,
    )
    chunks = [DistributedDataParallel(m.config, ddp_cfg, m, disable_bucketing=i > 0) for i, m in enumerate(models)]
    ocfg = OptimizerConfig(
        optimizer=str(optim.name),  # plain strings: checkpoints load with weights_only
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.beta1,
        adam_beta2=optim.beta2,
        adam_eps=optim.eps,
        clip_grad=optim.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=optim.distributed,
    )
    optimizer = get_megatron_optimizer(ocfg, chunks)
    decay_steps = max(1, max_steps)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.warmup_steps > 0 else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=max(decay_steps, optim.warmup_steps + 1),
        lr_decay_style=str(optim.schedule),
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )
    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    nosync = [c.no_sync for c in chunks]
    config.no_sync_func = nosync[0] if len(nosync) == 1 else nosync
    return TrainableRole(name, chunks, optimizer, scheduler, export_head=export_head, model_cfg=model_cfg)


# ------------------------------------------------------------------------------ reference
class ReferencePolicy:
    """The frozen initial policy (docs/online_core.md, "reference").

    ``ReferencePolicy(policy_chunks, mode="host")`` snapshots the policy's current
    parameters into host memory; take it before any training or resume, so that it is
    the initial policy whatever checkpoint the run continues from.
    ``ReferencePolicy(policy_chunks, mode="model", reference_chunks=...)`` uses a second,
    frozen model (same architecture and layout) instead.

    Use: ``with ref.active() as chunks: <forward-only passes over chunks>``. In host mode
    ``chunks`` are the policy's own modules holding the reference weights for the
    duration of the block, which runs forward passes only: where the host copy is on the
    parameters' device (host and device one memory) its tensors stand in for the parameters' storage (no
    copy; the block must not write to them), elsewhere they are copied in and the policy's
    weights kept on the host meanwhile; either way the policy's are back on exit, also on
    an exception. In model mode they are the second model. Either
    way the reference runs the very forward path the policy runs, so at step 0 policy
    and reference log-probs are identical under every TP / PP layout.

    A policy with LoRA adapters (docs/lora.md) is its own reference in either requested
    mode: ``active()`` yields the policy's chunks with the adapters disabled, the base
    weights unchanged (mode ``"adapters"``: no copy, no second model).
    """

    MODES = ("host", "model", "adapters")

    def __init__(self, policy_chunks: Sequence[torch.nn.Module], mode: str = "host",
                 reference_chunks: Optional[Sequence[torch.nn.Module]] = None):
        from aligner.models.gpt import unwrap_model  # megatron-core: see TrainableRole.modules

        if mode not in self.MODES:
            raise ValueError(f"reference mode {mode!r}: expected one of {self.MODES}")
        from aligner.models.lora import has_adapters  # megatron-core: see TrainableRole.modules

        self.policy = list(policy_chunks)
        self.mode = "adapters" if has_adapters(self.policy) else mode
        self.role = None
        if self.mode == "adapters":
            return
        if mode == "host":
            self._weights = [
                {n: p.detach().to("cpu", copy=True) for n, p in unwrap_model(c).named_parameters()}
                for c in self.policy
            ]
            self.role = None
        else:
            if reference_chunks is None:
                raise ValueError("reference mode 'model' needs the reference model's chunks")
            self.role = FrozenRole("reference", list(reference_chunks))

    @contextlib.contextmanager
    def active(self) -> Iterator[List[torch.nn.Module]]:
        from aligner.models.gpt import unwrap_model  # megatron-core: see TrainableRole.modules

        from aligner.models.lora import adapters_disabled  # megatron-core: see TrainableRole.modules

        if self.mode == "model":
            yield self.role.chunks
            return
        if self.mode == "adapters":
            modes = [c.training for c in self.policy]
            try:
                for c in self.policy:
                    c.eval()
                with adapters_disabled(self.policy):
                    yield self.policy
            finally:
                for c, mode in zip(self.policy, modes):
                    c.train(mode)
            return
        modes = [c.training for c in self.policy]
        params = [dict(unwrap_model(chunk).named_parameters()) for chunk in self.policy]
        swapped = []  # per chunk: name -> the policy's own tensor, while the reference's stands in
        copied = []  # per chunk: name -> a host copy of the policy's values, while the reference's are copied in
        try:
            with torch.no_grad():
                for chunk_params, ref in zip(params, self._weights):
                    swapped.append({})
                    copied.append({})
                    for n, p in chunk_params.items():
                        if _swappable(p, ref[n]):  # the host copy is on the parameter's device: no copy
                            swapped[-1][n] = p.data
                            p.data = ref[n]
                        else:
                            copied[-1][n] = p.detach().to("cpu", copy=True)
                            p.data.copy_(ref[n].to(p.device))
            for c in self.policy:
                c.eval()
            yield self.policy
        finally:
            with torch.no_grad():
                for chunk_params, own, host in zip(params, swapped, copied):
                    for n, t in own.items():
                        chunk_params[n].data = t
                    for n, t in host.items():
                        chunk_params[n].data.copy_(t.to(chunk_params[n].device))
            for c, mode in zip(self.policy, modes):
                c.train(mode)


def _swappable(param: torch.Tensor, host: torch.Tensor) -> bool:
    """The reference's host tensor can stand in for ``param``'s storage for a forward-only
    pass: same device, dtype, shape and strides."""
    return (host.device == param.device and host.dtype == param.dtype and host.shape == param.shape
            and host.stride() == param.stride())


# ------------------------------------------------------------------------------ role set
class RoleSet:
    """The roles of one job by name; the parts of its checkpoint (module docstring)."""

    def __init__(self):
        self.trainable: Dict[str, TrainableRole] = {}
        self.frozen: Dict[str, FrozenRole] = {}
        self.reference: Optional[ReferencePolicy] = None

    def add(self, role) -> None:
        if role.name in self.trainable or role.name in self.frozen:
            raise ValueError(f"role {role.name!r} is already set")
        (self.trainable if isinstance(role, TrainableRole) else self.frozen)[role.name] = role

    def __getitem__(self, name: str):
        if name in self.trainable:
            return self.trainable[name]
        if name in self.frozen:
            return self.frozen[name]
        raise KeyError(f"no role {name!r}; roles: {sorted(self.trainable) + sorted(self.frozen)}")

    def __contains__(self, name: str) -> bool:
        return name in self.trainable or name in self.frozen

    def checkpoint_parts(self):
        """``(models, optimizer, scheduler)`` for :func:`aligner.models.checkpoint.save_checkpoint`."""
        if len(self.trainable) == 1:
            role = next(iter(self.trainable.values()))
            return role.chunks, role.optimizer, role.scheduler
        roles = list(self.trainable.values())
        return [_RoleModels(roles)], _RoleOptimizers(roles), _RoleSchedulers(roles)


class _RoleModels:
    """Every trainable role's chunks as one checkpointable model: role ``r``'s tensors
    are stored under keys prefixed ``r.`` (so a policy and a critic of one architecture
    never collide) and its state under ``state[r]["chunk<i>"]``."""

    def __init__(self, roles: Sequence[TrainableRole]):
        self.roles = list(roles)

    def sharded_state_dict(self) -> dict:
        from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding

        from aligner.models.checkpoint import split_state  # megatron-core: see TrainableRole.modules

        out = {}
        for role in self.roles:
            out[role.name] = {}
            for i, module in enumerate(role.modules):
                sd = split_state(module)[0]  # a role with adapters: its adapters (and head) only
                add_prefix_for_sharding(sd, f"{role.name}.")
                out[role.name][f"chunk{i}"] = sd
        return out

    def checkpoint_modules(self) -> list:
        """``(role name, module)`` of every chunk (the base fingerprint of adapter roles)."""
        return [(role.name, module) for role in self.roles for module in role.modules]

    def load_state_dict(self, state: dict) -> None:
        from aligner.models.checkpoint import load_module_state  # megatron-core: see TrainableRole.modules

        for role in self.roles:
            if role.name not in state:
                raise KeyError(f"checkpoint has no weights for role {role.name!r}")
            for i, module in enumerate(role.modules):
                load_module_state(module, state[role.name][f"chunk{i}"], f"role {role.name!r}")


class _RoleOptimizers:
    def __init__(self, roles: Sequence[TrainableRole]):
        self.roles = list(roles)

    def sharded_state_dict(self, model_state: dict, is_loading: bool = False) -> dict:
        models = model_state["model"]
        return {r.name: r.optimizer.sharded_state_dict(models[r.name], is_loading=is_loading) for r in self.roles}

    def load_state_dict(self, state: dict) -> None:
        for r in self.roles:
            r.optimizer.load_state_dict(state[r.name])


class _RoleSchedulers:
    def __init__(self, roles: Sequence[TrainableRole]):
        self.roles = list(roles)

    def state_dict(self) -> dict:
        return {r.name: r.scheduler.state_dict() for r in self.roles}

    def load_state_dict(self, state: dict) -> None:
        for r in self.roles:
            r.scheduler.load_state_dict(state[r.name])


__all__ = [
    "FrozenRole",
    "ReferencePolicy",
    "RoleSet",
    "TrainableRole",
    "build_trainable_role",
    "run_schedule",
]
