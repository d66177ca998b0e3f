"""Per-token log-probabilities and entropy from vocab-parallel logits (no vocabulary gather).

``logits`` are this tensor-parallel rank's slice ``[b, s, v/p]`` (the model's output);
results are full ``[b, s]`` tensors, identical on every TP rank. Padded vocabulary rows
carry logit ``finfo.min`` (aligner.models.gpt), so they hold no probability.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy


def _tp_size() -> int:
    return ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1


def _picked(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log_probs[b, t, labels[b, t]]`` -> [b, s]."""
    return log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def token_logprobs(vocab_parallel_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log p(labels[b, t])`` under ``softmax(logits[b, t])`` -> [b, s] (fp32, differentiable).

    Without tensor parallelism one fp32 ``log_softmax`` over the vocabulary; with it,
    megatron-core's vocab-parallel cross-entropy: each TP rank reduces its own vocabulary
    slice, only [b, s] statistics cross ranks.
    """
    if vocab_parallel_logits.shape[:2] != labels.shape:
        raise ValueError(
            f"token_logprobs: logits {tuple(vocab_parallel_logits.shape)} and labels {tuple(labels.shape)}"
            " disagree on [b, s]"
        )
    if _tp_size() == 1:
        return _picked(torch.log_softmax(vocab_parallel_logits.float(), dim=-1), labels)
    # megatron-core's cross-entropy shifts its input in place: give it its own copy
    # (transpose + contiguous alone returns the caller's storage when b or s is 1).
    logits = vocab_parallel_logits.transpose(0, 1).to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    return -vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous()).transpose(0, 1)


def token_entropy(vocab_parallel_logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits[b, t])`` -> [b, s], reduced over the TP group."""
    logits = vocab_parallel_logits.float()
    group = ps.get_tensor_model_parallel_group() if ps.model_parallel_is_initialized() else None
    tp = ps.get_tensor_model_parallel_world_size() if group is not None else 1
    local_max = logits.max(dim=-1).values
    gmax = local_max.detach().clone()
    if tp > 1:
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - gmax.unsqueeze(-1)
    exp = shifted.exp()
    sum_exp = exp.sum(-1)
    # exp = 0 rows (padded vocabulary at finfo.min) contribute 0, never 0 * -inf
    sum_exp_x = torch.where(exp > 0, exp * shifted, torch.zeros_like(exp)).sum(-1)
    if tp > 1:
        from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

        sum_exp = reduce_from_tensor_model_parallel_region(sum_exp)
        sum_exp_x = reduce_from_tensor_model_parallel_region(sum_exp_x)
    # H = log Z - E[x - max] with Z = Σ exp(x - max)
    return sum_exp.log() - sum_exp_x / sum_exp


def shifted_logprobs_entropy(vocab_parallel_logits: torch.Tensor, tokens: torch.Tensor, entropy: bool = True,
                             entropy_grad: bool = False):
    """``(log-probs, entropy)`` of a causal LM's ``logits`` [b, s, v/p] for ``tokens`` [b, s],
    aligned with the token they score: position t holds ``log p(tokens[t] | tokens[<t])``
    and the entropy of that distribution (0 at t = 0); entropy None when not asked for.

    The values of :func:`token_logprobs` and :func:`token_entropy` on ``logits[:, :-1]``. Without
    tensor parallelism both come from the one ``log_softmax`` :func:`token_logprobs` takes;
    with it, from those two functions. entropy_grad: the entropy is part of the loss (else
    it is computed without autograd, for metrics only)."""
    if _tp_size() > 1 or not entropy:
        lp = F.pad(token_logprobs(vocab_parallel_logits[:, :-1].contiguous(), tokens[:, 1:].contiguous()), (1, 0))
        if not entropy:
            return lp, None
        logits = vocab_parallel_logits[:, :-1]
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            ent = token_entropy(logits if entropy_grad else logits.detach())
        return lp, F.pad(ent, (1, 0))
    lsm = torch.log_softmax(vocab_parallel_logits.float(), dim=-1)[:, :-1]
    lp = F.pad(_picked(lsm, tokens[:, 1:]), (1, 0))
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        src = lsm if entropy_grad else lsm.detach()
        p = src.exp()
        # padded vocabulary rows (logit finfo.min) have p = 0: they add 0, never 0 * -inf
        ent = -torch.where(p > 0, p * src, torch.zeros_like(p)).sum(-1)
    return lp, F.pad(ent, (1, 0))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """``Σ mask · x / Σ mask`` over ``dim`` (everything when None); float masks act as weights.

    The one masked mean of the toolkit (the losses use it too). Masked-out entries may hold
    anything, NaN included: they are selected away, not multiplied. Where nothing is
    masked in the result is 0 (not NaN) and so is its gradient.
    """
    m = mask.to(x.dtype)
    picked = torch.where(m != 0, x, torch.zeros_like(x)) * m
    total = picked.sum() if dim is None else picked.sum(dim)
    count = m.sum() if dim is None else m.sum(dim)
    return total / torch.where(count != 0, count, torch.ones_like(count))
