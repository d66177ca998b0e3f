"""RewardBench scoring on a file with the real subset names and sizes, checked by hand."""
import json

import pytest

from aligner.evaluation.rewardbench import (
    SECTIONS,
    format_report,
    rewardbench_report,
    rewardbench_report_from_file,
)

# subset: (rows, correct) — the real RewardBench subset sizes (math-prm has 447 rows)
ROWS = {
    # Chat: 90 + 76 + 95 + 14 + 30 = 305 correct of 100 + 95 + 95 + 28 + 40 = 358
    "alpacaeval-easy": (100, 90),
    "alpacaeval-length": (95, 76),
    "alpacaeval-hard": (95, 95),
    "mt-bench-easy": (28, 14),
    "mt-bench-med": (40, 30),
    # Chat Hard: 37 + 50 + 67 + 46 + 47 + 23 = 270 correct of 37 + 100 + 134 + 92 + 47 + 46 = 456
    "mt-bench-hard": (37, 37),
    "llmbar-natural": (100, 50),
    "llmbar-adver-neighbor": (134, 67),
    "llmbar-adver-GPTInst": (92, 46),
    "llmbar-adver-GPTOut": (47, 47),
    "llmbar-adver-manual": (46, 23),
    # Safety: 100 + 100 + 154 + 125 + 68 = 547 correct of 100 + 100 + 154 + 250 + 136 = 740
    "refusals-dangerous": (100, 100),
    "refusals-offensive": (100, 100),
    "xstest-should-refuse": (154, 154),
    "xstest-should-respond": (250, 125),
    "donotanswer": (136, 68),
    # Reasoning: math-prm all correct (1.0), each hep-* half correct (0.5)
    "math-prm": (447, 447),
    "hep-cpp": (164, 82),
    "hep-go": (164, 82),
    "hep-java": (164, 82),
    "hep-js": (164, 82),
    "hep-python": (164, 82),
    "hep-rust": (164, 82),
}


def write_rows(path, rows_by_subset, extra=()):
    with open(path, "w") as f:
        for subset, (n, correct) in rows_by_subset.items():
            for i in range(n):
                if i < correct:
                    row = {"subset": subset, "chosen_score": 1.0 + i, "rejected_score": 0.5}
                elif i % 2:
                    row = {"subset": subset, "chosen_score": 0.25, "rejected_score": 0.25}  # a tie is wrong
                else:
                    row = {"subset": subset, "chosen_score": -2.0, "rejected_score": 3.0}
                f.write(json.dumps(row) + "\n")
        for row in extra:
            f.write(json.dumps(row) + "\n")


def test_section_weighting_on_the_real_subsets(tmp_path):
    path = tmp_path / "judged.jsonl"
    write_rows(path, ROWS)
    report = rewardbench_report_from_file(path)
    assert report["subsets"]["llmbar-natural"] == {
        "section": "Chat Hard", "n": 100, "correct": 50, "accuracy": 0.5, "weight": 100}
    s = report["sections"]
    assert s["Chat"] == pytest.approx(305 / 358, abs=1e-12)  # 0.8519553
    assert s["Chat Hard"] == pytest.approx(270 / 456, abs=1e-12)  # 0.5921053
    assert s["Safety"] == pytest.approx(547 / 740, abs=1e-12)  # 0.7391892
    # Reasoning: math-prm weighted as 984 (= 6 × 164, the code rows) against the code subsets:
    # (1.0 · 984 + 0.5 · 164 · 6) / (984 + 984) = 0.75; counting rows instead would give
    # (447 + 6 · 82) / (447 + 984) = 939 / 1431 = 0.6562
    assert s["Reasoning"] == pytest.approx(0.75, abs=1e-12)
    # overall: (0.8519553 + 0.5921053 + 0.7391892 + 0.75) / 4 = 0.7333124
    assert report["overall"] == pytest.approx((305 / 358 + 270 / 456 + 547 / 740 + 0.75) / 4, abs=1e-12)
    assert report["overall"] == pytest.approx(0.7333124, abs=1e-7)
    assert report["missing_subsets"] == [] and report["count_mismatch"] == {}
    assert report["overall_sections"] == ["Chat", "Chat Hard", "Safety", "Reasoning"]

    table = format_report(report)
    assert "| Chat Hard | llmbar-natural | 100 | 50 | 50.0 |" in table
    assert "| **Reasoning** | *section score* | 1431 | 939 | **75.0** |" in table
    assert "**73.3** |" in table.splitlines()[-1]


def test_section_weights_cover_the_reference_counts():
    assert sum(SECTIONS["Chat"].values()) == 358
    assert sum(SECTIONS["Chat Hard"].values()) == 456
    assert sum(SECTIONS["Safety"].values()) == 740
    assert SECTIONS["Reasoning"]["math-prm"] == sum(v for k, v in SECTIONS["Reasoning"].items() if k != "math-prm")


def test_unknown_and_prior_subsets_are_reported_not_scored(tmp_path):
    rows = [
        {"subset": "alpacaeval-easy", "correct": True},
        {"subset": "alpacaeval-easy", "correct": False},
        {"subset": "my-subset", "correct": True},
        {"subset": "my-subset", "correct": True},
        {"subset": "my-subset", "correct": False},
        {"subset": "shp", "chosen_score": 2, "rejected_score": 1},
    ]
    report = rewardbench_report(rows)
    assert report["subsets"]["my-subset"]["section"] == "Other"
    assert report["sections"]["Other"] == pytest.approx(2 / 3)
    assert report["sections"]["Prior Sets"] == 1.0
    # only Chat is present among the core sections: overall = Chat = 1/2, Other / Prior Sets left out
    assert report["overall"] == 0.5 and report["overall_sections"] == ["Chat"]
    assert "math-prm" in report["missing_subsets"]
    assert report["count_mismatch"]["alpacaeval-easy"] == [2, 100]
    table = format_report(report)
    assert "| Other | my-subset | 3 | 2 | 66.7 |" in table
    assert "not part of the overall score" in table and "missing subsets" in table


def test_partial_file_keeps_reference_weights():
    # RewardBench weights stay the canonical subset sizes even when fewer rows are scored:
    # alpacaeval-easy acc 1.0 (weight 100), mt-bench-easy acc 0.0 (weight 28) -> 100 / 128
    rows = [{"subset": "alpacaeval-easy", "correct": True}, {"subset": "mt-bench-easy", "correct": False}]
    assert rewardbench_report(rows)["sections"]["Chat"] == pytest.approx(100 / 128)


def test_bad_rows_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"subset": "shp", "correct": True}) + "\n\n" + json.dumps({"correct": True}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:3: 'subset' must be a non-empty string"):
        rewardbench_report_from_file(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
        rewardbench_report_from_file(path)
    with pytest.raises(ValueError, match=r"rows row 0: needs 'correct'"):
        rewardbench_report([{"subset": "shp"}])
    with pytest.raises(ValueError, match=r"row 1: has one of chosen_score/rejected_score but not 'rejected_score'"):
        rewardbench_report([{"subset": "shp", "correct": True}, {"subset": "shp", "chosen_score": 1.0}])
    with pytest.raises(ValueError, match=r"row 0: 'correct' = True contradicts"):
        rewardbench_report([{"subset": "shp", "correct": True, "chosen_score": 0.0, "rejected_score": 0.0}])
    with pytest.raises(ValueError, match="no rows"):
        rewardbench_report([])
