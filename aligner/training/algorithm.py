"""What an algorithm gives the training loop: micro-batches, a forward, a loss, metrics.

The loop (:mod:`aligner.training.loop`) owns everything else — optimizer, schedule,
pipeline schedules, data order, checkpoints, logging — and has no algorithm branches.

Loss convention (layout-independent normalisation): :meth:`Algorithm.loss` returns
``(loss_sum, count, metrics)``: the loss summed over this micro-batch's units (tokens for
SFT, sequences for regression, pairs for BT / DPO) and the number of units. The loop
runs megatron-core with ``calculate_per_token_loss``: gradients are divided by the total
count over all micro-batches and data-parallel ranks, so the optimised quantity is the
mean over the global batch whatever the TP / PP / DP layout or packing.
:meth:`Algorithm.loss_count` gives the same count from the micro-batch alone: an MoE
model's router losses are weighed by it in every training forward (docs/moe.md).

Metrics are ``name -> tensor([sum, count])`` (:func:`aligner.training.metrics.metric`); the
loop sums both over micro-batches and data-parallel ranks, over the union of the ranks'
names (:func:`aligner.training.metrics.reduce_metrics`), and reports ``sum / count``.

Micro-batches are dicts in the format of :mod:`aligner.training.batching`; what an
algorithm attaches (labels, strengths, indices) is per item or per sample, never per row.
The loop gives megatron-core micro-batches of one shape: it appends zero-weight rows
(``item_of_token`` -1, ``loss_mask`` 0) to a short one and, under interleaved
pipelining (or experts split over the data-parallel ranks), adds zero-weight
micro-batches (``filler=True``) whose loss the schedule supplies itself
(:func:`aligner.training.roles.run_schedule`: neither :meth:`Algorithm.loss` nor
:meth:`Algorithm.loss_count` sees them). So :meth:`Algorithm.loss` must compute from items and target tokens only (never
from the row count), and :meth:`Algorithm.forward` must use only the format's keys
(``tokens``, ``position_ids``, ``attention_mask``).

An algorithm that owns its step (online RL: experience, global reductions, several
updates of several roles) sets ``owns_step = True`` and implements
:meth:`Algorithm.train_step`; the loop then hands it a :class:`StepContext` (the roles, the
step's prompts, the schedule runner and collectives) instead of running its own
forward-backward, and keeps the step count, logging, checkpoints and resume
(docs/online_core.md). The whole contract is declared on :class:`Algorithm`; the loop
reads nothing else of an algorithm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from aligner.training.metrics import means, reduce_metrics
from aligner.training.roles import in_step_with_experts, run_schedule

Metrics = Dict[str, torch.Tensor]


@dataclass
class StepContext:
    """What an algorithm that owns its step sees of the loop (docs/online_core.md).

    roles: :class:`aligner.training.roles.RoleSet` (``roles["policy"]`` and the trainer's
    other roles). step: the 0-based step being taken. samples: the step's global batch
    (identical on every rank; prompts for online algorithms, in an order that is a
    function of the step); local_samples: this data-parallel rank's contiguous share.
    micro_batch_size: rows per forward. seed: the run's seed.
    """

    roles: Any
    step: int
    samples: Sequence[dict]
    local_samples: Sequence[dict]
    micro_batch_size: int
    seed: int

    @staticmethod
    def run_schedule(chunks, microbatches, forward, loss, *, forward_only: bool, count=None) -> List[dict]:
        """megatron-core's schedule over a role's chunks (:func:`aligner.training.roles.run_schedule`;
        ``count``: the loss's count of a micro-batch, needed to train an MoE model with router losses),
        as many micro-batches on every data-parallel rank when experts are split over them
        (fillers that count for nothing, :func:`aligner.training.roles.in_step_with_experts`):
        every data-parallel rank calls it for every pass."""
        micro = in_step_with_experts(list(microbatches))
        return run_schedule(chunks, micro, forward, loss, forward_only=forward_only, count=count)

    # ---- collectives (no-ops on one rank)
    @property
    def dp_size(self) -> int:
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_world_size()

    @property
    def dp_rank(self) -> int:
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_rank()

    def all_reduce_dp(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or ``"max"`` / ``"min"``) ``tensor`` over the data-parallel group, in place."""
        from megatron.core import parallel_state as ps

        if self.dp_size > 1:
            reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
            dist.all_reduce(tensor, op=reduce_op, group=ps.get_data_parallel_group())
        return tensor

    @staticmethod
    def reduce_metrics(store: Sequence[dict]) -> Dict[str, float]:
        """``sum / count`` of metric dicts summed over micro-batches and data-parallel ranks
        (:func:`aligner.training.metrics.reduce_metrics`), on every rank."""
        return means(reduce_metrics(store))

    @staticmethod
    def from_last_stage(obj):
        """``obj`` of the last pipeline stage on every stage of the pipeline group."""
        from megatron.core import parallel_state as ps

        if ps.get_pipeline_model_parallel_world_size() == 1:
            return obj
        payload = [obj]
        dist.broadcast_object_list(payload, src=ps.get_pipeline_model_parallel_last_rank(),
                                   group=ps.get_pipeline_model_parallel_group())
        return payload[0]


class Algorithm:
    """Base class of the per-algorithm plug-in: everything the loop asks of an algorithm.

    head / num_outputs: the model head the algorithm needs (None: causal LM).
    rows_per_sample: rows a sample occupies in a padded micro-batch (2 for pairs).
    owns_step: the algorithm runs whole steps (:meth:`train_step`) instead of the loop's
    forward-backward. optimizer_steps_per_step: policy updates per training step (the LR
    schedule runs over ``max_steps`` x this). reward_source: the reward the algorithm
    trains on, if any (:class:`aligner.rewards.RewardSource`; a monitor's default proxy).

    The hooks that get the loop (:meth:`setup`, :meth:`before_step`) use its public
    interface only: ``train_data``, ``val_data``, ``cfg`` (the trainer section),
    ``models``, ``steps_per_epoch``, ``global_batch(step)``, ``local_share(samples)``,
    ``seq_length(samples)`` and ``run_schedule(samples, forward_only=, seq_length=)``.
    """

    name: str = "algorithm"
    owns_step: bool = False
    optimizer_steps_per_step: int = 1
    head: Optional[str] = None
    num_outputs: int = 1
    rows_per_sample: int = 1

    @property
    def reward_source(self):
        return None

    def sample_tokens(self, sample: dict) -> int:
        """Tokens a sample puts through the model, every sequence counted (throughput figures)."""
        raise NotImplementedError

    def sample_length(self, sample: dict) -> int:
        """The sample's longest sequence (pad lengths); default: :meth:`sample_tokens`."""
        return self.sample_tokens(sample)

    def microbatches(self, samples: Sequence[dict], micro_batch_size: int, seq_length: int) -> List[dict]:
        """Collate this rank's share of a global batch into micro-batches of ``seq_length`` tokens
        (one sequence length for all; the last may hold fewer rows, the loop fills it)."""
        raise NotImplementedError

    def forward(self, model, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, batch: dict, output: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Metrics]:
        raise NotImplementedError

    def loss_count(self, batch: dict) -> int:
        """The count :meth:`loss` returns for ``batch``, from the micro-batch alone (no
        model output): every pipeline stage of an MoE model weighs the micro-batch's router
        losses by it before the loss exists (docs/moe.md, "Router losses")."""
        raise NotImplementedError(f"{type(self).__name__} gives no loss_count: its router losses cannot be weighed")

    def finalize_metrics(self, means: Dict[str, float], sums: Dict[str, Tuple[float, float]]) -> Dict[str, float]:
        """Derived metrics from the reduced ones (e.g. Pearson from moment sums); default: the means."""
        return means

    def setup(self, loop) -> None:
        """Called once by the loop after the model, optimizer and data exist (e.g. reference log-probs).

        Runs before a resume loads trained weights: the models hold the initial weights.
        """

    def before_step(self, loop, local_samples: Sequence[dict], seq_length: int) -> None:
        """Called before each of the loop's steps with this rank's samples (e.g. reference log-probs)."""

    def train_step(self, context: StepContext) -> Dict[str, float]:
        """One whole training step (only when ``owns_step``): returns the step's metrics,
        reduced over ranks, identical on every rank."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Algorithm state saved in checkpoints (json-able)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class StepHook:
    """Something the loop runs beside training, with no say in the objective (e.g. the
    gold-vs-proxy monitor, docs/monitor.md). Trainers pass hooks to
    :class:`aligner.training.loop.TrainingLoop`; the loop calls, on every rank:

    - :meth:`setup` once, after the algorithm's setup and before a resume (the models hold
      the initial weights);
    - :meth:`after_step` before the first step of a fresh run (``loop.step == 0``) and after
      every step; it returns metrics to log (split ``name``) or None, and may call
      ``loop.request_stop(reason)`` to end training after this step (checkpoint and export
      as at a normal end);
    - :meth:`state_dict` / :meth:`load_state_dict` with every checkpoint (json-able).

    The loop runs :meth:`after_step` with every random stream restored afterwards and the
    models in the mode it found them, so a hook never changes the training trajectory.
    """

    name: str = "hook"

    def setup(self, loop) -> None:
        pass

    def after_step(self, loop) -> Optional[Dict[str, float]]:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
