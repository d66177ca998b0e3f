"""Knowledge-distillation divergences per token (docs/distill.md): forward KL, reverse KL
and the generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, arXiv
2306.13649, eq. 1), over the full vocabulary or over the teacher's top-k tokens.

With ``s = softmax(z_s / T)`` (student) and ``t = softmax(z_t / T)`` (teacher) at one position:

- ``forward_kl``: ``KL(t ‖ s) = Σ_v t_v (log t_v − log s_v)`` (the predecessor's ``fwd_kl``)
- ``reverse_kl``: ``KL(s ‖ t) = Σ_v s_v (log s_v − log t_v)`` (its ``bwd_kl``)
- ``jsd``: with ``m = β t + (1 − β) s``, ``β KL(t ‖ m) + (1 − β) KL(s ‖ m)``; β = 0 is
  ``forward_kl`` and β = 1 ``reverse_kl`` (TRL's ``generalized_jsd_loss`` convention)

Top-k (``topk_token_divergence``): the sum runs over the teacher's k tokens, both
distributions renormalised over them (softmax of the teacher's k logits and of the
student's logits at those ids), as the predecessor's top-k loss did: a divergence between
two distributions on the same k outcomes, 0 exactly where they agree there. With a tail
bucket (``teacher_tail``: the teacher's log-mass outside its k tokens), the distributions
are compared on k + 1 outcomes instead, not renormalised: each model's probabilities of the
k tokens over the full vocabulary and its mass on every other token as one more category
(``topk_tail_logmass``), so that mass the student moves off the teacher's k tokens is
penalised (with ``reverse_kl`` the renormalised form leaves it free).

Vocab-parallel: every function takes this tensor-parallel rank's slice of the vocabulary
``[b, s, v/p]`` and a :class:`VocabShard` that sums / maxes / concatenates over the TP
group (megatron-core's vocab-parallel cross-entropy pattern: only ``[b, s]`` statistics
and, for top-k, ``[b, s, k·p]`` candidates cross ranks; the logits are never gathered). The
default shard is the whole vocabulary on one rank, so the functions are plain torch there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

DISTILL_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _fp(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16 logits are promoted; float64, as the tests use, is kept)."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice ``[start, start + v/p)`` of the vocabulary and the TP reductions.

    sum: all-reduce SUM forward, identity backward (every TP rank computes the same loss
    from the reduced value, so each rank's gradient flows into its own slice only); max:
    all-reduce MAX, no gradient; gather: the TP ranks' ``[..., n]`` concatenated on the last
    dimension in rank order, no gradient. All identities on one rank.
    """

    start: int = 0
    sum: Callable[[torch.Tensor], torch.Tensor] = _identity
    max: Callable[[torch.Tensor], torch.Tensor] = _identity
    gather: Callable[[torch.Tensor], torch.Tensor] = _identity


WHOLE_VOCAB = VocabShard()


def shard_log_softmax(logits: torch.Tensor, shard: VocabShard = WHOLE_VOCAB) -> torch.Tensor:
    """``log softmax(logits)`` over the whole (sharded) vocabulary: [b, s, v/p] -> [b, s, v/p] fp32.

    Padded vocabulary rows (logit ``finfo.min``) get probability 0."""
    x = _fp(logits)
    top = shard.max(x.max(-1).values.detach().clone())
    shifted = x - top.unsqueeze(-1)
    log_z = shard.sum(shifted.exp().sum(-1)).log()
    return shifted - log_z.unsqueeze(-1)


def _plogp_ratio(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``p (log p − log q)`` elementwise, 0 where p = 0 (never 0 · inf)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))


def _divergence_terms(student_logps: torch.Tensor, teacher_logps: torch.Tensor, kind: str, beta: float):
    """The per-entry terms whose sum over the (sharded or top-k) support is the divergence."""
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return _plogp_ratio(teacher_logps, student_logps)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return _plogp_ratio(student_logps, teacher_logps)
    if kind != "jsd":
        raise ValueError(f"distillation divergence must be one of {DISTILL_DIVERGENCES}, got {kind!r}")
    if not 0 < beta < 1:  # 0 and 1 are the two KLs, above
        raise ValueError(f"jsd: beta = {beta}: expected in [0, 1]")
    b = torch.tensor(beta, dtype=student_logps.dtype, device=student_logps.device)
    mixture = torch.logaddexp(teacher_logps + b.log(), student_logps + torch.log1p(-b))
    return b * _plogp_ratio(teacher_logps, mixture) + (1 - b) * _plogp_ratio(student_logps, mixture)


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward_kl", *,
                     beta: float = 0.5, temperature: float = 1.0,
                     shard: VocabShard = WHOLE_VOCAB) -> torch.Tensor:
    """The ``kind`` divergence (module docstring) per position over the full vocabulary.

    student_logits (carries the graph), teacher_logits (detached here): this rank's
    ``[b, s, v/p]`` slices -> ``[b, s]`` fp32, identical on every TP rank.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits"
                         f" {tuple(teacher_logits.shape)} differ: distillation needs one vocabulary")
    if not temperature > 0:
        raise ValueError(f"temperature = {temperature}: expected > 0")
    s = shard_log_softmax(_fp(student_logits) / temperature, shard)
    t = shard_log_softmax(_fp(teacher_logits.detach()) / temperature, shard)
    return shard.sum(_divergence_terms(s, t, kind, beta).sum(-1))


def shard_topk(logits: torch.Tensor, k: int, shard: VocabShard = WHOLE_VOCAB) -> Tuple[torch.Tensor, torch.Tensor]:
    """The top-``k`` logits of the whole vocabulary and their global ids from this rank's
    ``[b, s, v/p]`` slice: each rank's k candidates are gathered (``[b, s, k·p]``), then the
    best k kept. Returns values fp32 and ids long, ``[b, s, k]``, sorted descending."""
    local_k = min(k, logits.shape[-1])
    values, ids = _fp(logits.detach()).topk(local_k, dim=-1)
    values, ids = shard.gather(values), shard.gather(ids + shard.start)
    if values.shape[-1] < k:
        raise ValueError(f"top-k: k = {k} exceeds the vocabulary ({values.shape[-1]} tokens)")
    best, where = values.topk(k, dim=-1)
    return best, ids.gather(-1, where)


def _gather_shard(values: torch.Tensor, ids: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """``values[..., ids]`` for global ``ids`` [b, s, k] from the rank's slice ``values`` [b, s, v/p]:
    each rank contributes the ids it holds, summed over the TP group (``[b, s, k]`` crosses ranks)."""
    local = ids - shard.start
    held = (local >= 0) & (local < values.shape[-1])
    picked = values.gather(-1, torch.where(held, local, torch.zeros_like(local)))
    return shard.sum(torch.where(held, picked, torch.zeros_like(picked)))


def topk_tail_logmass(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0,
                      shard: VocabShard = WHOLE_VOCAB) -> torch.Tensor:
    """``log Σ_{v ∉ ids} softmax(logits / T)_v``: the log-mass outside the global ``ids``
    ``[b, s, k]``, from this rank's ``[b, s, v/p]`` slice (only ``[b, s]`` sums cross ranks).
    Computed from the tokens outside, not as ``1 − Σ_ids``, so a small tail keeps its
    precision; a tail that underflows (the k tokens hold everything) is the smallest normal
    number, with no gradient."""
    logp = shard_log_softmax(_fp(logits) / temperature, shard)
    local = ids.long() - shard.start
    held = (local >= 0) & (local < logp.shape[-1])
    hits = torch.zeros(logp.shape, dtype=torch.long, device=logp.device)
    hits.scatter_add_(-1, torch.where(held, local, torch.zeros_like(local)), held.long())  # duplicates add up
    outside = torch.where(hits > 0, torch.full_like(logp, -math.inf), logp)
    return shard.sum(outside.exp().sum(-1)).clamp_min(torch.finfo(logp.dtype).tiny).log()


def topk_token_divergence(student_logits: torch.Tensor, topk_logits: torch.Tensor, topk_ids: torch.Tensor,
                          kind: str = "forward_kl", *, beta: float = 0.5, temperature: float = 1.0,
                          shard: VocabShard = WHOLE_VOCAB,
                          teacher_tail: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The ``kind`` divergence per position over the teacher's top-k tokens (module docstring).

    student_logits: this rank's ``[b, s, v/p]``; topk_logits / topk_ids: the teacher's ``[b, s, k]``
    (global ids, the same on every rank) -> ``[b, s]`` fp32. teacher_tail: the teacher's
    ``topk_tail_logmass`` at ``temperature`` ``[b, s]``; given, the divergence is over the k
    tokens and the tail bucket (k + 1 outcomes), else over the k tokens renormalised.
    """
    if topk_logits.shape != topk_ids.shape or topk_logits.shape[:2] != student_logits.shape[:2]:
        raise ValueError(f"top-k logits {tuple(topk_logits.shape)} / ids {tuple(topk_ids.shape)} do not match the"
                         f" student's positions {tuple(student_logits.shape[:2])}")
    if not temperature > 0:
        raise ValueError(f"temperature = {temperature}: expected > 0")
    ids = topk_ids.long()
    t = torch.log_softmax(_fp(topk_logits.detach()) / temperature, dim=-1)
    if teacher_tail is None:
        s = torch.log_softmax(_gather_shard(_fp(student_logits) / temperature, ids, shard), dim=-1)
        return _divergence_terms(s, t.to(s.dtype), kind, beta).sum(-1)
    if teacher_tail.shape != topk_logits.shape[:2]:
        raise ValueError(f"teacher tail {tuple(teacher_tail.shape)} does not match the top-k positions"
                         f" {tuple(topk_logits.shape[:2])}")
    student_logp = shard_log_softmax(_fp(student_logits) / temperature, shard)
    s = torch.cat([_gather_shard(student_logp, ids, shard),
                   topk_tail_logmass(student_logits, ids, temperature, shard).unsqueeze(-1)], dim=-1)
    tail = _fp(teacher_tail.detach()).to(s.dtype)
    # the teacher's k tokens hold 1 − e^tail, shared as its renormalised top-k distribution says
    inside = torch.log(-torch.expm1(tail)).clamp_min(math.log(torch.finfo(s.dtype).tiny))
    t = torch.cat([t.to(s.dtype) + inside.unsqueeze(-1), tail.unsqueeze(-1)], dim=-1)
    return _divergence_terms(s, t, kind, beta).sum(-1)


def distill_loss(divergence: torch.Tensor, mask: torch.Tensor, token_nll: Optional[torch.Tensor] = None, *,
                 kd_weight: float = 1.0, sft_weight: float = 0.0):
    """A micro-batch's distillation loss in sums: ``Σ mask · (kd_weight · D + sft_weight · NLL)``
    over ``[b, s]`` and the token count ``Σ mask``; the loop divides the global sums, which
    gives the per-token mean over the global batch (TRL's ``batchmean`` over label tokens).

    Returns (total, count, {"kd": Σ mask·D, "sft": Σ mask·NLL}) with the parts detached."""
    if divergence.shape != mask.shape:
        raise ValueError(f"divergence {tuple(divergence.shape)} and mask {tuple(mask.shape)} differ")
    m = mask.to(divergence.dtype)
    kd = (divergence * m).sum()
    total = kd_weight * kd
    parts = {"kd": kd.detach()}
    if token_nll is not None:
        sft = (token_nll.to(divergence.dtype) * m).sum()
        parts["sft"] = sft.detach()
        if sft_weight:
            total = total + sft_weight * sft
    elif sft_weight:
        raise ValueError("sft_weight > 0 needs the per-token NLL of the labels")
    return total, m.sum(), parts
