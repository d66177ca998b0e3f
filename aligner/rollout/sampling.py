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
and its own history, not on the batch it shares (reproducible per request). The fused
decode path draws them ahead, a block per sample at a time (:class:`SlotUniforms`): a CPU
generator's block ``torch.rand(n, dtype=float64)`` is the same numbers, in the same
order, as n single draws, so the tokens are those of one draw per step, at one call per
sample and block instead of one per sample and step.
Greedy is the argmax of the raw logits. The log-probability reported for a chosen token is
always ``log_softmax`` of the raw logits (the model's own distribution, before
temperature and filtering): what the training path computes for the same sequence.
"""
from __future__ import annotations

from typing import Optional, Sequence

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
                  top_p: float, generators: Optional[Sequence[torch.Generator]] = None,
                  uniforms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The next token of every row of ``logits`` [b, v] -> [b] int64 (see module docstring):
    each row's uniform drawn from its generator in ``generators``, or given (``uniforms``
    [b] float64, drawn ahead from the same generators: :class:`SlotUniforms`)."""
    if greedy:
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits, temperature, top_k, top_p)
    if uniforms is None:
        uniforms = draw_uniforms(generators, logits.device)
    return sample_from_logits(filtered, uniforms)


class SlotUniforms:
    """The uniforms of the samples in a batch's slots, drawn ``block`` at a time from each
    sample's own generator (seeded when the sample takes its slot): :meth:`draw` gives
    every slot its sample's next uniform, exactly the number one ``torch.rand((),
    generator=g, dtype=float64)`` per step would give (see the module docstring).

    Every slot draws one uniform per call (every slot decides a token at every step). Per
    call: one gather from the [slots, block] table and one increment; a slot's next block
    is drawn when its block runs out (a Python-side count, no host sync)."""

    def __init__(self, block: int, device):
        if block < 1:
            raise ValueError(f"SlotUniforms block = {block}: expected a positive integer")
        self.block = int(block)
        self.device = device
        self.generators: list = []
        self.table = torch.empty((0, self.block), dtype=torch.float64, device=device)
        self.offset = torch.zeros(0, dtype=torch.int64, device=device)  # each slot's next column
        self.due: list = []  # per slot: the draw count at which its block runs out
        self.draws = 0  # calls of draw so far
        self._base = torch.zeros(0, dtype=torch.int64, device=device)

    def _fill(self, slot: int) -> None:
        self.table[slot] = torch.rand(self.block, generator=self.generators[slot], dtype=torch.float64).to(
            self.device)
        self.offset[slot] = 0
        self.due[slot] = self.draws + self.block

    def reset(self, seeds: Sequence[int]) -> None:
        """One slot per seed, each with a fresh generator."""
        b = len(seeds)
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.table = torch.stack([torch.rand(self.block, generator=g, dtype=torch.float64)
                                  for g in self.generators]).to(self.device)
        self.offset = torch.zeros(b, dtype=torch.int64, device=self.device)
        self.due = [self.block] * b
        self.draws = 0
        self._base = torch.arange(b, dtype=torch.int64, device=self.device) * self.block

    def assign(self, slot: int, seed: int) -> None:
        """Slot ``slot`` now holds a new sample: a fresh generator seeded with ``seed``."""
        self.generators[slot] = torch.Generator().manual_seed(int(seed))
        self._fill(slot)

    def keep(self, keep: torch.Tensor) -> None:
        """Only the slots ``keep`` [b'] (ascending) remain, in that order."""
        kept = keep.tolist()
        self.generators = [self.generators[j] for j in kept]
        self.due = [self.due[j] for j in kept]
        self.table = self.table.index_select(0, keep)
        self.offset = self.offset.index_select(0, keep)
        self._base = torch.arange(len(kept), dtype=torch.int64, device=self.device) * self.block

    def draw(self) -> torch.Tensor:
        """Every slot's next uniform -> [slots] float64."""
        if self.due and min(self.due) <= self.draws:
            for j, due in enumerate(self.due):
                if due <= self.draws:
                    self._fill(j)
        u = self.table.view(-1).index_select(0, self._base + self.offset)
        self.offset += 1
        self.draws += 1
        return u


def chosen_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[row, tokens[row]]`` in fp32 on raw logits [b, v] -> [b]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
