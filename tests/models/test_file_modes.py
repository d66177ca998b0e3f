"""Files the toolkit writes follow the process umask, as a plain ``open`` would: HF exports
(weights, config, copied tokenizer files), checkpoints, ExPO merges. safetensors alone
writes its files 0600, which made exports unreadable to colleagues on a shared cluster."""
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aligner.parallel.spawn import spawn_local


def _modes(root: Path) -> dict:
    """{relative path: permission bits, in octal} of ``root`` and everything below it."""
    return {str(p.relative_to(root)): oct(stat.S_IMODE(p.lstat().st_mode)) for p in [root, *root.rglob("*")]}


def _expected(root: Path, umask: int) -> dict:
    return {str(p.relative_to(root)): oct((0o777 if p.is_dir() else 0o666) & ~umask) for p in [root, *root.rglob("*")]}


@pytest.fixture
def umask():
    """Sets the test's umask and restores the previous one afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077, 0o002])
def test_save_safetensors_follows_the_umask(tmp_path, umask, mask):
    from aligner.models.hf import process_umask, save_safetensors

    umask(mask)
    assert process_umask() == mask
    save_safetensors({"w": torch.arange(6.0).view(2, 3)}, tmp_path / "model.safetensors")
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == 0o666 & ~mask
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["w"], torch.arange(6.0).view(2, 3))


def test_expo_output_follows_the_umask(tmp_path, umask):
    from safetensors.torch import save_file

    from aligner.cli.rm import expo

    for name in ("weak", "strong"):
        (tmp_path / name).mkdir()
        save_file({"a": torch.ones(2)}, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "tokenizer.json").write_text("{}")
        (tmp_path / name / "tokenizer.json").chmod(0o600)  # the source's mode is not copied
    umask(0o027)
    out = expo(tmp_path / "weak", tmp_path / "strong", tmp_path / "out", alpha=1.0)
    modes = _modes(out)
    del modes["."]  # the folder comes from copytree, which copies the source folder's mode
    assert modes == {k: v for k, v in _expected(out, 0o027).items() if k != "."}


def _export_and_checkpoint(root):
    """One rank, umask 027: a tiny model's checkpoint and its HF export with tokenizer files."""
    from aligner.models import ModelConfig, build_model, export_hf, save_checkpoint
    from aligner.parallel import ParallelConfig, initialize

    os.umask(0o027)
    initialize(ParallelConfig(seed=1))
    cfg = ModelConfig(vocab_size=32, hidden_size=32, ffn_hidden_size=64, num_layers=2, num_attention_heads=4,
                      max_position_embeddings=16, make_vocab_size_divisible_by=8, pad_token_id=0)
    model = build_model(cfg)
    save_checkpoint(f"{root}/run/checkpoints", 1, [model], model_config=cfg.to_dict())
    export_hf([model], cfg, f"{root}/run/hf", tokenizer_dir=f"{root}/tokenizer")
    return True


def test_export_and_checkpoint_files_follow_the_umask(tmp_path):
    tok = tmp_path / "tokenizer"
    tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tok / name).write_text("{}")
        (tok / name).chmod(0o644)  # more open than umask 027 allows: the copy must not keep it
    assert spawn_local(_export_and_checkpoint, 1, str(tmp_path), timeout=300) == [True]
    run = tmp_path / "run"
    assert {"hf/model.safetensors", "hf/config.json", "hf/tokenizer.json", "checkpoints/latest"} <= set(_modes(run))
    assert any(k.endswith(".distcp") for k in _modes(run))
    assert _modes(run) == _expected(run, 0o027)
