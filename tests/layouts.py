"""Several layouts of one world size in one spawned job: ``in_turn(run, calls)``.

A spawned job pays for its processes' start (torch and megatron-core imported, gloo set
up); layouts of the same world size (TP=2, PP=2, DP=2 on two ranks) can share one job,
megatron-core's parallel state re-initialised between them.
"""
from __future__ import annotations


def in_turn(run, calls):
    """``{tag: run(*args)}`` for each ``(tag, *args)`` of ``calls``, one after another in the
    calling processes, megatron-core's parallel state destroyed before each call that finds it
    initialised (``run`` initialises the layout it is given)."""
    from megatron.core import parallel_state as ps

    out = {}
    for tag, *args in calls:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        out[tag] = run(*args)
    return out
