"""Forward-only passes over token rows on a role's chunks, through megatron-core's schedule
(any TP / PP layout): the per-token outputs online algorithms and evaluation read
(log-probs of the sampled tokens, a critic's values).

Per-token tensors are aligned with the token they score: position ``p`` holds
``log π(tokens[p] | tokens[<p])`` and the value of the state ``tokens[<p]`` in which
``tokens[p]`` was chosen. Shapes: n rows, S positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from aligner.models.gpt import unwrap_model
from aligner.models.moe import clear_replay, padding_mask, replay_routing
from aligner.parallel import padded_length
from aligner.training.batching import packed_row_microbatches, shifted_logprobs, unpack_rows


def packed_rows(tokens: torch.Tensor, lengths: Optional[Sequence[int]], micro_batch_size: int,
                token_budget: Optional[int] = None) -> Optional[List[dict]]:
    """Packed micro-batches of the rows of ``tokens`` [n, S] (row i: its first
    ``lengths[i]`` tokens; :func:`aligner.training.batching.packed_row_microbatches`) of
    ``token_budget`` tokens each (rounded down to whole rows of S, at least one; default:
    ``micro_batch_size`` rows, the padded micro-batch's size), or None where they would not
    hold fewer positions than the padded micro-batches (packing saves nothing: every
    sample near S tokens). The caller decides whether its model may pack (an MoE model's
    passes stay padded: the online core's ``packed`` setting). Without pipeline stages
    (no fixed activation shape) the last micro-batch holds only its own rows."""
    if lengths is None or len(lengths) == 0:
        return None
    n, s = tokens.shape
    bins_per_micro = max(1, (token_budget or micro_batch_size * s) // s)
    fill = pipeline_stages() > 1
    micro = packed_row_microbatches([int(x) for x in lengths], s, bins_per_micro, tokens, fill=fill)
    rows = sum(int(b["tokens"].shape[0]) for b in micro)
    return micro if rows < math.ceil(n / micro_batch_size) * micro_batch_size else None


def trimmed_rows(tokens: torch.Tensor, lengths: Optional[Sequence[int]], micro_batch_size: int) -> Optional[List[dict]]:
    """Without pipeline stages (micro-batches may differ in shape): the rows of ``tokens``
    [n, S] (row i: its first ``lengths[i]`` tokens, right-padded) in order of length
    (stable), ``micro_batch_size`` per micro-batch, each cut to its own longest row rounded
    up as a rollout pads (:func:`aligner.parallel.padded_length`, at most S): the padded
    rows, fewer pad columns. Each: ``tokens`` [k, w], ``position_ids`` / ``attention_mask``
    None (causal attention, exact for right padding) and ``rows`` [k] (the indices into
    ``tokens``). None with pipeline stages or without lengths."""
    if lengths is None or len(lengths) == 0 or pipeline_stages() > 1:
        return None
    n, s = tokens.shape
    ends = torch.as_tensor([int(x) for x in lengths], dtype=torch.long)
    order = torch.sort(ends, stable=True).indices
    out = []
    for start in range(0, n, micro_batch_size):
        rows = order[start:start + micro_batch_size]
        width = min(s, padded_length(int(ends[rows].max())))
        out.append({"tokens": tokens[rows, :width], "position_ids": None, "attention_mask": None, "rows": rows})
    return out


@dataclass(frozen=True)
class PassCost:
    """The estimated work of a forward over a micro-batch, in model FLOPs (on causal rows
    the count of ``benchmarks/flops.py``, the output layer over the padded vocabulary):

        cost(batch [k, w]) = k * (position * w + pair * pairs(w))

    position: FLOPs per token position, 2 per parameter that multiplies it (the q/k/v/o
    projections, the MLP's matrices, the output layer or score head); pair: FLOPs per
    query-key pair over all layers, ``4 * heads * head_dim`` per layer (q·k and the
    weighted sum of values). pairs(w): a row without a mask runs the causal kernel, which
    skips the keys after each query, ``w (w + 1) / 2``; a row with a mask (packed rows'
    block-diagonal mask) computes every pair, ``w²``. Only the ratio of the two weights
    decides between micro-batchings; sliding windows, which cap the pairs of both, are not
    counted."""

    position: float
    pair: float

    def microbatch(self, batch: dict) -> float:
        k, w = batch["tokens"].shape
        pairs = w * w if batch.get("attention_mask") is not None else w * (w + 1) // 2
        return float(k) * (self.position * w + self.pair * pairs)

    def microbatches(self, micro: Sequence[dict]) -> float:
        return sum(self.microbatch(b) for b in micro)


def pass_cost(model) -> PassCost:
    """The :class:`PassCost` of a model (a chunk or a list of chunks, wrapped or not), from
    its whole :class:`aligner.models.config.ModelConfig` (every layer, the padded vocabulary:
    the same on every rank). An MoE layer counts its routed experts' FFNs (top-k) and its
    shared expert."""
    chunk = unwrap_model(model[0] if isinstance(model, (list, tuple)) else model)
    cfg = chunk.model_cfg
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_query_groups * cfg.head_dim
    ffn = cfg.ffn_hidden_size * (cfg.moe_router_topk or 1) if cfg.num_experts else cfg.ffn_hidden_size
    ffn += cfg.moe_shared_expert_size or 0
    mlp_matrices = 3 if chunk.config.gated_linear_unit else 2  # SwiGLU / GeGLU: gate, up, down
    per_layer = cfg.hidden_size * (q + 2 * kv) + q * cfg.hidden_size + mlp_matrices * cfg.hidden_size * ffn
    outputs = chunk.num_outputs if getattr(chunk, "head_type", None) else cfg.padded_vocab_size()
    params = cfg.num_layers * per_layer + cfg.hidden_size * outputs
    return PassCost(position=2.0 * params, pair=4.0 * cfg.num_layers * q)


def length_microbatches(tokens: torch.Tensor, lengths: Optional[Sequence[int]], micro_batch_size: int,
                        token_budget: Optional[int] = None, *, cost: PassCost) -> Optional[List[dict]]:
    """Micro-batches of the rows of ``tokens`` [n, S] (real tokens: ``lengths``) of the least
    estimated work (``cost``, :class:`PassCost`: linear work per position plus attention
    query-key pairs): rows sorted by length and cut to each micro-batch's longest
    (:func:`trimmed_rows`, no pipeline stages; the causal kernel, no mask) or packed rows
    (:func:`packed_rows`; fewer positions, but every query-key pair of a packed row is
    computed through its block-diagonal mask), the first on a tie; None where neither
    applies (the caller's padded micro-batches). A micro-batch with ``unpack_index`` is
    packed; one without holds ``rows`` right-padded to its own width."""
    options = [m for m in (trimmed_rows(tokens, lengths, micro_batch_size),
                           packed_rows(tokens, lengths, micro_batch_size, token_budget)) if m is not None]
    if not options:
        return None
    return min(options, key=cost.microbatches)


def pipeline_stages() -> int:
    """Pipeline stages of this layout (1: micro-batches may differ in shape)."""
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_world_size()


def collect_token_outputs(run_schedule, chunks, tokens: torch.Tensor, micro_batch_size: int, per_token,
                          from_last_stage, lengths: Optional[Sequence[int]] = None,
                          token_budget: Optional[int] = None, routing: Optional[torch.Tensor] = None,
                          routing_layers: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``per_token(batch, output) -> [b, S]`` over every row of ``tokens`` [n, S] in a
    forward-only schedule over ``chunks``; [n, S] fp32 on every pipeline stage.

    lengths: the rows' real tokens (given: the micro-batches of the least estimated work
    for the model of ``chunks``, :func:`length_microbatches`: rows sorted by length and cut
    to each micro-batch's longest, or packed micro-batches of ``token_budget`` tokens; ``per_token`` then gets
    such a batch and returns one row per sample it holds, ``batch["rows"]``, as wide as
    the batch or S). The last padded micro-batch
    is filled with copies of row 0 (fixed shapes for the pipeline). routing [n, S, L, k]
    (an MoE model, with the layer numbers ``routing_layers``): the tokens go to these
    experts (:func:`forward`), on padded rows (a recorded routing is one row per sample)."""
    n, s = tokens.shape
    micro = None
    if routing is None and lengths is not None:
        micro = length_microbatches(tokens, lengths, micro_batch_size, token_budget, cost=pass_cost(chunks))
    if micro is None:
        micro = []
        for start in range(0, n, micro_batch_size):
            real = min(micro_batch_size, n - start)
            idx = torch.cat([torch.arange(start, start + real), torch.zeros(micro_batch_size - real, dtype=torch.long)])
            batch = {"tokens": tokens[idx], "position_ids": None, "attention_mask": None,
                     "rows": torch.arange(start, start + real)}
            if routing is not None:
                batch["routing"], batch["routing_layers"] = routing[idx], routing_layers
            micro.append(batch)
    collected: List[torch.Tensor] = []
    held: List[torch.Tensor] = []

    def loss(batch, output):
        values = per_token(batch, output).float()
        if values.shape[1] < s:  # a micro-batch cut to its longest row (trimmed_rows)
            values = F.pad(values, (0, s - values.shape[1]))
        collected.append(values[: len(batch["rows"])].detach().cpu())
        held.append(batch["rows"].cpu())
        return output.sum() * 0.0, 1, {}

    for c in chunks:
        c.eval()
    with torch.no_grad():
        run_schedule(chunks, micro, forward, loss, forward_only=True)
    result = None
    if collected:
        values = torch.cat(collected)
        result = torch.empty(n, *values.shape[1:], dtype=values.dtype)
        result[torch.cat(held)] = values
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
    """Per-token log-probs of ``batch["tokens"]`` (aligned: position p scores token p); of a
    packed batch, one row per sample it holds."""
    lp = shifted_logprobs(logits, batch["tokens"])
    return unpack_rows(lp, batch, shifted=True) if "unpack_index" in batch else lp


def critic_values(batch, values) -> torch.Tensor:
    """Values [b, s, 1] -> [b, s] aligned with the token chosen in that state (shift by one);
    of a packed batch, one row per sample it holds."""
    if "unpack_index" in batch:
        values = unpack_rows(values, batch)
    return F.pad(values[..., 0][:, :-1], (1, 0))
