"""The aligner command: help lists the commands, env reports the stack, train validates
configs before launch, unknown or missing commands fail with a message (exit 2)."""
import importlib
import json
import shutil
import subprocess
import sys

import pytest

import aligner
from aligner.cli import main as cli


def _run(*args):
    return subprocess.run([sys.executable, "-m", "aligner.cli.main", *args], capture_output=True, text=True,
                          timeout=180)


def test_help_lists_every_command_with_its_description():
    out = _run("--help")
    assert out.returncode == 0 and out.stderr == ""
    lines = out.stdout.splitlines()
    assert lines[0] == "usage: aligner <command> [args...]"
    expected = {"quickstart", "train", "data", "generate", "rm", "eval", "export", "env"}
    assert set(cli.SUBCOMMANDS) == expected
    for name, (module, description) in cli.SUBCOMMANDS.items():
        assert f"  {name:<11} {description}" in lines
        assert module == name
    installed = shutil.which("aligner")  # the console script setup.py declares, when on PATH
    if installed:
        assert subprocess.run([installed, "--help"], capture_output=True, text=True, timeout=60).stdout == out.stdout


def test_version_no_arguments_and_unknown_command(capsys):
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out == f"aligner {aligner.__version__}\n"
    assert cli.main(["-V"]) == 0 and capsys.readouterr().out == f"aligner {aligner.__version__}\n"
    assert cli.main([]) == 2 and capsys.readouterr().err.startswith("usage: aligner <command>")
    assert cli.main(["frobnicate", "--x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aligner: unknown command 'frobnicate'; expected one of: quickstart, train,")
    out = _run("frobnicate")  # and through the interpreter: exit status 2, no traceback
    assert out.returncode == 2 and "unknown command 'frobnicate'" in out.stderr and "Traceback" not in out.stderr


def test_a_missing_command_module_is_reported_not_raised(monkeypatch, capsys):
    monkeypatch.setitem(cli.SUBCOMMANDS, "ghost", ("ghost_command_not_shipped", "a command this install lacks"))
    assert cli.main(["ghost", "--help"]) == 2
    err = capsys.readouterr().err
    assert err == ("aligner: the 'ghost' command is not available in this installation"
                   " (aligner.cli.ghost_command_not_shipped is missing)\n")


def test_help_of_a_command_and_its_usage_errors(capsys):
    assert cli.main(["help", "env"]) == 0
    assert capsys.readouterr().out.startswith("usage: aligner env [-h] [--json]")
    assert cli.main(["env", "--bogus"]) == 2  # argparse's usage error becomes the return code
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_env_reports_the_stack(capsys):
    import megatron.core
    import torch

    assert cli.main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__ and info["megatron_core"] == megatron.core.__version__
    assert info["aligner"] == aligner.__version__
    assert info["python"].startswith(".".join(map(str, sys.version_info[:3])))
    assert info["cuda_available"] is torch.cuda.is_available()
    assert info["gpu_count"] == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert info["gloo_available"] is torch.distributed.is_gloo_available()
    assert info["nccl_available"] is torch.distributed.is_nccl_available()
    assert info["torch_cuda_build"] == (torch.version.cuda or "none (CPU build)")
    for key in ("platform", "cpu_count", "transformer_engine", "apex", "hydra_core", "transformers", "cudnn",
                "nccl_version", "gpus", "packing_extension"):
        assert key in info, key
    try:
        importlib.import_module("aligner._C")
        assert info["packing_extension"].startswith("built")
    except ImportError:
        assert info["packing_extension"].startswith("not built")
    # the text form names the same versions, one "key  value" per line
    assert cli.main(["env"]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines["torch"] == torch.__version__ and lines["megatron_core"] == megatron.core.__version__


def test_env_reports_missing_and_broken_packages():
    from aligner.cli.env import package_version

    assert package_version("aligner_no_such_package_xyz") == "not installed"
    assert package_version("megatron.core.no_such_submodule_xyz") == "not installed"
    assert package_version("textwrap") == "installed (version unknown)"
    assert package_version("textwrap", ("pytest",)) == __import__("pytest").__version__  # falls back to metadata


def test_train_rejects_bad_configs_before_launch(capsys):
    for args, expected in [
        (["data.train=x.jsonl", "trainer.max_steps=abc"], "trainer.max_steps"),
        (["+model.num_layrs=3"], "num_layrs"),
        (["trainer.bogus=1"], "trainer.bogus"),
    ]:
        assert cli.main(["train", "sft", "--cfg", "job", *args]) == 2
        assert expected in capsys.readouterr().err
    assert cli.main(["train", "nosuch"]) == 2
    assert "no top-level config 'nosuch'" in capsys.readouterr().err
    assert cli.main(["train", "dpo", "--cfg", "job", "init.hf=/m", "data.train=p.jsonl", "parallel.tp=2",
                     "dpo.beta=0.05"]) == 0
    printed = capsys.readouterr().out
    assert "beta: 0.05" in printed and "tp: 2" in printed


@pytest.mark.parametrize("command", sorted(set(cli.SUBCOMMANDS) - {"env"}))
def test_every_command_module_is_present_and_has_main(command):
    module = cli._load(command)
    assert module is not None and callable(module.main)
