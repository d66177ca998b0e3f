"""The launch scripts under a real Slurm: a one-node cluster on this machine (localhost
only; see local_slurm.py) runs examples/launch/slurm_multi_node.sbatch in both launch
modes and examples/launch/torchrun_single_node.sh, as a user would submit them, with
``--gpus-per-node=0`` and ``GPUS_PER_NODE`` standing for the GPUs this CPU node lacks
(gloo ranks).

Every run trains the tiny model on a tiny generated SFT set for a few steps. Each case
checks the job's final state, the training steps in ``metrics.jsonl``, the world size the
checkpoint was written by, the HF export (loaded by transformers), and the mode of every
file and folder of the run under the submitter's umask; torchrun jobs also count their
torchrun agents (one per node) from the agents' INFO log. The launchers are compared with
each other: at the same layout, srun and torchrun runs log the same losses and export the
same tensors. Shapes that do not match the allocation fail before any rank starts.

Skipped, with the reason, only where Slurm cannot be installed or started
(``ALIGNER_REQUIRE_SLURM=1`` turns that skip into a failure).
"""
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

from tests.launch.local_slurm import LocalSlurm, SlurmStartError, free_port, install_reason

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "examples" / "launch" / "slurm_multi_node.sbatch"
SINGLE_NODE = REPO / "examples" / "launch" / "torchrun_single_node.sh"
STEPS = 3
UMASK = 0o027  # the jobs' umask: files 0640, folders 0750
ONE_TASK_PER_GPU = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]
ONE_TASK_PER_NODE = ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2", "--gpus-per-node=0"]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "GPUS_PER_NODE", "LAUNCH", "CONFIG", "OVERRIDES", "OUT_DIR", "NPROC", "TP", "PP",
                 "VPP", "PORT", "CONTAINER", "MOUNTS", "OMP_NUM_THREADS")


def _unavailable(reason):
    if os.environ.get("ALIGNER_REQUIRE_SLURM") == "1":
        pytest.fail(f"ALIGNER_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = install_reason()
    if reason:
        _unavailable(f"no local Slurm: {reason}")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmStartError as exc:
        _unavailable(f"the local Slurm did not start: {exc}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def submit_dir(tmp_path_factory):
    """The folder jobs are submitted from, with a tiny world (64 SFT rows and its
    tokenizer) in ``world/``."""
    from aligner.data.world import synthesize

    folder = tmp_path_factory.mktemp("submit")
    synthesize(folder / "world", n_sft=200, n_sft_val=8, n_regression=100, n_pairs=100, n_pairs_val=4,
               n_heldout=4, n_rewardbench=4)
    rows = (folder / "world" / "sft_train.jsonl").read_text().splitlines()[:64]
    (folder / "world" / "sft64.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def job_env(tmp_path_factory):
    """The submitter's environment: this interpreter as ``python`` and ``torchrun`` first
    on PATH, this checkout first on PYTHONPATH, gloo on the loopback interface, and no
    launcher or script variables inherited from the shell that runs the tests."""
    bin_dir = tmp_path_factory.mktemp("bin")
    for name, module in (("python", ()), ("torchrun", ("-m", "torch.distributed.run"))):
        # a script, not a symlink: a venv's interpreter finds its site-packages from its own path
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" {" ".join(module)} "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k not in LAUNCHER_VARS}
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["GLOO_SOCKET_IFNAME"] = "lo"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _overrides(steps=STEPS):
    """The tiny run: the tiny model (conf/model/tiny.yaml) on 64 rows, batches of 4."""
    return ["data.train=world/sft64.jsonl", "data.tokenizer=world/tokenizer.model", "data.max_length=64",
            f"trainer.max_steps={steps}", "trainer.global_batch_size=4", "trainer.micro_batch_size=2",
            "trainer.progress=false", "trainer.tensorboard=false"]


def _sbatch(slurm, submit_dir, job_env, sbatch_args, launch, gpus_per_node="2", steps=STEPS, tp=2, run="run"):
    env = dict(job_env, LAUNCH=launch, CONFIG="sft", MASTER_PORT=str(free_port()),
               OUT_DIR=f"runs/{run}", OVERRIDES=" ".join(_overrides(steps) + [f"parallel.tp={tp}"]))
    if gpus_per_node is not None:
        env["GPUS_PER_NODE"] = gpus_per_node
    return slurm.submit(SBATCH, sbatch_args, env, cwd=submit_dir, umask=UMASK)


def _train_steps(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def _hf_tensors(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "hf" / "model.safetensors"))


def _check_run(job, run_dir, steps=STEPS, world_size=2):
    """The checks every successful job passes: it COMPLETED with exit 0, logged each of
    ``steps`` training steps once, its last checkpoint was written by ``world_size``
    ranks, transformers loads the export, and every path of the run follows the umask."""
    assert (job.state, job.exit_code) == ("COMPLETED", "0:0"), job.output[-3000:]
    assert [r["step"] for r in _train_steps(run_dir)] == list(range(1, steps + 1))
    latest = json.loads((run_dir / "checkpoints" / "latest").read_text())
    extra = json.loads((run_dir / "checkpoints" / latest["dir"] / "extra.json").read_text())
    assert (latest["step"], extra["world_size"]) == (steps, world_size)
    _check_export_loads(run_dir / "hf")
    _check_modes(run_dir)


def _check_export_loads(hf_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir))
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 128  # conf/model/tiny.yaml
    assert torch.isfinite(model(torch.tensor([[1, 5, 6, 7]])).logits).all()


def _check_modes(run_dir):
    """Every file of the run (export, checkpoints, logs) is 0666 & ~umask, every folder
    0777 & ~umask: what the user's umask allows, no more and no less."""
    wrong = []
    for path in [run_dir, *run_dir.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        expected = (0o777 if path.is_dir() else 0o666) & ~UMASK
        if mode != expected:
            wrong.append(f"{path.relative_to(run_dir)}: {oct(mode)} (expected {oct(expected)})")
    assert not wrong, "\n".join(wrong)


@pytest.fixture(scope="module")
def srun_run(slurm, submit_dir, job_env):
    return _sbatch(slurm, submit_dir, job_env, ONE_TASK_PER_GPU, "srun", run="srun"), submit_dir / "runs" / "srun"


def test_srun_mode_runs_one_rank_per_gpu(srun_run):
    job, run_dir = srun_run
    _check_run(job, run_dir)
    assert "aligner: 1 node(s) x 2 GPUs per node = 2 ranks, srun" in job.output
    assert "can't honor" not in job.output


@pytest.mark.parametrize("shape", ["one task per node", "header shape: one task per GPU"])
def test_torchrun_mode_runs_one_agent_per_node(slurm, submit_dir, job_env, srun_run, shape):
    sbatch_args = ONE_TASK_PER_NODE if shape == "one task per node" else ONE_TASK_PER_GPU
    run = "torchrun-" + shape.split(":")[0].replace(" ", "-")
    job = _sbatch(slurm, submit_dir, dict(job_env, LOGLEVEL="INFO"), sbatch_args, "torchrun", run=run)
    run_dir = submit_dir / "runs" / run
    _check_run(job, run_dir)
    assert "aligner: 1 node(s) x 2 GPUs per node = 2 ranks, torchrun" in job.output
    assert job.output.count("Starting elastic_operator") == 1  # torchrun agents (each logs this at INFO)
    for symptom in ("can't honor", "RendezvousConnectionError", "RendezvousClosedError"):
        assert symptom not in job.output
    _check_same_training(srun_run[1], run_dir)


def _check_same_training(reference_dir, run_dir):
    """Same layout, same seed: the launcher must not change a single number."""
    ref, got = _train_steps(reference_dir), _train_steps(run_dir)
    assert [(r["loss"], r["grad_norm"]) for r in got] == [(r["loss"], r["grad_norm"]) for r in ref]
    ref_tensors, got_tensors = _hf_tensors(reference_dir), _hf_tensors(run_dir)
    assert sorted(got_tensors) == sorted(ref_tensors)
    for name, tensor in ref_tensors.items():
        assert got_tensors[name].equal(tensor), name


def test_resume_a_slurm_run_at_another_tp(slurm, submit_dir, job_env, srun_run):
    """The srun run (TP=2, 3 steps) continued to 5 steps at TP=1 x DP=2 by a new job."""
    _, first_dir = srun_run
    run_dir = submit_dir / "runs" / "resumed"
    previous = os.umask(UMASK)  # the copy stands for the first job's files
    try:
        shutil.copytree(first_dir, run_dir, copy_function=shutil.copyfile)
    finally:
        os.umask(previous)
    job = _sbatch(slurm, submit_dir, job_env, ONE_TASK_PER_GPU, "srun", steps=STEPS + 2, tp=1, run="resumed")
    _check_run(job, run_dir, steps=STEPS + 2)
    # resumed, not restarted: the first run's lines (their step times included) are kept
    assert _train_steps(run_dir)[:STEPS] == _train_steps(first_dir)
    assert len(list((run_dir / "checkpoints").glob("step_*"))) == 2
    config = (run_dir / "config.yaml").read_text()
    assert "tp: 1" in config


def test_torchrun_single_node_script_under_slurm(slurm, submit_dir, job_env, srun_run):
    """examples/launch/torchrun_single_node.sh as the batch script of a one-task job."""
    run_dir = submit_dir / "runs" / "single"
    env = dict(job_env, NPROC="2", TP="2", CONFIG="sft", LOGLEVEL="INFO")
    job = slurm.submit(SINGLE_NODE, ["--nodes=1", "--ntasks=1", "--cpus-per-task=2", "--gpus-per-node=0",
                                     "--output=single-%j.out"], env, cwd=submit_dir,
                       script_args=_overrides() + ["trainer.out_dir=runs/single"], umask=UMASK)
    _check_run(job, run_dir)
    assert job.output.count("Starting elastic_operator") == 1
    _check_same_training(srun_run[1], run_dir)


@pytest.mark.parametrize("launch, sbatch_args, gpus_per_node, message", [
    # srun mode: Slurm allocated 2 tasks on the node, the script would start 1 rank there
    ("srun", ONE_TASK_PER_GPU, "1", "srun mode starts one task per GPU: GPUS_PER_NODE=1"),
    # no GPU count from Slurm (no GPUs allocated) and none given: no silent default
    ("srun", ONE_TASK_PER_GPU, None, "GPUS_PER_NODE is not set"),
    ("torchrun", ONE_TASK_PER_NODE, None, "GPUS_PER_NODE is not set"),
    ("torchrun", ONE_TASK_PER_NODE, "two", "GPUS_PER_NODE must be a positive whole number, got 'two'"),
    ("mpirun", ONE_TASK_PER_GPU, "2", "LAUNCH must be srun or torchrun, got 'mpirun'"),
])
def test_mismatched_shapes_fail_before_any_rank_starts(slurm, submit_dir, job_env, launch, sbatch_args,
                                                       gpus_per_node, message):
    run = f"bad-{launch}-{gpus_per_node}"
    job = _sbatch(slurm, submit_dir, job_env, sbatch_args, launch, gpus_per_node=gpus_per_node, run=run)
    assert job.state == "FAILED" and job.exit_code == "2:0", (job.state, job.exit_code, job.output)
    assert message in job.output, job.output
    assert not (submit_dir / "runs" / run).exists()  # no rank ran
