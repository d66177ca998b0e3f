"""The quickstart composes every stage end to end (at a small step scale here): run folder,
report, plots, and HF checkpoints that transformers loads."""
import json

import pytest
import torch


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("qs") / "run"
    subprocess.run([sys.executable, "-W", "ignore", "-m", "aligner.cli.main", "quickstart", "--out", str(out),
                    "--scale", "0.03", "--seed", "1"], check=True, timeout=900, capture_output=True)
    return out


def test_report_and_plots(run):
    results = json.loads((run / "results.json").read_text())
    for key in ("sft", "rm_regression", "rm_bt", "dpo", "judge", "stage_seconds"):
        assert key in results
    report = (run / "report.md").read_text()
    assert "| SFT | validation loss" in report and "ground-truth helpfulness" in report
    for png in ("loss_curves.png", "helpfulness_sft_vs_dpo.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for stage in ("sft", "rm_regression", "rm_bt", "dpo"):
        assert (run / stage / "config.yaml").is_file() and (run / stage / "metrics.jsonl").is_file()
    rb = results["rm_bt"]["rewardbench"]["subsets"]
    assert set(rb) == {"world-easy", "world-hard"} and all(v["n"] == 200 for v in rb.values())


def test_every_stage_loads_in_transformers(run):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    ids = torch.tensor([[5, 6, 7, 8]])
    for stage in ("sft", "dpo"):
        m = AutoModelForCausalLM.from_pretrained(run / stage / "hf")
        assert torch.isfinite(m(ids).logits).all()
    for stage in ("rm_regression", "rm_bt"):
        m = AutoModelForSequenceClassification.from_pretrained(run / stage / "hf")
        assert m.config.num_labels == 5 and torch.isfinite(m(ids).logits).all()
    tok = AutoTokenizer.from_pretrained(run / "sft" / "hf")
    assert tok.decode(tok.encode("The answer is 42.", add_special_tokens=False)).strip() == "The answer is 42."
