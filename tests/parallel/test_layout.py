"""Bad layouts fail before any process group exists, naming the config key and numbers;
torchrun and Slurm variables are read as documented."""
import pytest
import torch

from aligner.parallel import LayoutError, ParallelConfig, initialize, read_dist_env, validate_layout


@pytest.mark.parametrize(
    "parallel,world,dims,expected",
    [
        (ParallelConfig(tp=3), 6, dict(num_attention_heads=8),
         "model.num_attention_heads = 8 is not divisible by parallel.tp = 3"),
        (ParallelConfig(tp=4), 4, dict(num_attention_heads=8, num_query_groups=2),
         "model.num_query_groups = 2 (key/value heads) is not divisible by parallel.tp = 4"),
        (ParallelConfig(tp=2, pp=2), 6, {},
         "world size 6 is not divisible by parallel.tp * parallel.pp * parallel.cp = 2 * 2 * 1 = 4"),
        (ParallelConfig(tp=2, cp=2), 2, {},
         "world size 2 is not divisible by parallel.tp * parallel.pp * parallel.cp = 2 * 1 * 2 = 4"),
        (ParallelConfig(pp=8), 8, dict(num_layers=4),
         "parallel.pp * parallel.vpp = 8 pipeline stages exceed model.num_layers = 4"),
        (ParallelConfig(pp=2, vpp=4), 2, dict(num_layers=6),
         "parallel.pp * parallel.vpp = 8 pipeline stages exceed model.num_layers = 6"),
        (ParallelConfig(pp=3), 3, dict(num_layers=8), "model.num_layers = 8 is not divisible by parallel.pp = 3"),
        (ParallelConfig(pp=2, vpp=3), 2, dict(num_layers=8),
         "model.num_layers = 8 is not divisible by parallel.pp * parallel.vpp = 6"),
        (ParallelConfig(pp=1, vpp=2), 1, dict(num_layers=8),
         "parallel.vpp = 2 (virtual pipeline stages) needs pipeline parallelism, but parallel.pp = 1"),
        (ParallelConfig(pp=2, vpp=0), 2, {}, "parallel.vpp must be a positive integer or null, got 0"),
        (ParallelConfig(tp=0), 1, {}, "parallel.tp must be a positive integer, got 0"),
        (ParallelConfig(pp=-2), 1, {}, "parallel.pp must be a positive integer, got -2"),
        (ParallelConfig(tp="2"), 2, {}, "parallel.tp must be a positive integer, got '2'"),
        (ParallelConfig(backend="mpi"), 1, {}, "parallel.backend must be one of auto, nccl, gloo; got 'mpi'"),
        (ParallelConfig(ep=3), 4, {}, "parallel.ep = 3 must divide data-parallel x context-parallel size 4 * 1 = 4"),
        (ParallelConfig(ep=2), 2, dict(num_experts=3), "model.num_experts = 3 is not divisible by parallel.ep = 2"),
        (ParallelConfig(tp=4), 4, dict(vocab_size=3), "model.vocab_size = 3 is smaller than parallel.tp = 4"),
        (ParallelConfig(tp=2), 2, dict(num_experts=4, sequence_parallel=False),
         "model.num_experts = 4 at parallel.tp = 2 needs parallel.sequence_parallel = true"),
    ],
)
def test_bad_layouts_name_the_key_and_numbers(parallel, world, dims, expected):
    with pytest.raises(LayoutError) as err:
        validate_layout(parallel, world, **dims)
    assert expected in str(err.value)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    "parallel,world,dims,dp",
    [
        (ParallelConfig(), 1, dict(num_layers=2, num_attention_heads=4), 1),
        (ParallelConfig(tp=2, pp=2), 8, dict(num_layers=4, num_attention_heads=8, num_query_groups=2), 2),
        (ParallelConfig(tp=8, pp=2), 64, dict(num_layers=80, num_attention_heads=64, num_query_groups=8), 4),
        (ParallelConfig(pp=2, vpp=2), 2, dict(num_layers=8), 1),
        (ParallelConfig(pp=4, vpp=5), 12, dict(num_layers=80), 3),
        (ParallelConfig(tp=2, cp=2), 8, dict(num_attention_heads=4), 2),
        (ParallelConfig(ep=4), 4, dict(num_experts=8), 4),
        (ParallelConfig(tp=2), 2, dict(num_experts=4, sequence_parallel=True), 1),
        (ParallelConfig(pp=4), 4, dict(num_layers=4), 1),  # one layer per stage is allowed
    ],
)
def test_good_layouts_give_the_data_parallel_size(parallel, world, dims, dp):
    assert validate_layout(parallel, world, **dims) == dp


def test_initialize_fails_before_any_process_group(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    assert not torch.distributed.is_initialized()
    with pytest.raises(LayoutError, match=r"world size 1 is not divisible by .* = 2 \* 1 \* 1 = 2"):
        initialize(ParallelConfig(tp=2))
    assert not torch.distributed.is_initialized()
    with pytest.raises(LayoutError, match="model.num_attention_heads = 6 is not divisible by parallel.tp = 4"):
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "4")
        initialize(ParallelConfig(tp=4), num_attention_heads=6)
    assert not torch.distributed.is_initialized()
    with pytest.raises(LayoutError, match="parallel.pp \\* parallel.vpp = 8 pipeline stages exceed model.num_layers = 2"):
        monkeypatch.setenv("WORLD_SIZE", "4")
        initialize(ParallelConfig(pp=4, vpp=2), num_layers=2)
    assert not torch.distributed.is_initialized()
    with pytest.raises(LayoutError, match="parallel.vpp = 3 .* parallel.pp = 1"):
        initialize(ParallelConfig(vpp=3, tp=4), num_layers=6)
    assert not torch.distributed.is_initialized()
    # a bad launcher variable is named before anything starts
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK = 4 is not a rank of a world of WORLD_SIZE = 4"):
        initialize(ParallelConfig())
    assert not torch.distributed.is_initialized()


def test_read_dist_env_torchrun():
    e = read_dist_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.2",
                       "MASTER_PORT": "1234"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == (
        3, 8, 1, "10.0.0.2", 1234, "torchrun")
    d = read_dist_env({"RANK": "0", "WORLD_SIZE": "2"})  # defaults for the optional variables
    assert (d.local_rank, d.master_addr, d.master_port) == (0, "127.0.0.1", 29500)
    # torchrun variables win over Slurm's (torchrun launched inside an allocation)
    t = read_dist_env({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_NTASKS": "9"})
    assert (t.rank, t.world_size, t.launcher) == (1, 2, "torchrun")


@pytest.mark.parametrize(
    "nodelist,first",
    [
        ("node[01-04]", "node01"),
        ("node[1-4]", "node1"),
        ("gpu[003-004,007],login1", "gpu003"),
        ("dgx[7,9-12]", "dgx7"),
        ("node7", "node7"),
        ("a01,a02", "a01"),
        ("rack[2-3]-n[08-09]-ib", "rack2-n08-ib"),
    ],
)
def test_read_dist_env_slurm_node_lists(nodelist, first):
    s = read_dist_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NODELIST": nodelist})
    assert (s.rank, s.world_size, s.local_rank, s.master_addr, s.master_port, s.launcher) == (
        9, 16, 1, first, 29500, "slurm")


def test_read_dist_env_slurm_precedence_and_single():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "b[5-6]", "SLURM_JOB_NODELIST": "a[1-4]",
           "SLURM_STEP_NODELIST": "c[2-3]"}
    assert read_dist_env(env).master_addr == "c2"  # the step's nodes, then the job's, then SLURM_NODELIST
    del env["SLURM_STEP_NODELIST"]
    assert read_dist_env(env).master_addr == "a1"
    env.update(MASTER_ADDR="head", MASTER_PORT="4000")  # set by the sbatch script: used as given
    assert (read_dist_env(env).master_addr, read_dist_env(env).master_port) == ("head", 4000)
    single = read_dist_env({"MASTER_PORT": "5555"})
    assert (single.rank, single.world_size, single.local_rank, single.master_port, single.launcher) == (
        0, 1, 0, 5555, "single")


@pytest.mark.parametrize(
    "env,message",
    [
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK = 'x' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK = 2 is not a rank of a world of WORLD_SIZE = 2"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "a"}, "SLURM_LOCALID = 'a' is not an integer"),
        ({"SLURM_PROCID": "7", "SLURM_NTASKS": "4"}, "SLURM_PROCID = 7 is not a rank of a world of SLURM_NTASKS = 4"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_NODELIST": "n[1-2"}, "SLURM_NODELIST = 'n[1-2' is not a Slurm node list"),
    ],
)
def test_read_dist_env_names_a_bad_variable(env, message):
    with pytest.raises(ValueError) as err:
        read_dist_env(env)
    assert message in str(err.value)
