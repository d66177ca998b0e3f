"""The aligner command: help lists the commands, env reports the stack, train validates
configs before launch, unknown commands fail with a message."""
import json
import subprocess
import sys

from aligner.cli.main import SUBCOMMANDS


def _run(*args, check=False):
    return subprocess.run([sys.executable, "-W", "ignore", "-m", "aligner.cli.main", *args], capture_output=True,
                          text=True, timeout=120)


def test_help_lists_every_command():
    out = _run("--help")
    assert out.returncode == 0
    for name in SUBCOMMANDS:
        assert f"  {name} " in out.stdout


def test_env_reports_the_stack():
    import megatron.core
    import torch

    out = _run("env", "--json")
    info = json.loads(out.stdout)
    assert info["torch"] == torch.__version__ and info["megatron_core"] == megatron.core.__version__
    for key in ("python", "transformer_engine", "apex", "cuda_available", "nccl_available", "gloo_available",
                "packing_extension"):
        assert key in info
    text = _run("env").stdout
    assert "megatron_core" in text and torch.__version__ in text


def test_unknown_command_exits_2():
    out = _run("frobnicate")
    assert out.returncode == 2 and "unknown command 'frobnicate'" in out.stderr


def test_train_rejects_bad_configs_before_launch():
    out = _run("train", "sft", "--cfg", "job", "data.train=x.jsonl", "trainer.max_steps=abc")
    assert out.returncode == 2 and "trainer.max_steps" in out.stderr
    out = _run("train", "sft", "--cfg", "job", "+model.num_layrs=3")
    assert out.returncode == 2 and "num_layrs" in out.stderr
    out = _run("train", "sft", "--cfg", "job", "trainer.bogus=1")
    assert out.returncode == 2 and "trainer.bogus" in out.stderr
    out = _run("train", "nosuch")
    assert out.returncode == 2 and "no top-level config 'nosuch'" in out.stderr
    out = _run("train", "dpo", "--cfg", "job", "init.hf=/m", "data.train=p.jsonl", "parallel.tp=2", "dpo.beta=0.05")
    assert out.returncode == 0 and "beta: 0.05" in out.stdout and "tp: 2" in out.stdout
