"""Metrics of training: an entry is ``tensor([sum, count])`` (:func:`metric`); the reported
value is ``sum / count`` after both are summed over micro-batches and data-parallel ranks
(:func:`reduce_metrics`). Names may depend on the data (e.g. one per subset present): the
reduction runs over the union of all ranks' names, a rank without a name counting ``[0, 0]``."""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.distributed as dist

Sums = Dict[str, Tuple[float, float]]


def metric(total, count) -> torch.Tensor:
    """A metric entry: ``tensor([sum, count])`` (float64, detached)."""
    total = total.detach().double().sum() if torch.is_tensor(total) else torch.tensor(float(total), dtype=torch.float64)
    count = count.detach().double().sum() if torch.is_tensor(count) else torch.tensor(float(count), dtype=torch.float64)
    return torch.stack([total.cpu(), count.cpu()])


def reduce_metrics(store: Sequence[dict]) -> Sums:
    """``name -> (sum, count)`` of the metric dicts ``store`` (the last pipeline stage's, one
    per micro-batch), summed over micro-batches and data-parallel ranks over the union of
    the ranks' names; the same on every rank of the pipeline."""
    from megatron.core import parallel_state as ps  # megatron-core loads when training runs, not with config checks

    payload = [None]
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        keys = sorted({k for d in store for k in d})
        dp = ps.get_data_parallel_world_size()
        if dp > 1:
            per_rank = [None] * dp
            dist.all_gather_object(per_rank, keys, group=ps.get_data_parallel_group())
            keys = sorted({k for rank_keys in per_rank for k in rank_keys})
        totals = torch.zeros(len(keys), 2, dtype=torch.float64)
        for d in store:
            for i, k in enumerate(keys):
                if k in d:
                    totals[i] += d[k].detach().double().cpu().reshape(2)
        if dp > 1:
            dist.all_reduce(totals, group=ps.get_data_parallel_group())
        payload = [{k: (float(totals[i, 0]), float(totals[i, 1])) for i, k in enumerate(keys)}]
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast_object_list(payload, src=ps.get_pipeline_model_parallel_last_rank(),
                                   group=ps.get_pipeline_model_parallel_group())
    return payload[0] or {}


def means(sums: Sums) -> Dict[str, float]:
    """``sum / count`` of each metric (NaN where nothing was counted)."""
    return {k: (s / c if c else float("nan")) for k, (s, c) in sums.items()}
