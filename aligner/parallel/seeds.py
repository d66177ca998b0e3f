"""Seeded random streams that training draws from, each a function of the run's seed and
of where it is used (docs/online_core.md, "determinism"), so that a resumed run and any
data-parallel size draw the same numbers.

A stream's generator is seeded with ``seed · RUN_STRIDE + offset``, the offset a function
of (step, epoch, round) with the strides below. Within one use the offsets are distinct for
every index a run reaches (the per-use strides exceed the inner index: epochs and rounds
stay far below them). Across uses the offsets are not disjoint: step 0's mini-batch orders
(offsets 1, 2, ...) share their seeds with the data orders of epochs 1, 2, ..., and for
some steps a prompt round's offset equals another step's mini-batch offset (the strides are
distinct primes, which keeps such coincidences rare, not absent). A shared seed there gives
two permutations of different sizes drawn for different purposes at different points of a
run, which no objective compares. RUN_STRIDE, a prime above a million, keeps the
streams of different seeds apart only while the offsets stay under it (data orders;
mini-batch orders below step 991; prompt rounds below step 114): a longer run's later
streams can share a seed with a neighbouring seed's stream, again one drawn at another
step for another purpose.
"""
from __future__ import annotations

import torch

RUN_STRIDE = 1_000_003
MINIBATCH_STEP_STRIDE = 1009  # mini-batch order: offset step · 1009 + epoch
ROUND_STEP_STRIDE = 7919  # extra prompt rounds: offset step · 7919 + round · 104729 + 17
ROUND_STRIDE = 104_729
ROUND_OFFSET = 17
ON_POLICY_STEP_STRIDE = 7927  # on-policy steps of distillation: offset step · 7927 + 29
ON_POLICY_OFFSET = 29
WINDOW_ITERATION_STRIDE = 7933  # window slots of an iterative run: offset iteration · 7933 + epoch + 31
WINDOW_OFFSET = 31


def seeded_generator(seed: int, offset: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``seed · RUN_STRIDE + offset``."""
    return torch.Generator().manual_seed(seed * RUN_STRIDE + offset)


def data_order_generator(seed: int, epoch: int) -> torch.Generator:
    """The training loop's sample order of ``epoch``."""
    return seeded_generator(seed, epoch)


def minibatch_order_generator(seed: int, step: int, epoch: int) -> torch.Generator:
    """The order of an online step's rollouts in ``epoch`` (>= 1) of its updates."""
    return seeded_generator(seed, step * MINIBATCH_STEP_STRIDE + epoch)


def prompt_round_generator(seed: int, step: int, round: int) -> torch.Generator:
    """The prompts of extra generation ``round`` (>= 1) of ``step`` (dynamic sampling)."""
    return seeded_generator(seed, step * ROUND_STEP_STRIDE + round * ROUND_STRIDE + ROUND_OFFSET)


def on_policy_generator(seed: int, step: int) -> torch.Generator:
    """Whether ``step`` of on-policy distillation trains on the student's own samples."""
    return seeded_generator(seed, step * ON_POLICY_STEP_STRIDE + ON_POLICY_OFFSET)


def window_slot_generator(seed: int, iteration: int, epoch: int) -> torch.Generator:
    """Which of its window's rows each prompt stands for in pass ``epoch`` of ``iteration``
    (:mod:`aligner.algorithms.iterative`, ``keep_previous``)."""
    return seeded_generator(seed, iteration * WINDOW_ITERATION_STRIDE + epoch + WINDOW_OFFSET)
