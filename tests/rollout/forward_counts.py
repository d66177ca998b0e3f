"""The rollout engine's forward count (prefills and decode steps) of a call, by hand from the
rules docs/rollout.md states, given every row's prompt and response length.

A *decision* picks one response token for every row still running; the first decision of a
batch reads the prefill's logits, every later one the logits of the decode step (one
forward) that fed the previous decision's tokens. A row of prompt length p and response
length r is decided r times in a row (columns p .. p + r - 1).

- **Batch by batch, fused decoder** (``continuous_batching`` false, or a call of at most
  ``slots`` rows): rows sorted by prompt length in batches of ``slots``. A batch runs one
  prefill of every prompt whole, so every row's first decision is its first response
  token; the batch makes ``max(r)`` decisions, one forward before each: ``max(r)``
  forwards per batch, whatever its prompt lengths.
- **Batch by batch, megatron-core's decode steps** (``decode_impl = megatron``, TP = 1 or
  no sequence parallelism): the prefill runs the batch's shortest prompt ``min(p)``; every
  row is decided at one column per step from there (a longer prompt's tail is fed, not
  sampled) until its longest row ends: ``max(p + r) - min(p)`` forwards.
- **Refills** (fused decoder, ``continuous_batching`` true, more rows than slots): the
  first ``slots`` rows (shortest prompts first) start as a batch (one prefill); a row of
  that batch makes its last decision at decision ``r`` (1-based). When rows end at a
  decision their slots (in slot order) take the next waiting rows; a newcomer not yet
  prefilled is prefilled with the next waiting rows, ``slots`` in all, in one forward of
  every prompt but its last token (none when each of them is one token long); the
  newcomer's last prompt token is fed in the decode step after the decision its slot
  freed at, so its decisions are the next r ones. The call runs until its last row ends;
  every decision but the last is followed by a decode step.
"""
from __future__ import annotations

from typing import Sequence


def _batches(plen: Sequence[int], slots: int):
    order = sorted(range(len(plen)), key=lambda i: plen[i])  # stable: equal prompts keep their order
    return [order[k:k + slots] for k in range(0, len(order), slots)]


def batch_forwards(plen: Sequence[int], rlen: Sequence[int], slots: int) -> int:
    """Batch by batch with the fused decoder."""
    return sum(max(rlen[i] for i in batch) for batch in _batches(plen, slots))


def megatron_batch_forwards(plen: Sequence[int], rlen: Sequence[int], slots: int) -> int:
    """Batch by batch with megatron-core's decode steps."""
    return sum(max(plen[i] + rlen[i] for i in batch) - min(plen[i] for i in batch)
               for batch in _batches(plen, slots))


def refill_forwards(plen: Sequence[int], rlen: Sequence[int], slots: int) -> int:
    n = len(plen)
    if n <= slots:
        return batch_forwards(plen, rlen, slots)
    order = sorted(range(n), key=lambda i: plen[i])
    first, waiting = order[:slots], order[slots:]
    forwards = 1  # the first batch's prefill
    last = [rlen[i] for i in first]  # the decision (1-based) of each slot's last token
    running = set(range(slots))
    staged = set()  # waiting rows already prefilled
    while waiting:
        decision = min(last[j] for j in running)
        done = sorted(j for j in running if last[j] == decision)
        newcomers, waiting = waiting[:len(done)], waiting[len(done):]
        missing = [i for i in newcomers if i not in staged]
        if missing:
            group = missing + [i for i in waiting if i not in staged][:slots - len(missing)]
            forwards += max(plen[i] for i in group) > 1
            staged.update(group)
        for j, i in zip(done, newcomers):
            staged.discard(i)
            last[j] = decision + rlen[i]
        running -= set(done[len(newcomers):])
    return forwards + max(last[j] for j in running) - 1
