"""Token selection for generation: greedy, temperature, top-k, top-p, seeded per sample.

Notation: b batch (rows being decided this step), v vocabulary (real rows only).

The pipeline for one step, on fp32 logits ``[b, v]``:

1. ``temperature``: logits / T;
2. ``top_k``: keep the k largest logits (0 = off);
3. ``top_p``: keep the smallest set of most likely tokens whose probability reaches p
   (a token is kept when the mass of the tokens ranked above it is < p; the top token
   is always kept);
4. draw from ``softmax`` of what is kept by inverse CDF: one uniform ``u`` in [0, 1) per
   row from that row's own ``torch.Generator``, the token is the first index whose
   cumulative probability (vocab order, float64) exceeds ``u`` times the total.

One uniform per generated token per sample means a sample's draws depend only on its seed
and its own history, not on the batch it shares (reproducible per request).
Greedy is the argmax of the raw logits. The log-probability reported for a chosen token is
always ``log_softmax`` of the raw logits (the model's own distribution, before
temperature and filtering): what the training path computes for the same sequence.
"""
from __future__ import annotations

from typing import Sequence

import torch


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p on ``logits`` [b, v]; removed tokens get ``-inf``."""
    out = logits.float()
    if temperature != 1.0:
        out = out / temperature
    vocab = out.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_above = torch.cumsum(probs, dim=-1) - probs
        remove_sorted = mass_above >= top_p
        remove_sorted[..., 0] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        out = out.masked_fill(remove, float("-inf"))
    return out


def draw_uniforms(generators: Sequence[torch.Generator], device) -> torch.Tensor:
    """One uniform in [0, 1) per row, each from its own generator -> [b] float64."""
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
    return u.to(device)


def sample_from_logits(filtered: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from ``softmax(filtered)`` [b, v] with ``uniforms`` [b] -> tokens [b].

    A token with probability 0 (``-inf`` logit) owns an empty interval and is never drawn.
    """
    probs = torch.softmax(filtered.double(), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    target = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return tokens.clamp_(max=filtered.shape[-1] - 1)


def select_tokens(logits: torch.Tensor, *, greedy: bool, temperature: float, top_k: int,
                  top_p: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """The next token of every row of ``logits`` [b, v] -> [b] int64 (see module docstring)."""
    if greedy:
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits, temperature, top_k, top_p)
    return sample_from_logits(filtered, draw_uniforms(generators, logits.device))


def chosen_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[row, tokens[row]]`` in fp32 on raw logits [b, v] -> [b]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
