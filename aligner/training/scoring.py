"""Batched reward-model scoring in any TP / PP layout (forward-only pipeline schedule).

``score_sequences(models, sequences, pad_id, micro_batch_size)`` returns the head outputs
``[n, N]`` at each sequence's last token, on every rank (sent from the last pipeline
stage). Used by ``aligner rm score``, ``aligner eval`` and the quickstart.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from aligner.parallel import get_device, padded_length
from aligner.training.batching import padded_microbatch, schedule_microbatches, to_device


@torch.no_grad()
def score_sequences(models, sequences: Sequence[torch.Tensor], pad_id: int, micro_batch_size: int = 8) -> torch.Tensor:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not sequences:
        return torch.zeros(0, 0)
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    for m in models:
        m.eval()
    seq_length = padded_length(max(int(s.numel()) for s in sequences))
    micro = []
    for start in range(0, len(sequences), micro_batch_size):
        chunk = list(sequences[start : start + micro_batch_size])
        micro.append(padded_microbatch([(s, torch.zeros(s.numel())) for s in chunk], seq_length, pad_id))
    # one micro-batch shape for the pipeline: a short last one gets zero-weight rows
    micro = schedule_microbatches(micro, interleaved=len(models) > 1, rows=micro_batch_size)
    collected: List[torch.Tensor] = []

    def forward_step(data_iterator, model):
        batch = to_device(next(data_iterator), get_device())
        out = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])

        def loss_func(values):
            scores = values[batch["last_row"], batch["last_col"]].float()
            collected.append(scores.cpu())
            return values.sum() * 0.0, {}

        return out, loss_func

    iters = [iter(micro) for _ in models] if len(models) > 1 else iter(micro)
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iters,
        model=models,
        num_microbatches=len(micro),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=True,
    )
    payload = [torch.cat(collected) if collected else None]
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast_object_list(
            payload, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group()
        )
    return payload[0]
