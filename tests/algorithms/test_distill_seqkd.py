"""Sequence-level distillation (``distill.responses = teacher``), the parts checked by hand:
the training sample of a row's prompt and the teacher's response, the responses file's
round trip and its refusals (a changed file, a missing record, a malformed row), and the
config's refusals. The runs themselves (every layout equal to one process, parity with
transformers' greedy decoding and NLL, resume after SIGKILL) are in test_distill.py and
test_spin_gkd_resume.py."""
import hashlib
import json
import re
from types import SimpleNamespace

import pytest
import torch

from aligner.algorithms.distill import DistillAlgorithm, check_teacher_rows, row_prompt, teacher_sample
from aligner.algorithms.iterative import read_recorded_rows, record_rows

EOS = 2
ROWS = [{"index": 0, "response": "a b", "response_tokens": [9, 10, EOS], "truncated": False},
        {"index": 1, "response": "c d e", "response_tokens": [11, 12, 13], "truncated": True}]
PROMPTS = {0: [1, 5, 6, 7], 1: [1, 8]}


def test_the_sample_is_the_prompt_then_the_response_with_its_loss_mask_on_the_response():
    s = teacher_sample([1, 5, 6, 7], [9, 10, EOS])
    assert s["tokens"].tolist() == [1, 5, 6, 7, 9, 10, EOS]
    assert s["loss_mask"].tolist() == [0, 0, 0, 0, 1, 1, 1]
    # a row's prompt: the tokens before its first target (an SFT row: prompt 1 5 6 7, response 3 4 EOS)
    row = {"tokens": torch.tensor([1, 5, 6, 7, 3, 4, EOS]), "loss_mask": torch.tensor([0., 0, 0, 0, 1, 1, 1])}
    assert row_prompt(row).tolist() == [1, 5, 6, 7]


def _algorithm(path, digest, kd_weight=1.0):
    algo = DistillAlgorithm(0, responses="teacher", kd_weight=kd_weight, sft_weight=1.0)
    algo.responses_file = path
    algo.teacher_maker = SimpleNamespace(tokenizer=SimpleNamespace(eos_id=EOS))
    algo._prompts = [{"index": i, "prompt_tokens": torch.tensor(p)} for i, p in PROMPTS.items()]
    algo.load_state_dict({"teacher_responses_sha256": digest} if digest else {})
    return algo


def test_the_responses_file_round_trips_and_a_resumed_run_reads_it_back(tmp_path):
    path = tmp_path / "teacher_responses.jsonl"
    rows, digest = record_rows(path, ROWS)
    assert rows == ROWS and digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [json.loads(line) for line in path.read_text().splitlines()] == ROWS
    assert read_recorded_rows(path, digest, "missing", "changed") == ROWS
    algo = _algorithm(path, digest)
    algo.teacher_responses(SimpleNamespace(step=3))
    assert algo._responses[0]["tokens"].tolist() == [1, 5, 6, 7, 9, 10, EOS]
    assert algo._responses[0]["loss_mask"].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert algo._responses[1]["tokens"].tolist() == [1, 8, 11, 12, 13]  # truncated: kept, without EOS
    assert algo._responses[1]["loss_mask"].tolist() == [0, 0, 1, 1, 1]
    m = algo._response_metrics
    assert m["teacher/truncated"] == 1.0 and m["teacher/response_tokens"] == 3.0
    assert algo.state_dict() == {"teacher_responses_sha256": digest}  # the next checkpoint records it again


def test_a_changed_or_unrecorded_responses_file_is_refused(tmp_path):
    path = tmp_path / "teacher_responses.jsonl"
    _, digest = record_rows(path, ROWS)
    path.write_text(path.read_text().replace("[11, 12, 13]", "[11, 12, 14]"))
    with pytest.raises(ValueError, match=f"^{path}: differs from the teacher's responses this run was trained on"):
        _algorithm(path, digest).teacher_responses(SimpleNamespace(step=3))
    with pytest.raises(FileNotFoundError, match="resumes at step 3 with distill.responses = teacher, but the"
                                                " checkpoint does not record"):
        _algorithm(path, None).teacher_responses(SimpleNamespace(step=3))
    path.unlink()
    with pytest.raises(FileNotFoundError, match="the file is missing from the run folder"):
        _algorithm(path, digest).teacher_responses(SimpleNamespace(step=3))


@pytest.mark.parametrize("row, message", [
    ({"index": 1, "response_tokens": [11, 12], "truncated": False}, "line 2: response_tokens: a response that is not"
                                                                   " truncated ends with EOS (2), this one with 12"),
    ({"index": 1, "response_tokens": [], "truncated": True}, "line 2: response_tokens: expected a non-empty list"),
    ({"index": 1, "response_tokens": [11], "truncated": "no"}, "line 2: truncated: expected true or false"),
    ({"index": 5, "response_tokens": [11], "truncated": True}, "holds the teacher's responses of rows"),
])
def test_a_malformed_responses_file_is_refused_naming_line_and_field(tmp_path, row, message):
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path))}: .*{re.escape(message)}"):
        check_teacher_rows([ROWS[0], row], [0, 1], EOS, tmp_path)


def _config(tmp_path, **distill):
    return {"algorithm": "distill", "init": {"hf": "student"}, "data": {"train": "rows.jsonl"},
            "distill": dict({"teacher": "teacher"}, **distill), "trainer": {"out_dir": str(tmp_path)}}


@pytest.mark.parametrize("distill, message", [
    ({"responses": "teacher", "top_k": 4, "precompute": True}, "distill.precompute = true stores the teacher's top-k"
                                                               " of the rows' responses; with distill.responses ="
                                                               " teacher"),
    ({"teacher_generation": {"temperature": 0.0}}, "distill.teacher_generation.temperature = 0.0 has no effect with"
                                                   " distill.responses = 'rows'"),
    ({"responses": "teacher", "teacher_generation": {"max_new_tokens": 0}},
     "distill.teacher_generation.max_new_tokens = 0: expected >= 1"),
])
def test_bad_combinations_are_refused_naming_the_key(tmp_path, distill, message):
    from aligner.algorithms.distill import DistillTrainer
    from aligner.config import ConfigError

    with pytest.raises(ConfigError) as err:
        DistillTrainer(_config(tmp_path, **distill))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_greedy_teacher_responses_and_on_policy_steps_combine(tmp_path):
    from aligner.algorithms.distill import DistillTrainer

    cfg = DistillTrainer(_config(tmp_path, responses="teacher", lmbda=0.5, kd_weight=0.0, sft_weight=1.0,
                                 teacher_generation={"temperature": 0.0, "max_new_tokens": 32})).cfg.distill
    assert str(cfg.responses) == "teacher" and cfg.teacher_generation.temperature == 0.0
