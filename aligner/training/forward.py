"""Forward-only passes over token rows on a role's chunks, through megatron-core's schedule
(any TP / PP layout): the per-token outputs online algorithms and evaluation read
(log-probs of the sampled tokens, a critic's values).

Per-token tensors are aligned with the token they score: position ``p`` holds
``log π(tokens[p] | tokens[<p])`` and the value of the state ``tokens[<p]`` in which
``tokens[p]`` was chosen. Shapes: n rows, S positions.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from aligner.training.batching import shifted_logprobs


def collect_token_outputs(run_schedule, chunks, tokens: torch.Tensor, micro_batch_size: int, per_token,
                          from_last_stage) -> torch.Tensor:
    """``per_token(batch, output) -> [b, S]`` over every row of ``tokens`` [n, S] in a
    forward-only schedule over ``chunks``; [n, S] fp32 on every pipeline stage.

    The last micro-batch is filled with copies of row 0 (fixed shapes for the pipeline)."""
    n, s = tokens.shape
    micro = []
    for start in range(0, n, micro_batch_size):
        rows = tokens[start:start + micro_batch_size]
        real = rows.shape[0]
        if real < micro_batch_size:
            rows = torch.cat([rows, tokens[:1].expand(micro_batch_size - real, s)])
        micro.append({"tokens": rows, "position_ids": None, "attention_mask": None, "real": real})
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
    """The model on a micro-batch of the batching format (tokens, positions, mask)."""
    return model(batch["tokens"], batch["position_ids"], batch["attention_mask"])


def policy_logps(batch, logits) -> torch.Tensor:
    """Per-token log-probs of ``batch["tokens"]`` (aligned: position p scores token p)."""
    return shifted_logprobs(logits, batch["tokens"])


def critic_values(batch, values) -> torch.Tensor:
    """Values [b, s, 1] -> [b, s] aligned with the token chosen in that state (shift by one)."""
    return F.pad(values[..., 0][:, :-1], (1, 0))
