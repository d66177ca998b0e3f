"""Bad layouts fail before any process group exists, naming the config key and numbers;
torchrun and Slurm variables are read as documented."""
import pytest
import torch

from aligner.parallel import LayoutError, ParallelConfig, initialize, read_dist_env, validate_layout


@pytest.mark.parametrize(
    "parallel,world,dims,expected",
    [
        (ParallelConfig(tp=3), 6, dict(num_attention_heads=8), "model.num_attention_heads = 8 is not divisible by parallel.tp = 3"),
        (ParallelConfig(tp=4), 4, dict(num_attention_heads=8, num_query_groups=2), "model.num_query_groups = 2"),
        (ParallelConfig(tp=2, pp=2), 6, {}, "world size 6 is not divisible by parallel.tp * parallel.pp * parallel.cp = 2 * 2 * 1 = 4"),
        (ParallelConfig(pp=8), 8, dict(num_layers=4), "parallel.pp * parallel.vpp = 8 pipeline stages exceed model.num_layers = 4"),
        (ParallelConfig(pp=3), 3, dict(num_layers=8), "model.num_layers = 8 is not divisible by parallel.pp = 3"),
        (ParallelConfig(pp=2, vpp=3), 2, dict(num_layers=8), "model.num_layers = 8 is not divisible by parallel.pp * parallel.vpp = 6"),
        (ParallelConfig(tp=0), 1, {}, "parallel.tp must be a positive integer, got 0"),
        (ParallelConfig(backend="mpi"), 1, {}, "parallel.backend must be one of auto, nccl, gloo; got 'mpi'"),
        (ParallelConfig(ep=3), 4, {}, "parallel.ep = 3 must divide"),
    ],
)
def test_bad_layouts_name_the_key_and_numbers(parallel, world, dims, expected):
    with pytest.raises(LayoutError) as err:
        validate_layout(parallel, world, **dims)
    assert expected in str(err.value)


def test_good_layouts_give_the_data_parallel_size():
    assert validate_layout(ParallelConfig(tp=2, pp=2), 8, num_layers=4, num_attention_heads=8, num_query_groups=2) == 2
    assert validate_layout(ParallelConfig(pp=2, vpp=2), 2, num_layers=8) == 1


def test_initialize_fails_before_any_process_group(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(LayoutError, match="world size 1 is not divisible"):
        initialize(ParallelConfig(tp=2))
    with pytest.raises(LayoutError, match="8 pipeline stages exceed model.num_layers = 2"):
        initialize(ParallelConfig(pp=1, vpp=8), num_layers=2)
    assert not torch.distributed.is_initialized()


def test_read_dist_env_torchrun_slurm_single():
    e = read_dist_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "1234"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == (3, 8, 1, "10.0.0.2", 1234, "torchrun")
    s = read_dist_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                       "SLURM_JOB_NODELIST": "gpu[003-004,007],login1"})
    assert (s.rank, s.world_size, s.local_rank, s.master_addr, s.launcher) == (9, 16, 1, "gpu003", "slurm")
    assert read_dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "node7"}).master_addr == "node7"
    # torchrun variables win over Slurm's (torchrun launched inside an allocation)
    assert read_dist_env({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_NTASKS": "9"}).launcher == "torchrun"
    single = read_dist_env({})
    assert (single.rank, single.world_size, single.launcher) == (0, 1, "single")
