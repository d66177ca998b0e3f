"""Model FLOPs of a Llama-family decoder and the machine's measured matmul peak.

Model FLOPs count the arithmetic the model itself needs, whatever the implementation
does (no padding, no recomputation, no masked-out attention), for a sequence of n tokens:

    forward(n) = 2 * P * n + 2 * L * q * n * (n + 1)

- ``P``: parameters that multiply activations (q/k/v/o projections, the SwiGLU MLP's three
  matrices, the output layer; not embeddings' lookup, norms or biases), 2 FLOPs each
  per token;
- attention: token i (1-based) attends to i keys under the causal mask; q·k and the
  weighted sum of values cost 2 * q * i each per layer, where q = heads * head_dim,
  summed over i = 1..n.

Training is 3 x forward (the backward pass costs twice the forward). A generation step at
context length c costs ``2 * P + 4 * L * q * c``. Used by the CPU benchmarks and the GPU
suite, which report model FLOP/s against a peak measured in the same run
(:func:`matmul_peak`).
"""
from __future__ import annotations

import time
from typing import Iterable


def matmul_params(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, head_dim: int, vocab: int) -> int:
    """P: parameters used in matrix multiplies per token (see the module docstring)."""
    q, kv = heads * head_dim, kv_heads * head_dim
    per_layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * ffn
    return layers * per_layer + hidden * vocab


def dims_of(cfg) -> dict:
    """The dimensions from an aligner ``ModelConfig`` or a transformers config."""
    if hasattr(cfg, "ffn_hidden_size"):  # aligner ModelConfig
        return dict(hidden=cfg.hidden_size, ffn=cfg.ffn_hidden_size, layers=cfg.num_layers,
                    heads=cfg.num_attention_heads, kv_heads=cfg.num_query_groups, head_dim=cfg.head_dim,
                    vocab=cfg.vocab_size)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return dict(hidden=cfg.hidden_size, ffn=cfg.intermediate_size, layers=cfg.num_hidden_layers,
                heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
                head_dim=head_dim, vocab=cfg.vocab_size)


def forward_flops(cfg, lengths: Iterable[int]) -> float:
    """Model FLOPs of one forward pass over sequences of the given lengths."""
    d = dims_of(cfg)
    p = matmul_params(**d)
    q = d["heads"] * d["head_dim"]
    return float(sum(2 * p * n + 2 * d["layers"] * q * n * (n + 1) for n in lengths))


def training_flops(cfg, lengths: Iterable[int]) -> float:
    """Forward + backward: 3 x :func:`forward_flops`."""
    return 3.0 * forward_flops(cfg, lengths)


def generation_flops(cfg, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Greedy generation of ``new_tokens`` per row after a ``prompt_len`` prefill: the prefill
    through the layers, then per new token one step at its context length (the output layer
    once per generated token)."""
    d = dims_of(cfg)
    layer_p = matmul_params(**{**d, "vocab": 0})
    head_p = d["hidden"] * d["vocab"]
    q = d["heads"] * d["head_dim"]
    prefill = 2 * layer_p * prompt_len + 2 * d["layers"] * q * prompt_len * (prompt_len + 1)
    steps = 0.0
    for t in range(new_tokens):
        steps += 2 * head_p  # the token chosen at this step
        if t + 1 < new_tokens:  # its own pass through the layers feeds the next step
            steps += 2 * layer_p + 4 * d["layers"] * q * (prompt_len + t + 1)
    return float(batch * (prefill + steps))


def matmul_peak(threads: int | None = None, n: int = 1024, repeats: int = 20, dtype=None, device="cpu",
                clock=time.perf_counter) -> float:
    """The fastest fp32 (or ``dtype``) ``n x n`` matrix multiply rate seen in ``repeats``
    tries, in FLOP/s (2 n^3 per product): the machine's practical peak for this run.
    clock: ``time.process_time`` gives the rate per CPU-second of this process (a peak that
    other processes' load does not lower; CPU only)."""
    import torch

    dtype = dtype or torch.float32
    if threads:
        torch.set_num_threads(threads)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    best = float("inf")
    for _ in range(3):
        a @ b  # warm-up
    sync()
    for _ in range(repeats):
        t0 = clock()
        a @ b
        sync()
        best = min(best, clock() - t0)
    return 2.0 * n ** 3 / best


def flops_line(name: str, flops: float, seconds: float, peak: float) -> str:
    rate = flops / seconds
    return f"{name}: {rate / 1e9:.1f} GFLOP/s of model FLOPs = {100 * rate / peak:.0f}% of the measured matmul peak"
