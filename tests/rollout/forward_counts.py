"""The rollout engine's forward count (prefills and decode steps) of a call, by hand from the
rules docs/rollout.md states, given every row's prompt and response length (TP = 1 or no
sequence parallelism, so a prefill runs a prompt's columns uncut).

- **Batch by batch** (``continuous_batching`` false, or a call of at most ``slots`` rows):
  rows sorted by prompt length in batches of ``slots``; a batch prefills its shortest
  prompt's columns (one forward), then decides one column per step for every row still
  running (a longer prompt's tail is fed, not sampled) until its longest row ends: one
  forward per decided column after the first, ``max(p + r) - min(p)`` forwards in all.
- **Refills** (``continuous_batching`` true, more rows than slots): the first ``slots``
  rows (shortest prompts first) start as a batch (one prefill of ``c0`` = their shortest
  prompt's columns); a row decides columns ``c0 .. p + r - 1``, one a step. When rows end
  at a step their slots (in slot order) take the next waiting rows; a newcomer not yet
  prefilled is prefilled with the next waiting rows, ``slots`` in all, in one forward of
  their first ``c`` columns (``c + 1`` the shortest of their prompts; none when ``c`` is
  0); a newcomer decides columns ``c + 1 .. p + r - 1`` from the next step on (its column
  ``c`` is fed in the step that follows the one its slot freed at). The call runs until
  its last row ends; every step but the last is followed by a forward.
"""
from __future__ import annotations

from typing import Sequence


def batch_forwards(plen: Sequence[int], rlen: Sequence[int], slots: int) -> int:
    order = sorted(range(len(plen)), key=lambda i: plen[i])
    return sum(max(plen[i] + rlen[i] for i in batch) - min(plen[i] for i in batch)
               for batch in (order[k:k + slots] for k in range(0, len(order), slots)))


def refill_forwards(plen: Sequence[int], rlen: Sequence[int], slots: int) -> int:
    n = len(plen)
    if n <= slots:
        return batch_forwards(plen, rlen, slots)
    order = sorted(range(n), key=lambda i: plen[i])  # stable: equal prompts keep their order
    first, waiting = order[:slots], order[slots:]
    c0 = min(plen[i] for i in first)
    forwards = 1  # the first batch's prefill
    last_step = [plen[i] + rlen[i] - c0 for i in first]  # the step (1-based) of each slot's last decision
    running = set(range(slots))
    staged = {}  # waiting row -> the columns its prefill ran
    while waiting:
        step = min(last_step[j] for j in running)
        done = sorted(j for j in running if last_step[j] == step)
        newcomers, waiting = waiting[:len(done)], waiting[len(done):]
        missing = [i for i in newcomers if i not in staged]
        if missing:
            group = missing + [i for i in waiting if i not in staged][:slots - len(missing)]
            c = min(plen[i] for i in group) - 1
            forwards += c > 0
            staged.update({i: c for i in group})
        for j, i in zip(done, newcomers):
            last_step[j] = step + plen[i] + rlen[i] - staged.pop(i) - 1
        running -= set(done[len(newcomers):])
    return forwards + max(last_step[j] for j in running) - 1
