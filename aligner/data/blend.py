"""Blends: several datasets drawn in given proportions, deterministically.

``BlendedDataset(datasets, weights, seed)`` is a ``Sequence`` of ``N`` samples (weights ``w``
normalised to sum to 1, dataset ``d`` holding ``n_d`` samples):

- ``N = max_d ceil(n_d / w_d)``: an epoch of the blend holds every sample of every dataset at
  least once (the one weighted furthest below its share of the rows exactly once), so no
  row is left out by the weights;
- dataset ``d`` contributes ``m_d`` of them (``floor(w_d N)``, the remainder going to the
  largest fractions): its samples in a random order drawn from ``(seed, d, pass)``, pass
  after pass (a new order each pass) when ``m_d > n_d``;
- its ``k``-th contribution sits where ``(k + 1/2) / m_d`` of the epoch falls, so every
  stretch of the sequence holds the datasets in their proportions (within one sample).

Sample ``i`` is a function of the datasets, the weights, the seed and ``i`` alone. The
training loop draws from it in its own order (a permutation per epoch, from the seed and
the epoch), so the samples a step sees are a function of seed and step, and a resumed
run draws exactly the samples an uninterrupted one draws.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Dict, List

import numpy as np

from aligner.data.datasets import longest_sequences, token_counts


class BlendedDataset(Sequence):
    """``datasets`` (sequences of samples) blended by ``weights`` (module docstring)."""

    def __init__(self, datasets: List[Sequence], weights: List[float], seed: int = 0, names=None):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("a blend needs one weight per dataset, and at least one dataset")
        if any(not w > 0 or not math.isfinite(w) for w in weights):
            raise ValueError(f"blend weights must be positive numbers, got {list(weights)}")
        self.datasets = list(datasets)
        self.sizes = [len(d) for d in self.datasets]
        total = float(sum(weights))
        self.weights = [float(w) / total for w in weights]
        self.seed = int(seed)
        n = max(math.ceil(size / w - 1e-9) for size, w in zip(self.sizes, self.weights))
        exact = [w * n for w in self.weights]
        counts = [math.floor(x) for x in exact]
        for d in sorted(range(len(counts)), key=lambda d: counts[d] - exact[d])[: n - sum(counts)]:
            counts[d] += 1
        self.counts = counts
        where = np.concatenate([(np.arange(m) + 0.5) / m for m in counts])
        order = np.argsort(where, kind="stable")
        self._dataset = np.concatenate([np.full(m, d, dtype=np.int32) for d, m in enumerate(counts)])[order]
        self._k = np.concatenate([np.arange(m, dtype=np.int64) for m in counts])[order]
        self._orders: Dict[tuple, np.ndarray] = {}
        names = names or [getattr(d, "name", f"dataset {i}") for i, d in enumerate(self.datasets)]
        self.report = {"samples": n, "blend": [
            {"file": str(name), "weight": w, "samples": m, "rows": size}
            for name, w, m, size in zip(names, self.weights, counts, self.sizes)]}

    def _order(self, d: int, p: int) -> np.ndarray:
        """Dataset ``d``'s samples in the order of pass ``p`` (kept for the passes in use)."""
        key = (d, p)
        if key not in self._orders:
            if len(self._orders) > 2 * len(self.datasets):
                self._orders.clear()
            self._orders[key] = np.random.default_rng([self.seed, d, p]).permutation(self.sizes[d])
        return self._orders[key]

    def locate(self, i: int):
        """``(dataset, sample of it)`` at position ``i``."""
        d = int(self._dataset[i])
        p, r = divmod(int(self._k[i]), self.sizes[d])
        return d, int(self._order(d, p)[r])

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of a blend of {len(self)}")
        d, j = self.locate(i)
        return dict(self.datasets[d][j], index=i)

    def where(self, i: int) -> str:
        """``file:line`` of the row sample ``i`` came from."""
        d, j = self.locate(i)
        dataset = self.datasets[d]
        return dataset.where(j) if hasattr(dataset, "where") else f"{getattr(dataset, 'name', d)} sample {j}"

    def per_position(self, per_sample: List[np.ndarray]) -> np.ndarray:
        """[N]: a per-sample array of each dataset (``per_sample[d]``), read at every position."""
        out = np.empty(len(self), dtype=np.int64)
        for d, values in enumerate(per_sample):
            at = np.flatnonzero(self._dataset == d)
            passes, rows = np.divmod(self._k[at], self.sizes[d])
            for p in np.unique(passes):
                sel = passes == p
                out[at[sel]] = np.asarray(values)[self._order(d, int(p))[rows[sel]]]
        return out

    def sample_tokens(self) -> np.ndarray:
        """[N] tokens each sample puts through the model, from the datasets' lengths."""
        return self.per_position([token_counts(d) for d in self.datasets])

    def longest_sequences(self) -> np.ndarray:
        """[N] each sample's longest sequence, from the datasets' lengths."""
        return self.per_position([longest_sequences(d) for d in self.datasets])
