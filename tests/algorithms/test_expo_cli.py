"""aligner rm expo: theta = theta_w + alpha (theta_s - theta_w), tensor by tensor, written atomically."""
import torch
from safetensors.torch import load_file, save_file

from aligner.cli.rm import expo


def test_expo_writes_the_extrapolated_checkpoint(tmp_path):
    w = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.5]])}
    s = {"a": torch.tensor([2.0, 0.0]), "b": torch.tensor([[1.5]])}
    for name, sd in (("weak", w), ("strong", s)):
        (tmp_path / name).mkdir()
        save_file(sd, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text("{}")
    out = expo(tmp_path / "weak", tmp_path / "strong", tmp_path / "out", alpha=1.5)
    got = load_file(str(out / "model.safetensors"))
    assert torch.equal(got["a"], torch.tensor([2.5, -1.0]))  # 1 + 1.5 * (2 - 1), 2 + 1.5 * (0 - 2)
    assert torch.equal(got["b"], torch.tensor([[2.0]]))      # 0.5 + 1.5 * 1
    assert (out / "config.json").is_file() and not (tmp_path / "out.tmp").exists()
