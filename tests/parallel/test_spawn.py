"""spawn_local: per-rank results in order; a rank that raises, dies or hangs fails the
call within its timeout, and no rank process is left behind."""
import os
import time

import multiprocessing as mp
import pytest

from aligner.parallel.spawn import SpawnError, spawn_local


def rank_and_world():
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def raise_on_rank1():
    if os.environ["RANK"] == "1":
        raise ValueError("rank one is broken")
    return "ok"


def die_on_rank0():
    if os.environ["RANK"] == "0":
        os._exit(3)
    time.sleep(60)


def hang_in_collective():
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=2)
    if os.environ["RANK"] == "0":
        dist.all_reduce(torch.ones(1))  # rank 1 never joins
    else:
        time.sleep(600)


def test_results_in_rank_order():
    assert spawn_local(rank_and_world, 3, timeout=60) == [(0, 3), (1, 3), (2, 3)]


def test_a_rank_that_raises_is_named_with_its_traceback():
    with pytest.raises(SpawnError) as err:
        spawn_local(raise_on_rank1, 2, timeout=60)
    assert "rank 1 of 2 failed" in str(err.value) and "ValueError: rank one is broken" in str(err.value)
    assert "Traceback" in str(err.value)


def test_a_rank_that_dies_fails_within_the_timeout():
    t = time.monotonic()
    with pytest.raises(SpawnError, match="rank 0 of 2 died with exit code 3"):
        spawn_local(die_on_rank0, 2, timeout=60)
    assert time.monotonic() - t < 30
    assert not mp.active_children()


def test_a_hanging_rank_fails_at_the_timeout_and_is_killed():
    t = time.monotonic()
    with pytest.raises(SpawnError, match=r"did not finish within 8 s"):
        spawn_local(hang_in_collective, 2, timeout=8)
    assert time.monotonic() - t < 8 + 15
    assert not mp.active_children()
