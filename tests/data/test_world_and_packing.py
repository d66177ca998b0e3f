"""The embedded world is deterministic and its scorer ranks styles as documented; the
packer places every sample once, never overfills a bin, and C++ equals Python (the C++
extension must be built: without it the comparison would be Python against itself)."""
import random

import pytest
import torch

from aligner.data import packing
from aligner.data.packing import efficiency, ffd_python, pack_lengths
from aligner.data.world import ATTRS, STYLES, attribute_table, score_response, synthesize

SMALL = dict(n_sft=60, n_sft_val=10, n_regression=30, n_pairs=40, n_pairs_val=10, n_heldout=10, n_rewardbench=10)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = synthesize(tmp_path / "a", seed=3, **SMALL)
    b = synthesize(tmp_path / "b", seed=3, **SMALL)
    c = synthesize(tmp_path / "c", seed=4, **SMALL)
    assert set(a) == set(b)
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes(), name
    assert a["sft_train"].read_bytes() != c["sft_train"].read_bytes()


def test_scorer_on_hand_made_responses():
    add = {"family": "add", "answer": "81", "args": [23, 58]}
    s = score_response(add, "The answer is 81.")
    assert (s["helpfulness"], s["correctness"], s["coherence"], s["complexity"], s["verbosity"]) == (4, 4, 4, 1, 1)
    assert score_response(add, "23 plus 58 is 81. The answer is 81.")["complexity"] == 2
    assert score_response(add, "The answer is 82.")["correctness"] == 1      # one digit off
    assert score_response(add, "The answer is 17.")["correctness"] == 0
    assert score_response(add, "The answer is")["helpfulness"] == 1          # truncated
    assert score_response(add, "Cats like to sleep in the sun.")["coherence"] == 0
    rep = score_response(add, "The answer is 81. The answer is 81. The answer is 81.")
    assert (rep["coherence"], rep["helpfulness"]) == (2, 3)
    srt = {"family": "sort", "answer": "2, 7, 9", "args": [7, 2, 9]}
    assert score_response(srt, "The answer is 2, 9.")["correctness"] == 1   # one item missing
    assert score_response(srt, "The answer is 2, 7, 9.")["exact"]


def test_attribute_table_orders_styles():
    table = attribute_table(seed=0, per_style=50)
    assert set(table) == set(STYLES) and all(set(r) == set(ATTRS) for r in table.values())
    h = {k: v["helpfulness"] for k, v in table.items()}
    assert h["clean"] == 4.0 and min(h["clean"], h["shown"]) > h["filler"] >= h["repetition"] > h["wrong"]
    assert h["wrong"] > h["truncation"] and h["wrong"] > h["off_topic"]
    assert table["shown"]["complexity"] > table["clean"]["complexity"]


def test_cpp_packing_extension_is_built():
    # pack_lengths falls back to ffd_python when aligner._C is missing; the comparison
    # below would then hold trivially, so the extension's presence is a test of its own
    assert packing._C is not None, (
        "aligner._C is not built (python setup.py build_ext --inplace, or pip install the package)")
    assert hasattr(packing._C, "ffd_pack")


@pytest.mark.parametrize("seed", range(20))
def test_packing_properties(seed):
    if packing._C is None:
        pytest.fail("aligner._C is not built: C++ cannot be compared with Python")
    rng = random.Random(seed)
    cap = rng.choice([1, 7, 64, 512])
    lengths = [rng.randint(1, cap) for _ in range(rng.randint(0, 400))]
    bins = pack_lengths(lengths, cap)
    assert bins == ffd_python(lengths, cap)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))                   # every sample exactly once
    assert all(sum(lengths[i] for i in b) <= cap for b in bins)  # no bin over capacity
    # first fit: no item could have gone into an earlier bin when it was placed
    if bins:
        assert efficiency(lengths, bins, cap) <= 1.0


def test_packing_rejects_bad_lengths():
    with pytest.raises(ValueError, match="item 1 has length 9, expected 1..8"):
        pack_lengths([3, 9], 8)
    with pytest.raises(ValueError, match="item 0 has length 0"):
        ffd_python([0], 8)


def test_packed_microbatch_boundaries():
    from aligner.training.batching import packed_microbatches

    groups = [[(torch.tensor([5, 6, 7]), torch.tensor([0.0, 1.0, 1.0]))],
              [(torch.tensor([8, 9]), torch.tensor([0.0, 1.0])), (torch.tensor([10, 11]), torch.tensor([0.0, 1.0]))],
              [(torch.tensor([12]), torch.tensor([1.0]))]]
    micro, members = packed_microbatches(groups, capacity=5, bins_per_micro=1, pad_id=0)
    # FFD over group lengths [3, 4, 1]: bin 0 = group 1 (4) + group 2 (1); bin 1 = group 0 (3)
    assert members == [[1, 2], [0]]
    b = micro[0]
    assert b["tokens"].tolist() == [[8, 9, 10, 11, 12]]
    assert b["item_of_token"].tolist() == [[0, 0, 1, 1, 2]]
    assert b["position_ids"].tolist() == [[0, 1, 0, 1, 0]]
    assert b["loss_mask"].tolist() == [[0, 1, 0, 1, 0]]   # an item's first token is never a target
    assert b["last_col"].tolist() == [1, 3, 4]
    blocked = b["attention_mask"][0, 0]
    assert not blocked[1, 0] and blocked[2, 1] and blocked[3, 0] and not blocked[3, 2]  # no attention across samples
    pad = micro[1]
    assert pad["tokens"].tolist() == [[5, 6, 7, 0, 0]] and pad["item_of_token"].tolist() == [[0, 0, 0, -1, -1]]
    assert not pad["attention_mask"][0, 0, 4, 3]  # padding attends to itself (no fully blocked row)
