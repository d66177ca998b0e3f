"""Sequence packing: first-fit-decreasing of sample lengths into fixed-capacity bins.

:func:`pack_lengths` places items by decreasing length (ties by index) into the leftmost
bin that still holds them, in O(n log n) with a max segment tree over the bins' remaining
capacity. The work runs in the C++ extension ``aligner._C`` (``csrc/packing.cpp``);
:func:`ffd_python` is the same algorithm in Python (identical output), used when the
extension is not built (with a one-line warning) and as the reference in tests and
``benchmarks/bench_packing.py``.

Returns bins as lists of item indices in placement order. Packed micro-batches built from
them carry per-sample positions and a block-diagonal causal mask
(aligner.training.batching), so attention never crosses samples.
"""
from __future__ import annotations

import sys
from typing import List, Sequence

try:
    from aligner import _C
except ImportError:  # pragma: no cover - exercised on installs without a compiler
    _C = None
    print("aligner: the C++ packing extension is not built; using the Python packer", file=sys.stderr)


def _check(lengths: Sequence[int], capacity: int) -> None:
    if capacity <= 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    for i, n in enumerate(lengths):
        if not 1 <= n <= capacity:
            raise ValueError(f"item {i} has length {n}, expected 1..{capacity}")


def ffd_python(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    _check(lengths, capacity)
    n = len(lengths)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    total = sum(lengths)
    bound = max(1, min(2 * (-(-total // capacity)) + 2, n))
    size = 1
    while size < bound:
        size <<= 1
    tree = [capacity] * (2 * size)
    bins: List[List[int]] = []
    for item in order:
        length = lengths[item]
        node = 1
        while node < size:
            node <<= 1
            if tree[node] < length:
                node |= 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(item)
        tree[node] -= length
        node >>= 1
        while node:
            left, right = tree[2 * node], tree[2 * node + 1]
            tree[node] = left if left > right else right
            node >>= 1
    return bins


def pack_lengths(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Bins (lists of item indices) of first-fit-decreasing packing."""
    if _C is None:
        return ffd_python(lengths, capacity)
    import numpy as np

    arr = np.asarray(lengths, dtype=np.int64)
    if arr.size == 0:
        return []
    _, members, offsets = _C.ffd_pack(arr, int(capacity))
    members = members.tolist()
    offsets = offsets.tolist()
    return [members[offsets[b]:offsets[b + 1]] for b in range(len(offsets) - 1)]


def efficiency(lengths: Sequence[int], bins: Sequence[Sequence[int]], capacity: int) -> float:
    """Share of the bins' capacity holding tokens."""
    return sum(lengths) / (len(bins) * capacity) if bins else 1.0
