"""The embedded world is deterministic (the standard world byte for byte what every
published figure was measured on) and its scorer ranks styles as documented, the
steerable styles spanning verbosity and complexity 0..4; the packer places every sample
once, never overfills a bin, and C++ equals Python (the C++ extension must be built:
without it the comparison would be Python against itself)."""
import hashlib
import json
import random
import re

import pytest
import torch

from aligner.data import packing
from aligner.data.packing import efficiency, ffd_python, pack_lengths
from aligner.data.world import (
    ATTRS,
    FAMILIES,
    STEERABLE,
    STYLES,
    attribute_table,
    make_response,
    make_task,
    score_response,
    synthesize,
)

SMALL = dict(n_sft=60, n_sft_val=10, n_regression=30, n_pairs=40, n_pairs_val=10, n_heldout=10, n_rewardbench=10)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = synthesize(tmp_path / "a", seed=3, **SMALL)
    b = synthesize(tmp_path / "b", seed=3, **SMALL)
    c = synthesize(tmp_path / "c", seed=4, **SMALL)
    assert set(a) == set(b)
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes(), name
    assert a["sft_train"].read_bytes() != c["sft_train"].read_bytes()


# sha256 of the standard world (seed 0, SMALL sizes) as written before the steerable styles
# existed: every figure in README.md and docs/ was measured on this world
STANDARD_WORLD_SHA256 = {
    "pairs_train.jsonl": "5a834dd57bd43539134747042ec0f2592d0627fee217cad1353ff2515b041b5f",
    "pairs_val.jsonl": "55fee6770765ea941533bcf8593c809cedcb380f59d38b412be6dec8d6077df1",
    "prompts_heldout.jsonl": "535293c937b5951e02fbe616ba7e27ba9c5677b4f194d4df88fd7d9984894b84",
    "prompts_train.jsonl": "81152a7f6506a7e64d7c85ae57aff4e72e1cd36845aca9cedf9c695d2c690f07",
    "regression_train.jsonl": "2042f829dfef287e404502965ee8ce5323b56b550c5cd35460a312828b096e37",
    "regression_val.jsonl": "fc014b63eebd0c49fdd8d3892d3b6e44a4d2fc9ac3c0d2f973065283f8eb9fef",
    "rewardbench.jsonl": "37b5aaee670ddf46b2787df53f60ab686cb5a2dc8ac4ffb290ddf23238c84a03",
    "sft_train.jsonl": "7caa2437d37faa6aa6f71932c4866868ad2810a4042e92eebf44f2e303ff275e",
    "sft_val.jsonl": "ef3d4f420d3197698b97567e5161c244b47fbbada0ae31b89802c6707df814cd",
    "world.json": "0be94e0f9a378eb8ba41f688229d1dfff8578752aaf93d23d91f8433aa6eaabe",
}


def test_standard_world_bytes_are_pinned(tmp_path):
    synthesize(tmp_path, seed=0, **SMALL)
    for name, digest in STANDARD_WORLD_SHA256.items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest, name


def test_steerable_world_adds_the_steerable_styles(tmp_path):
    synthesize(tmp_path, seed=0, styles="steerable", **dict(SMALL, n_sft=300, n_regression=200))
    manifest = json.loads((tmp_path / "world.json").read_text())
    assert manifest["style_set"] == "steerable" and manifest["styles"] == list(STYLES + STEERABLE)
    sft = [json.loads(line) for line in (tmp_path / "sft_train.jsonl").read_text().splitlines()]
    reg = [json.loads(line) for line in (tmp_path / "regression_train.jsonl").read_text().splitlines()]
    assert set(STEERABLE) <= {r["style"] for r in sft} and set(STEERABLE) <= {r["style"] for r in reg}
    # the reward model's training rows hold every verbosity and complexity level
    assert {r["verbosity"] for r in reg} == set(range(5)) and {r["complexity"] for r in reg} == set(range(5))
    for r in sft:  # the steerable styles are correct answers
        if r["style"] in STEERABLE:
            assert score_response(r, r["conversations"][-1]["value"])["correctness"] == 4
    with pytest.raises(ValueError, match="styles='fancy', expected one of"):
        synthesize(tmp_path / "x", styles="fancy")


def _score_before_steerable_styles(meta, response):
    """The scorer as it was before the steerable styles (frozen copy): the nine standard
    styles must score exactly this."""
    from aligner.data.world import ANSWER, _one_edit

    text = response.strip()
    words = len(text.split())
    verbosity = 1 if words <= 6 else 2 if words <= 12 else 3 if words <= 20 else 4
    stated = ANSWER.findall(text)
    task_words = {str(a) for a in meta.get("args", [])} | {meta["answer"]}
    on_topic = bool(stated) or "answer" in text.lower() or any(w in text for w in task_words)
    if not on_topic:
        return {"helpfulness": 1, "correctness": 0, "coherence": 0, "complexity": 0, "verbosity": verbosity,
                "exact": False}
    answer = stated[-1].strip() if stated else None
    if answer is None:
        correctness, coherence = 0, 1
    else:
        correctness = 4 if answer == meta["answer"] else 1 if _one_edit(answer, meta["answer"], meta["family"]) else 0
        coherence = 4
        sentences = [s.strip() for s in re.split(r"(?<=\.)\s+", text) if s.strip()]
        if len(sentences) != len(set(sentences)):
            coherence -= 2
        if any(f in text for f in ("Well,", "Hmm,", "Okay,", " um,", "basically")):
            coherence -= 1
    first = re.split(r"(?<=\.)\s+", text)[0]
    complexity = 2 if stated and not first.startswith("The answer is") and not any(
        f in text for f in ("Well,", "Hmm,", "Okay,")) else 1
    helpfulness = (2 * correctness + coherence + 4 - 2 * max(0, verbosity - 2)) // 4
    return {"helpfulness": max(0, min(4, helpfulness)), "correctness": correctness, "coherence": max(0, coherence),
            "complexity": complexity, "verbosity": verbosity, "exact": correctness == 4}


def test_standard_styles_score_as_before():
    rng = random.Random(0)
    for _ in range(3000):
        task = make_task(rng, rng.choice(FAMILIES))
        response = make_response(rng, task, rng.choice(STYLES))
        assert score_response(task, response) == _score_before_steerable_styles(task, response), response


def test_scorer_on_steerable_styles():
    add = {"family": "add", "answer": "81", "args": [23, 58]}

    def five(meta, response):
        s = score_response(meta, response)
        return tuple(s[a] for a in ("helpfulness", "correctness", "coherence", "complexity", "verbosity"))

    rng = random.Random(0)
    assert make_response(rng, add, "bare") == "81."
    assert make_response(rng, add, "detailed") == "Add 58. That is 81. The answer is 81."
    assert make_response(rng, add, "stepwise") == "Start at 23. Add 58. That is 81. The answer is 81."
    assert five(add, "81.") == (4, 4, 4, 0, 0)                          # bare: verbosity 0, complexity 0
    assert five(add, "82.") == (2, 1, 4, 0, 0)                          # a bare one-edit answer: (2 + 8) // 4
    # polite_bare: among courteous sentences, 8 + 1 + 5 = 14 words (verbosity 3); (8 + 4 + 4 - 2) // 4 = 3
    assert five(add, "Sure, I am happy to help with that. 81. I hope this helps you.") == (3, 4, 4, 0, 3)
    assert five(add, "Good question, let me work it out. 81.") == (4, 4, 4, 0, 2)
    assert five(add, "Add 58. 81.")[1] == 0                             # after work it is no stated answer
    # polite: 8 + 4 + 5 = 17 words (verbosity 3), no work; (8 + 4 + 4 - 2) // 4 = 3
    assert five(add, "Sure, I am happy to help with that. The answer is 81. I hope this helps you.") == (3, 4, 4, 1, 3)
    # polite_shown: one sentence of work among 8 + 5 + 4 = 17 words
    polite_shown = "Thanks for the question, here is my reply. 23 plus 58 is 81. The answer is 81."
    assert five(add, polite_shown) == (3, 4, 4, 2, 3)
    assert five(add, "Add 58. That is 81. The answer is 81.") == (4, 4, 4, 3, 2)               # detailed: 9 words
    assert five(add, "Start at 23. Add 58. That is 81. The answer is 81.") == (4, 4, 4, 4, 2)  # stepwise: 12 words
    # work after the answer does not count; four sentences of work count as three
    assert five(add, "The answer is 81. 23 plus 58 is 81.")[3] == 1
    assert five(add, "Take 23. Start at 23. Add 58. That is 81. The answer is 81.")[3] == 4
    srt = {"family": "sort", "answer": "2, 7, 9", "args": [7, 2, 9]}
    assert five(srt, "2, 7, 9.") == (4, 4, 4, 0, 0) and five(srt, "2, 9.")[1] == 1
    # courteous and filler sentences are not work; text before the answer in its sentence is
    cnt = {"family": "count", "answer": "1", "args": ["h", "hammer"]}
    assert five(cnt, "Thanks for the question, here is my reply. I hope this helps you. The answer is 1.")[3] == 1
    assert five(cnt, "Hmm, so, basically, right. Find each h. That is 1. The answer is 1.")[3] == 3
    assert five(cnt, "Find each h The answer is 1.")[3] == 2


@pytest.mark.parametrize("style,complexity,verbosity", [
    ("bare", {0}, {0}), ("polite_bare", {0}, {2, 3, 4}), ("polite", {1}, {2, 3, 4}), ("polite_shown", {2}, {3, 4}),
    ("detailed", {3}, {2, 3}), ("stepwise", {4}, {2, 3, 4})])
def test_steerable_style_levels_as_documented(style, complexity, verbosity):
    rng = random.Random(0)
    scores = []
    for _ in range(500):
        task = make_task(rng, rng.choice(FAMILIES))
        scores.append(score_response(task, make_response(rng, task, style)))
    assert all(s["correctness"] == 4 for s in scores)
    assert {s["complexity"] for s in scores} == complexity and {s["verbosity"] for s in scores} == verbosity


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
    assert set(table) == set(STYLES + STEERABLE) and all(set(r) == set(ATTRS) for r in table.values())
    h = {k: v["helpfulness"] for k, v in table.items()}
    assert h["clean"] == 4.0 and min(h["clean"], h["shown"]) > h["filler"] >= h["repetition"] > h["wrong"]
    assert h["wrong"] > h["truncation"] and h["wrong"] > h["off_topic"]
    assert table["shown"]["complexity"] > table["clean"]["complexity"]
    # the steerable styles: correct, complexity 0 (bare) to 4 (stepwise), verbosity 0 to 4
    assert all(table[s]["correctness"] == 4.0 for s in STEERABLE)
    assert [table[s]["complexity"] for s in ("bare", "clean", "shown", "detailed", "stepwise")] == [0, 1, 2, 3, 4]
    assert table["bare"]["verbosity"] == 0 and table["polite"]["complexity"] == 1
    assert table["polite_bare"]["complexity"] == 0 and table["polite_bare"]["verbosity"] >= 2
    assert table["polite"]["verbosity"] > table["clean"]["verbosity"] + 1.5


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
