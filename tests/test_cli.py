"""The aligner command: help lists the commands, env reports the stack, train validates
configs before launch, unknown or missing commands fail with a message (exit 2)."""
import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest

import aligner
from aligner.cli import main as cli
from tests import pyproc


def _run(*args):
    return subprocess.run([sys.executable, "-m", "aligner.cli.main", *args], capture_output=True, text=True,
                          timeout=180)


def test_help_lists_every_command_with_its_description():
    out = _run("--help")
    assert out.returncode == 0 and out.stderr == ""
    lines = out.stdout.splitlines()
    assert lines[0] == "usage: aligner <command> [args...]"
    expected = {"quickstart", "train", "data", "generate", "rm", "eval", "export", "rollouts", "env"}
    assert set(cli.SUBCOMMANDS) == expected
    for name, (module, description) in cli.SUBCOMMANDS.items():
        assert f"  {name:<11} {description}" in lines
        assert module == name
    # the console script setup.py declares, installed beside this interpreter (PATH may name
    # another installation's)
    installed = shutil.which("aligner", path=os.path.dirname(sys.executable))
    if installed:
        assert subprocess.run([installed, "--help"], capture_output=True, text=True, timeout=60).stdout == out.stdout


def test_help_names_every_subcommand_and_stage(capsys):
    """``aligner --help`` tells the truth: each command's description names every
    subcommand its own help offers, and the quickstart's names its RL stage."""
    for name in cli.SUBCOMMANDS:
        assert cli.main([name, "--help"]) == 0
        usage = capsys.readouterr().out
        offered = usage.split("{", 1)[1].split("}", 1)[0].split(",") if name in ("rm", "data", "eval") else []
        for sub in offered:
            assert sub.lower() in cli.SUBCOMMANDS[name][1].lower(), (name, sub)
    assert "RL" in cli.SUBCOMMANDS["quickstart"][1] and "best-of-n" in cli.SUBCOMMANDS["quickstart"][1]
    from aligner.algorithms.catalog import TRAINERS

    for algorithm in set(TRAINERS) - {"rm"}:  # rm: the rm_regression / rm_bt configs
        assert algorithm in cli.SUBCOMMANDS["train"][1], algorithm


def test_every_help_keeps_its_code_spans_on_one_line(capsys):
    for name in cli.SUBCOMMANDS:
        assert cli.main([name, "--help"]) == 0
        for line in capsys.readouterr().out.splitlines():
            assert line.count("``") % 2 == 0, (name, line)


def test_the_online_configs_list_every_reward_kind():
    """The ``kind:`` comment of ``ppo.reward`` / ``pg.reward`` lists the kinds the schema accepts."""
    from aligner.rewards.kinds import REWARD_KINDS
    from aligner.runtime import config_dir

    for config in ("ppo", "pg"):
        lines = (config_dir() / f"{config}.yaml").read_text().splitlines()
        reward = lines.index("  reward:")
        kind = next(line for line in lines[reward:] if line.strip().startswith("kind:"))
        assert [k.strip() for k in kind.split("#", 1)[1].split("|")] == list(REWARD_KINDS), config


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
    assert capsys.readouterr().err.startswith("aligner train: error: no top-level config 'nosuch'; available: distill, dpo,")
    assert cli.main(["train", "dpo", "--cfg", "job", "init.hf=/m", "data.train=p.jsonl", "parallel.tp=2",
                     "dpo.beta=0.05"]) == 0
    printed = capsys.readouterr().out
    assert "beta: 0.05" in printed and "tp: 2" in printed


@pytest.mark.parametrize("command", sorted(set(cli.SUBCOMMANDS) - {"env"}))
def test_every_command_module_is_present_and_has_main(command):
    module = cli._load(command)
    assert module is not None and callable(module.main)


# ------------------------------------------------------------------------------ user errors
def _timed(args, cwd, env=None):
    """Run ``aligner ARGS`` in ``cwd`` in a fresh interpreter: (completed process, CPU
    seconds it used)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-m", "aligner.cli.main", *args], capture_output=True, text=True,
                         timeout=300, cwd=cwd, env={**os.environ, **(env or {})})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return out, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _aligner(args, cwd, env=None):
    """Run ``aligner ARGS`` in ``cwd`` (its own process, from the fork server)."""
    return pyproc.run([sys.executable, "-m", "aligner.cli.main", *args], timeout=300, cwd=cwd,
                      env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def user_error_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_errors")
    (root / "hf").mkdir()
    (root / "hf" / "config.json").write_text("{}")
    (root / "bad.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": 3,'
                                    ' "rejected": "b"}\n')
    (root / "sft.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    (root / "tok.model").write_text("")
    return root


@pytest.mark.parametrize("args,expected", [
    (["dpo", "dpo.loss_type=dpoo"],
     ["aligner train: error: dpo.loss_type: 'dpoo' is not accepted; expected one of dpo, ipo, rpo_sq, rpo_fwd_kl,"
      " rpo_bwd_kl, margin_dpo, scaled_dpo, orpo, simpo"]),
    (["dpo"], ["aligner train: error: required values not set: init.hf, data.train",
               "hint: set on the command line, e.g. aligner train dpo init.hf=... data.train=..."]),
    (["dpo", "init.hf=/nope", "data.train=x.jsonl"],
     ["aligner train: error: init.hf = '/nope': no such folder",
      "hint: init.hf names a Hugging Face model folder (config.json + *.safetensors)"]),
    (["dpo", "init.hf=hf", "data.train=bad.jsonl"],
     ["aligner train: error: bad.jsonl:2: field 'chosen' must be a string, got int"]),
    (["dpo", "init.hf=hf", "data.train=x.jsonl"], ["aligner train: error: data.train = 'x.jsonl': no such file or folder"]),
    (["sft", "trainer.keep_last=0"], ["aligner train: error: trainer.keep_last = 0: expected >= 1"]),
])
def test_user_errors_are_one_line_exit_2_and_write_nothing(user_error_files, args, expected):
    out = _aligner(["train", *args, "trainer.out_dir=run"], cwd=user_error_files)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == expected and out.stdout == ""
    assert not (user_error_files / "run").exists()


def test_a_user_error_from_a_fresh_interpreter_is_one_line_and_fast(user_error_files):
    out, cpu_s = _timed(["train", "dpo", "dpo.loss_type=dpoo", "trainer.out_dir=run"], cwd=user_error_files)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == ["aligner train: error: dpo.loss_type: 'dpoo' is not accepted; expected one"
                                       " of dpo, ipo, rpo_sq, rpo_fwd_kl, rpo_bwd_kl, margin_dpo, scaled_dpo,"
                                       " orpo, simpo"]
    assert cpu_s < 15, cpu_s


def test_a_layout_that_does_not_fit_the_world_is_refused_by_rank_0_on_every_rank(user_error_files):
    """``parallel.tp=3`` under torchrun with 2 ranks: rank 0 prints one line, both ranks exit 2."""
    args = ["train", "sft", "data.train=sft.jsonl", "data.tokenizer=tok.model", "parallel.tp=3", "trainer.out_dir=run"]
    expected = ("aligner train: error: world size 2 is not divisible by parallel.tp * parallel.pp * parallel.cp ="
                " 3 * 1 * 1 = 3")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          "0", "-m", "aligner.cli.main", *args], capture_output=True, text=True, timeout=300,
                         cwd=user_error_files)
    assert out.returncode != 0
    ours = [line for line in out.stderr.splitlines() if line.startswith("aligner ")]
    assert ours == [expected]  # printed once: by rank 0
    # torchrun's own report: the first rank to end did so with exit status 2 (the other one
    # ended with 2 too, or was stopped by torchrun right after)
    root_cause = out.stderr.split("Root Cause (first observed failure):")[1]
    assert "exitcode  : 2 " in root_cause
    assert not (user_error_files / "run").exists()
    # the same refusal in one process that sees the launcher's variables, before any process group
    single = _aligner(args, cwd=user_error_files, env={"RANK": "0", "WORLD_SIZE": "2"})
    assert single.returncode == 2 and single.stderr.splitlines() == [expected]
    quiet = _aligner(args, cwd=user_error_files, env={"RANK": "1", "WORLD_SIZE": "2"})
    assert quiet.returncode == 2 and quiet.stderr == ""  # other ranks exit quietly


def test_debug_shows_the_traceback_and_internal_errors_keep_theirs(user_error_files, monkeypatch, capsys):
    args = ["train", "dpo", "init.hf=hf", "data.train=bad.jsonl", "trainer.out_dir=run"]
    for extra, env in ((["--debug"], {}), ([], {"ALIGNER_DEBUG": "1"})):
        out = _aligner(args + extra, cwd=user_error_files, env=env)
        assert out.returncode == 1
        assert "Traceback (most recent call last)" in out.stderr
        assert out.stderr.rstrip().endswith("DataFormatError: bad.jsonl:2: field 'chosen' must be a string, got int")

    class Internal:
        @staticmethod
        def main(argv):
            raise RuntimeError("an internal fault")

    monkeypatch.setattr(cli, "_load", lambda name: Internal)
    with pytest.raises(RuntimeError, match="an internal fault"):
        cli.main(["env"])


def test_hydra_flags_info_and_cfg_hydra(capsys):
    import logging

    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    assert cli.main(["train", "dpo", "--info", "defaults"]) == 0
    out = capsys.readouterr().out
    # Hydra printed through a root handler of its own; none is left behind on a stream
    # that closes with this test, and the level is the caller's again
    assert (list(root.handlers), root.level) == before
    for entry in ("dpo_schema", "aligner_run_dirs", "model/tiny", "parallel/single", "optim/adamw"):
        assert f"| {entry} " in out, entry
    assert cli.main(["train", "dpo", "--cfg", "hydra", "--resolve", "trainer.out_dir=runs/x"]) == 0
    out = capsys.readouterr().out
    assert "  run:\n    dir: runs/x\n" in out and "  sweep:\n    dir: runs/x\n" in out
    assert cli.main(["train", "dpo", "--info", "searchpath", "dpo.loss_type=dpoo"]) == 2  # checked like a run
    assert "dpo.loss_type: 'dpoo' is not accepted" in capsys.readouterr().err


def test_a_trainer_without_a_yaml_file_composes_its_schemas_defaults():
    from omegaconf import OmegaConf

    from aligner.algorithms.composition import top_configs
    from aligner.algorithms.reward import RewardModelTrainer
    from aligner.cli.train import compose_with_hydra, without_hydra

    assert "rm" not in top_configs()  # the rm_* configs run it
    job = without_hydra(compose_with_hydra("rm", []))
    assert OmegaConf.to_container(job) == OmegaConf.to_container(OmegaConf.structured(RewardModelTrainer.schema))
    job = without_hydra(compose_with_hydra("rm", ["parallel=tp2", "model=llama_1b"]))  # groups still pick files
    assert (job.parallel.tp, job.model.hidden_size, job.algorithm) == (2, 2048, "rm")


@pytest.mark.parametrize("config", ["pg", "rloo", "grpo", "ppo", "helpsteer2pref_reinforce", "dpo"])
def test_cfg_job_prints_the_config_with_required_values_unset(config, capsys):
    assert cli.main(["train", config, "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "  hf: ???\n" in out and "algorithm: " in out


def test_data_validate_checks_the_kind_asked_for(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n' * 3)
    assert cli.main(["data", "validate", str(pairs), "--kind", "regression"]) == 1
    captured = capsys.readouterr()
    assert "valid_rows" not in captured.out
    assert captured.err == (f"invalid: {pairs}:1: format 'pairwise' cannot be used here; expected one of"
                            " ['helpsteer2']\n")
    assert cli.main(["data", "validate", str(pairs), "--kind", "pairs"]) == 0
    assert json.loads(capsys.readouterr().out)["valid_rows"] == 3
    assert cli.main(["data", "validate", str(pairs), "--kind", "pears"]) == 2
    assert "--kind 'pears'; expected one of sft, regression, pairs" in capsys.readouterr().err
