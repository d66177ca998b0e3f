"""An iteration's samples file read back on resume (:meth:`IterativeAlgorithm.read_recorded`):
the rows as written when the file's SHA-256 is the one the checkpoint recorded; one-line
errors naming the file when the record or the file is missing, or the file was changed."""
import hashlib
import json
from types import SimpleNamespace

import pytest

from aligner.algorithms.iterative import IterativeAlgorithm

ROWS = [{"index": 0, "iteration": 1, "rejected": "a b"}, {"index": 1, "iteration": 1, "rejected": "c"}]


def _read(path, expected):
    return IterativeAlgorithm.read_recorded(SimpleNamespace(title="SPIN"), path, expected, 1, "not there")


def test_the_recorded_file_reads_back_and_a_changed_or_missing_one_is_refused(tmp_path):
    path = tmp_path / "iteration_1.jsonl"
    data = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    assert _read(path, digest) == ROWS
    with pytest.raises(FileNotFoundError, match=f"^{path}: not there$"):
        _read(path, None)
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path / 'other.jsonl'}: not there$"):
        _read(tmp_path / "other.jsonl", digest)
    path.write_bytes(data.replace(b'"c"', b'"d"'))
    with pytest.raises(ValueError, match="differs from the samples SPIN iteration 1 was trained on"):
        _read(path, digest)
