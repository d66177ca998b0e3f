"""Mixture-of-experts at training and rollout time, on megatron-core's router (``TopKRouter``):
its auxiliary-loss options, statistics of the training passes, and routing replay.

- :func:`router_options`: the ``TransformerConfig`` fields of the ``moe`` config section
  (load-balancing loss and its coefficient, z-loss, routing replay).
- :func:`weighted_losses`: a training micro-batch's router losses weighed by its share of
  the step's loss count, and the z-loss of a sequence-parallel rank by its share of the
  micro-batch's tokens (docs/moe.md, "Router losses").
- :class:`RouterStats`: per step, the tokens each expert received in the training passes
  (forward hooks on the routers, only while the model trains with gradients) and the
  auxiliary losses megatron-core's tracker recorded (``save_to_aux_losses_tracker``),
  reduced over the layout into step metrics.
- :class:`RoutingCapture`: the experts the rollout engine's decode paths chose for every
  (row, position), and :func:`replaying`: a forward pass that routes those tokens to those
  experts (megatron-core's ``RouterReplay``, ``moe_enable_routing_replay``), the expert
  weights still computed from the pass's own router logits.

Notation: n rows, S positions, L this rank's MoE layers (all its model chunks, in order),
k experts per token, E experts. Routings are [n, S, L, k] int16 expert indices.
See docs/moe.md.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from aligner.models.gpt import unwrap_model

LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "global_aux_loss")
# the name megatron-core's tracker records each load-balancing loss under
TRACKED = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
           "global_aux_loss": "global_load_balancing_loss"}


def router_options(*, aux_loss_coeff: float = 0.0, load_balancing: str = "aux_loss", z_loss_coeff: float = 0.0,
                   routing_replay: bool = False) -> dict:
    """``TransformerConfig`` overrides of an MoE model for the ``moe`` section: megatron-core's
    load-balancing loss ``load_balancing`` (one of :data:`LOAD_BALANCING`) with
    ``aux_loss_coeff`` when it is > 0, the router z-loss with ``z_loss_coeff`` when > 0, and
    the routers' replay slots when ``routing_replay``."""
    if load_balancing not in LOAD_BALANCING:
        raise ValueError(f"moe.load_balancing = {load_balancing!r}; expected one of {LOAD_BALANCING}")
    out: dict = {}
    if aux_loss_coeff > 0:
        out.update(moe_router_load_balancing_type=load_balancing, moe_aux_loss_coeff=float(aux_loss_coeff))
    if z_loss_coeff > 0:
        out["moe_z_loss_coeff"] = float(z_loss_coeff)
    if routing_replay:
        out["moe_enable_routing_replay"] = True
    return out


def routers(chunks) -> list:
    """megatron-core's ``TopKRouter`` modules of ``chunks`` (this rank's model chunks, DDP
    wrappers allowed), in layer order."""
    from megatron.core.transformer.moe.router import TopKRouter

    chunks = chunks if isinstance(chunks, (list, tuple)) else [chunks]
    return [m for c in chunks for m in c.modules() if isinstance(m, TopKRouter)]


def topk_indices(routing_map: torch.Tensor, k: int) -> torch.Tensor:
    """The k experts each token of ``routing_map`` [T, E] (bool, k set per row) goes to: [T, k]."""
    return torch.topk(routing_map.to(torch.float32), k, dim=1, sorted=True).indices


def padding_mask(model, padding: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """megatron-core ``GPTModel``'s ``padding_mask`` keyword for a micro-batch whose padding
    positions are ``padding`` [b, s] (bool, True = padding), so the routers leave padding out
    of the auxiliary losses and the load statistics; None for a dense model (or no
    padding). megatron-core splits the mask over the sequence-parallel ranks on the first
    pipeline stage only; a later stage gets its share here."""
    inner = unwrap_model(model)
    if padding is None or not inner.model_cfg.num_experts:
        return None
    padding = padding.bool()
    tp = ps.get_tensor_model_parallel_world_size()
    if not inner.pre_process and inner.config.sequence_parallel and tp > 1:
        share = padding.shape[1] // tp
        rank = ps.get_tensor_model_parallel_rank()
        padding = padding[:, rank * share:(rank + 1) * share]
    return padding.contiguous()


# ------------------------------------------------------------------ loss weights
def _padding(args, kwargs) -> Optional[torch.Tensor]:
    """The router's padding mask ([s, b], True = padding) from its call's arguments."""
    return args[1] if len(args) > 1 else kwargs.get("padding_mask")


@contextlib.contextmanager
def weighted_losses(chunk, weight: float) -> Iterator[None]:
    """Within: the training passes of ``chunk``'s routers weigh this micro-batch's
    auxiliary losses by ``weight``, the micro-batch's loss count (the ``count`` its loss
    returns: target tokens for SFT, pairs for DPO, ...). The schedule divides every
    gradient by the step's count N, so layer l's losses enter the step's objective as
    ``Σ_mb (count_mb / N) (c·aux_l,mb + c_z·z_l,mb)``: c times the count-weighted mean over
    the step's micro-batches, c times the loss of a lone micro-batch (docs/moe.md).

    Under sequence parallelism megatron-core takes each rank's z-loss as the mean over its
    own share of the tokens and divides the coefficient by the tensor-parallel size; the
    rank's coefficient is multiplied by ``tp · T_r / T`` here (T_r: its non-padding tokens, T:
    the micro-batch's), which makes the ranks' sum the mean over all T tokens, as one
    process computes it. The load-balancing loss needs nothing: megatron-core's per-rank
    parts add up to it.

    A micro-batch of weight 0 (a zero-weight micro-batch) adds no router loss. The
    coefficients are set on a copy of each router's config for one forward; megatron-core's
    own per-token scaling of the losses (``calculate_per_token_loss`` on the router) is
    turned off, this weight replaces it."""
    rs = [r for r in routers(chunk)
          if r.config.moe_z_loss_coeff or (r.config.moe_aux_loss_coeff and r.config.moe_router_load_balancing_type
                                           not in (None, "none"))]
    if not rs:
        yield
        return
    base = {id(r): r.config for r in rs}

    def before(router, args, kwargs):
        if not (router.training and torch.is_grad_enabled()):
            return None
        cfg = copy.copy(base[id(router)])
        router.calculate_per_token_loss = False
        router.loss_weight = float(weight)
        if weight == 0:
            cfg.moe_aux_loss_coeff, cfg.moe_z_loss_coeff = 0.0, None
        else:
            if cfg.moe_aux_loss_coeff:
                cfg.moe_aux_loss_coeff = cfg.moe_aux_loss_coeff * float(weight)
            if cfg.moe_z_loss_coeff:
                cfg.moe_z_loss_coeff = cfg.moe_z_loss_coeff * float(weight) * _z_share(router, args, kwargs)
        router.config = cfg
        return None

    def after(router, args, output):
        router.config = base[id(router)]

    handles = [h for r in rs for h in (r.register_forward_pre_hook(before, with_kwargs=True),
                                       r.register_forward_hook(after))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for r in rs:
            r.config = base[id(r)]
            r.loss_weight = 1.0


def _z_share(router, args, kwargs) -> float:
    """``tp · T_r / T`` for a router whose tokens are split over a tensor/context-parallel
    group (1.0 otherwise, and on a rank without a non-padding token, where the z-loss is 0)."""
    group = router.tp_cp_group
    size = group.size() if group is not None else 1
    if size == 1:
        return 1.0
    padding = _padding(args, kwargs)
    hidden = args[0]
    total = hidden.numel() // hidden.shape[-1]
    mine = float(total - int(padding.sum())) if padding is not None else float(total)
    counts = torch.tensor([mine], dtype=torch.float64, device=hidden.device)
    dist.all_reduce(counts, group=group)
    return size * mine / float(counts[0]) if mine > 0 else 1.0


# ------------------------------------------------------------------ statistics
class RouterStats:
    """Step metrics of an MoE model's training passes (docs/moe.md, "Logged metrics").

    ``moe/tokens_per_expert_{mean,max,min}``: tokens routed to an expert in the step's
    training passes, over layers and experts (all ranks' tokens; padding left out where
    the forward passes a :func:`padding_mask`); ``moe/load_max_over_mean``
    and ``moe/load_min_over_mean``: the most and least loaded expert of the worst layer
    relative to the layer's mean (1.0: balanced); ``moe/load_balancing_loss`` and
    ``moe/z_loss`` (when their coefficient is set): each micro-batch's loss without the
    coefficient, averaged over layers and the micro-batches of every rank that carry a
    weight (:func:`weighted_losses`). The load-balancing loss is megatron-core's (its
    tracker); the z-loss is recomputed here from the router's inputs as the mean over
    the micro-batch's non-padding tokens, whatever their split over sequence-parallel ranks.
    Collectives run on every rank of the model (call :meth:`collect` everywhere).
    """

    def __init__(self, chunks):
        self.routers = routers(chunks)
        self.enabled = bool(self.routers)
        if not self.enabled:
            return
        config = self.routers[0].config
        self.config = config
        self.num_layers, self.num_experts = config.num_layers, config.num_moe_experts
        self.counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64)
        self.calls = torch.zeros(self.num_layers, dtype=torch.float64)
        self.loss_calls = torch.zeros(self.num_layers, dtype=torch.float64)
        self.z_parts: List[List[torch.Tensor]] = [[] for _ in range(self.num_layers)]
        self.handles = [r.register_forward_hook(self._hook) for r in self.routers]

    def _hook(self, router, inputs, output) -> None:
        if router.training and torch.is_grad_enabled():
            layer = router.layer_number - 1
            routing_map = output[1]
            padding = inputs[1] if len(inputs) > 1 else None  # [s, b], True = padding, as the router flattens it
            if padding is not None:
                routing_map = routing_map[~padding.reshape(-1)]
            self.counts[layer] += routing_map.sum(dim=0).double().cpu()
            self.calls[layer] += 1
            if getattr(router, "loss_weight", 1.0) == 0:
                return  # a micro-batch that carries no weight adds no router loss
            self.loss_calls[layer] += 1
            if self.config.moe_z_loss_coeff:
                with torch.no_grad():
                    z = torch.logsumexp(router.gating(inputs[0]).reshape(-1, self.num_experts).double(), dim=-1) ** 2
                    keep = torch.ones_like(z, dtype=torch.bool) if padding is None else ~padding.reshape(-1)
                    self.z_parts[layer].append(torch.stack([z[keep].sum(), keep.sum().double()]).cpu())

    def reset(self) -> None:
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        if self.enabled:
            self.counts.zero_()
            self.calls.zero_()
            self.loss_calls.zero_()
            self.z_parts = [[] for _ in range(self.num_layers)]
            clear_aux_losses_tracker()

    def _load_balancing(self) -> Optional[torch.Tensor]:
        """The load-balancing loss's per-layer sums over this rank's micro-batches
        [num_layers] (megatron-core's tracker; a sequence-parallel rank's part), or None."""
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        c = self.config
        if not (c.moe_aux_loss_coeff and c.moe_router_load_balancing_type != "none"):
            return None
        entry = get_moe_layer_wise_logging_tracker().get(TRACKED[c.moe_router_load_balancing_type])
        values = torch.zeros(self.num_layers) if entry is None else entry["values"][: self.num_layers]
        return values.double().cpu()

    def _z_sums(self, group) -> Optional[torch.Tensor]:
        """The z-loss's per-layer sums over this rank's micro-batches of each micro-batch's
        mean over its non-padding tokens [num_layers] (the tokens of every rank of the
        sequence-parallel ``group``, when given), or None."""
        if not self.config.moe_z_loss_coeff:
            return None
        out = torch.zeros(self.num_layers, dtype=torch.float64)
        for layer, parts in enumerate(self.z_parts):
            if not parts:
                continue
            parts = torch.stack(parts)  # [calls, 2]: Σ z², tokens
            if group is not None:
                dist.all_reduce(parts, group=group)
            out[layer] = (parts[:, 0] / parts[:, 1].clamp(min=1)).sum()
        return out

    def collect(self) -> Dict[str, float]:
        """The step's metrics (see the class docstring), the same on every rank."""
        if not self.enabled:
            return {}
        counts, calls, loss_calls = self.counts.clone(), self.calls.clone(), self.loss_calls.clone()
        losses = {}
        balancing = self._load_balancing()
        tp = ps.get_tensor_model_parallel_world_size()
        group = ps.get_tensor_model_parallel_group() if tp > 1 and self.config.sequence_parallel else None
        if group is not None:
            # each TP rank routes its own share of the sequence: token counts and the
            # load-balancing loss's per-rank parts add up
            dist.all_reduce(counts, group=group)
            if balancing is not None:
                dist.all_reduce(balancing, group=group)
        if balancing is not None:
            losses["load_balancing_loss"] = balancing
        z = self._z_sums(group)
        if z is not None:
            losses["z_loss"] = z
        # layers live on one pipeline stage each; data-parallel ranks route their own tokens
        stacked = torch.cat([counts.flatten(), calls, loss_calls] + [losses[n] for n in sorted(losses)])
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(stacked, group=ps.get_pipeline_model_parallel_group())
        if ps.get_data_parallel_world_size() > 1:
            dist.all_reduce(stacked, group=ps.get_data_parallel_group())
        L, E = self.num_layers, self.num_experts
        counts, calls = stacked[: L * E].view(L, E), stacked[L * E: L * E + L]
        loss_calls, rest = stacked[L * E + L: L * E + 2 * L], stacked[L * E + 2 * L:]
        if not bool((calls > 0).all()):
            return {}  # no training pass this step (an evaluation)
        mean = counts.mean(dim=1).clamp(min=1e-12)
        out = {"moe/tokens_per_expert_mean": float(counts.mean()), "moe/tokens_per_expert_max": float(counts.max()),
               "moe/tokens_per_expert_min": float(counts.min()),
               "moe/load_max_over_mean": float((counts.max(dim=1).values / mean).max()),
               "moe/load_min_over_mean": float((counts.min(dim=1).values / mean).min())}
        for i, name in enumerate(sorted(losses)):
            # summed over weighted micro-batches and data-parallel ranks: loss_calls counts both
            out[f"moe/{name}"] = float((rest[i * L:(i + 1) * L] / loss_calls.clamp(min=1)).mean())
        return out


# ------------------------------------------------------------------ routing replay
class RoutingCapture:
    """Records the experts every router of ``chunks`` chooses while :meth:`recording`, per
    (row, position): the caller says before each model call which rows and positions it
    covers (:meth:`feed`); megatron-core routes the call's tokens in [s, b] order."""

    def __init__(self, chunks):
        self.routers = routers(chunks)
        self.enabled = bool(self.routers)
        if self.enabled:
            self.k = self.routers[0].topk
            self.index = {id(r): i for i, r in enumerate(self.routers)}
        self.layers = [r.layer_number for r in self.routers]  # the L axis: layer numbers
        self.choices: Optional[torch.Tensor] = None
        self._rows = self._cols = None
        self._each = False  # one token per row, each at its own column (feed_each)
        # > 1 while a model call splits its columns over that many sequence-parallel (TP)
        # ranks: each rank's routers see their share, gathered here; the first columns fed
        # are kept (a call may run padding columns after them)
        self.split = 1

    @contextlib.contextmanager
    def recording(self, n: int, width: int) -> Iterator["RoutingCapture"]:
        """Record into a fresh [n, width, L, k] routing (unrecorded entries -1)."""
        self.choices = torch.full((n, width, len(self.routers), self.k), -1, dtype=torch.int16)
        handles = [r.register_forward_hook(self._hook) for r in self.routers]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._rows = self._cols = None

    def feed(self, rows: Sequence[int], columns: Sequence[int]) -> None:
        """The next model call covers ``rows`` (row indices of the routing) at ``columns``."""
        self._rows = torch.as_tensor(list(rows), dtype=torch.long)
        self._cols = torch.as_tensor(list(columns), dtype=torch.long)
        self._each = False

    def feed_each(self, rows: Sequence[int], columns: Sequence[int]) -> None:
        """The next model call covers one token per row: row ``rows[j]`` at its own column
        ``columns[j]`` (rows decoding at different positions)."""
        self._rows = torch.as_tensor(list(rows), dtype=torch.long)
        self._cols = torch.as_tensor(columns, dtype=torch.long).cpu()
        self._each = True

    def forget(self, row: int, start: int) -> None:
        """Row ``row``'s entries from column ``start`` on are unrecorded again (-1): columns
        a model call routed that hold no token of the row (its padding)."""
        self.choices[row, start:] = -1

    def _hook(self, router, inputs, output) -> None:
        if self._rows is None:
            return
        b, s = len(self._rows), 1 if self._each else len(self._cols)
        idx = topk_indices(output[1], self.k)
        if self.split > 1:  # the TP ranks' shares in column order: [s', b] tokens, s' >= s
            parts = [torch.empty_like(idx) for _ in range(self.split)]
            dist.all_gather(parts, idx.contiguous(), group=ps.get_tensor_model_parallel_group())
            idx = torch.cat(parts)[:s * b]
        idx = idx.view(s, b, self.k).to(torch.int16).cpu()
        if self._each:
            self.choices[self._rows, self._cols, self.index[id(router)]] = idx[0]
            return
        self.choices[self._rows[:, None], self._cols[None, :], self.index[id(router)]] = idx.transpose(0, 1)


def replay_routing(chunk, routing: torch.Tensor, layers: Sequence[int]) -> int:
    """Set ``chunk``'s routers (the replay slots of ``moe_enable_routing_replay``) to route
    the tokens of a [b, s] micro-batch as ``routing`` [b, s, L, k] says, ``layers`` being
    the layer numbers of its L axis (:attr:`RoutingCapture.layers`); entries
    never recorded (-1: positions the rollout did not feed, padding) keep the first k
    experts, which no scored token sees. Returns the number of routers set."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    count = 0
    slot = {number: i for i, number in enumerate(layers)}
    for router in routers(chunk):
        if router.router_replay is None:
            raise ValueError("routing replay needs the model built with moe.routing_replay = true"
                             " (megatron-core's moe_enable_routing_replay)")
        if router.layer_number not in slot:
            raise ValueError(f"the routing has no layer {router.layer_number} (recorded: {list(layers)})")
        idx = routing[:, :, slot[router.layer_number]].long()  # [b, s, k]
        default = torch.arange(idx.shape[-1]).expand_as(idx)
        idx = torch.where(idx < 0, default, idx).transpose(0, 1)  # [s, b, k]: megatron-core's token order
        if router.config.sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1:
            shard = idx.shape[0] // ps.get_tensor_model_parallel_world_size()
            rank = ps.get_tensor_model_parallel_rank()
            idx = idx[rank * shard:(rank + 1) * shard]
        device = router.weight.device
        router.router_replay.set_target_indices(idx.reshape(-1, idx.shape[-1]).to(device))
        router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        count += 1
    return count


def clear_replay(chunk) -> None:
    """Let ``chunk``'s routers choose their experts again."""
    for router in routers(chunk):
        if router.router_replay is not None:
            router.router_replay.clear_router_replay_action()
            router.router_replay.clear_indices()
