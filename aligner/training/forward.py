"""Forward-only passes over token rows on a role's chunks, through megatron-core's schedule
(any TP / PP layout): the per-token outputs online algorithms and evaluation read
(log-probs of the sampled tokens, a critic's values).

Per-token tensors are aligned with the token they score: position ``p`` holds
``log π(tokens[p] | tokens[<p])`` and the value of the state ``tokens[<p]`` in which
``tokens[p]`` was chosen. Shapes: n rows, S positions.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from aligner.models.moe import clear_replay, padding_mask, replay_routing
from aligner.training.batching import shifted_logprobs


def collect_token_outputs(run_schedule, chunks, tokens: torch.Tensor, micro_batch_size: int, per_token,
                          from_last_stage, routing: Optional[torch.Tensor] = None,
                          routing_layers: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``per_token(batch, output) -> [b, S]`` over every row of ``tokens`` [n, S] in a
    forward-only schedule over ``chunks``; [n, S] fp32 on every pipeline stage.

    The last micro-batch is filled with copies of row 0 (fixed shapes for the pipeline).
    routing [n, S, L, k] (an MoE model, with the layer numbers ``routing_layers``): the
    tokens go to these experts (:func:`forward`)."""
    n, s = tokens.shape
    micro = []
    for start in range(0, n, micro_batch_size):
        idx = torch.arange(start, min(start + micro_batch_size, n))
        real = len(idx)
        idx = torch.cat([idx, torch.zeros(micro_batch_size - real, dtype=torch.long)])
        batch = {"tokens": tokens[idx], "position_ids": None, "attention_mask": None, "real": real}
        if routing is not None:
            batch["routing"], batch["routing_layers"] = routing[idx], routing_layers
        micro.append(batch)
    collected: List[torch.Tensor] = []

    def loss(batch, output):
        values = per_token(batch, output).float()
        collected.append(values[: batch["real"]].detach().cpu())
        return output.sum() * 0.0, 1, {}

    for c in chunks:
        c.eval()
    with torch.no_grad():
        run_schedule(chunks, micro, forward, loss, forward_only=True)
    result = torch.cat(collected) if collected else None
    return from_last_stage(result)


def forward(model, batch):
    """The model on a micro-batch of the batching format (tokens, positions, mask); with a
    ``routing`` [b, s, L, k] (and its ``routing_layers``) an MoE model's routers send the
    tokens to those experts (routing replay, aligner.models.moe) in this forward only."""
    routing = batch.get("routing")
    # an MoE model's routers leave padding (``padding`` [b, s], where given) out of their losses
    kwargs = {"padding_mask": padding_mask(model, batch.get("padding"))}
    if routing is None:
        return model(batch["tokens"], batch["position_ids"], batch["attention_mask"], **kwargs)
    replay_routing(model, routing, batch["routing_layers"].tolist())
    try:
        return model(batch["tokens"], batch["position_ids"], batch["attention_mask"], **kwargs)
    finally:
        clear_replay(model)


def policy_logps(batch, logits) -> torch.Tensor:
    """Per-token log-probs of ``batch["tokens"]`` (aligned: position p scores token p)."""
    return shifted_logprobs(logits, batch["tokens"])


def critic_values(batch, values) -> torch.Tensor:
    """Values [b, s, 1] -> [b, s] aligned with the token chosen in that state (shift by one)."""
    return F.pad(values[..., 0][:, :-1], (1, 0))
