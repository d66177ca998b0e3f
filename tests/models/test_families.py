"""Every architecture family against transformers, through one shared harness
(tests/models/families.py: the checkpoints, the checks and the jobs)."""
import json
from pathlib import Path

import pytest
import torch

from aligner.parallel.spawn import spawn_local
from tests.models import families as fam
from tests.models.families import EXPORT_TOL, FAMILIES, LOGITS_TOL, LOSS_TOL, MOE_FAMILIES, SP_FAMILIES


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    for name in FAMILIES:
        fam.make_checkpoint(root, name)
    two = spawn_local(fam.run_world2, 2, str(root), FAMILIES, timeout=900)
    one = spawn_local(fam.run_world1, 1, str(root), FAMILIES, timeout=600)[0]
    return root, two, one


@pytest.fixture(scope="module")
def reference(runs):
    """transformers' results per family, computed once."""
    root = runs[0]
    out = {}
    for name in FAMILIES:
        model = fam.hf_model(root / name)
        out[name] = {"logits": fam.hf_last_logits(model), "greedy": fam.hf_greedy(model),
                     "sft": fam.hf_sft(root / name), "dpo": fam.hf_dpo(root / name)}
    return out


def _layouts(runs, name):
    """(layout, rank, result) of every rank that computed logits."""
    _, two, one = runs
    yield "tp1", 0, one[name]["tp1"]
    for rank, out in enumerate(two):
        for layout in ("tp2", "pp2") + (("ep2",) if name in MOE_FAMILIES else ()) + \
                (("tp2sp",) if name in SP_FAMILIES else ()):
            yield layout, rank, out[name][layout]


@pytest.mark.parametrize("name", FAMILIES)
def test_last_position_logits_match_transformers(runs, reference, name):
    checked = 0
    for layout, rank, out in _layouts(runs, name):
        if out["logits"] is None:  # not the last pipeline stage
            continue
        torch.testing.assert_close(out["logits"], reference[name]["logits"], atol=LOGITS_TOL, rtol=0,
                                   msg=f"{name} {layout} rank {rank}")
        checked += 1
    # TP=1, both TP=2 ranks, the last PP=2 stage (and both EP=2 ranks, both sequence-parallel TP=2 ranks)
    assert checked == 4 + (2 if name in MOE_FAMILIES else 0) + (2 if name in SP_FAMILIES else 0)


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_decoding_equals_transformers_generate(runs, reference, name):
    want = reference[name]["greedy"]
    assert all(len(w) == fam.NEW_TOKENS for w in want)
    for layout, rank, out in _layouts(runs, name):
        for impl in ("fused", "megatron"):
            assert out[impl] == want, f"{name} {layout} rank {rank} {impl}"


@pytest.mark.parametrize("name", FAMILIES)
def test_refilled_slots_decode_as_transformers_alone(runs, reference, name):
    """A prompt decoded in a freed slot beside a row at other positions, and the rows around
    it, give transformers' greedy response of each prompt alone, cut after the stop token."""
    want = reference[name]["greedy"]
    for layout, rank, out in _layouts(runs, name):
        refill = out["refill"]
        assert refill["continuous"]
        stop = refill["stop"]
        cuts = [w.index(stop) + 1 if stop in w else len(w) for w in want]
        assert refill["responses"] == [w[:c] for w, c in zip(want, cuts)], f"{name} {layout} rank {rank}"
        assert cuts[0] < cuts[1], f"{name}: the first row must end before the second for a refill mid-flight"


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_expert_parallel_ranks_decode_different_work_in_step(runs, reference, name):
    """At EP=2 rank 0 generates every prompt, rank 1 one prompt for fewer tokens: rank 1
    keeps its MoE layers in step until rank 0 is done, and both results are transformers'."""
    want = reference[name]["greedy"]
    first, second = (out[name]["ep2"]["uneven"] for out in runs[1])
    for impl in ("fused", "megatron"):
        assert first[impl] == want, impl
        assert second[impl] == [want[-1][:fam.UNEVEN_TOKENS]], impl


@pytest.mark.parametrize("algorithm", ["sft", "dpo"])
@pytest.mark.parametrize("name", FAMILIES)
def test_training_steps_match_transformers(runs, reference, name, algorithm):
    """Two SGD steps at TP=2: step 1's loss (and log-probs, gradient norm), step 2's loss."""
    want = reference[name][algorithm]
    for rank_out in runs[1]:
        got = rank_out[name][algorithm]
        assert [r["step"] for r in got] == [1, 2]
        keys = ["loss", "grad_norm"] + (["logps/chosen", "logps/rejected"] if algorithm == "dpo" else [])
        for key in keys:
            assert abs(got[0][key] - want[0][key]) <= LOSS_TOL * max(1.0, abs(want[0][key])), (key, got[0], want[0])
        assert abs(got[1]["loss"] - want[1]["loss"]) <= LOSS_TOL, (got[1]["loss"], want[1]["loss"])
        assert abs(want[1]["loss"] - want[0]["loss"]) > 1e-3  # the update moved the loss


@pytest.mark.parametrize("name", FAMILIES)
def test_export_loads_in_transformers_and_round_trips(runs, name):
    from safetensors.torch import load_file

    root = runs[0]
    config = json.loads((root / f"{name}_export" / "config.json").read_text())
    source = json.loads((root / name / "config.json").read_text())
    assert config["architectures"] == source["architectures"] and config["model_type"] == source["model_type"]
    ref = fam.hf_model(root / name)
    got = fam.hf_model(root / f"{name}_export")
    assert type(got) is type(ref)
    torch.testing.assert_close(fam.hf_last_logits(got), fam.hf_last_logits(ref), atol=EXPORT_TOL, rtol=0)

    def tensors(folder):
        out = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    src, first, again = tensors(root / name), tensors(root / f"{name}_export"), tensors(root / f"{name}_export_again")
    if source.get("tie_word_embeddings"):
        src.pop("lm_head.weight", None)
    assert sorted(first) == sorted(src) == sorted(again)
    for k in src:
        assert torch.equal(first[k], src[k]) and torch.equal(again[k], src[k]), k
    if name in MOE_FAMILIES:  # written at EP=2, each rank holding half the experts
        ep2 = tensors(root / f"{name}_export_ep2")
        assert sorted(ep2) == sorted(src)
        for k in src:
            assert torch.equal(ep2[k], src[k]), k
        torch.testing.assert_close(fam.hf_last_logits(fam.hf_model(root / f"{name}_export_ep2")),
                                   fam.hf_last_logits(ref), atol=EXPORT_TOL, rtol=0)
