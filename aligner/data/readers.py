"""Where rows come from: the files users have, read row by row into plain dicts.

=====================  =====================================================================
``.jsonl``             JSON Lines: one object per line, UTF-8, blank lines skipped
``.jsonl.gz``          the same, gzip-compressed (HelpSteer2 is published so)
``.parquet``           a parquet file (the Hugging Face hub's format), through ``pyarrow``
Arrow folder           a folder written by ``datasets.Dataset.save_to_disk`` (``state.json``
                       beside ``data-*.arrow``), through ``datasets``
=====================  =====================================================================

:func:`iter_rows` yields ``(number, row)``: the line number for JSON Lines, the 1-based row
number for parquet and Arrow inputs, so that every error can name ``file:number``. A null
in a parquet / Arrow column is an absent field (columnar files give every row every
column). Parquet and Arrow need the optional ``data`` extra (``pip install
'aligner[data]'``); without it, reading one is a one-line error naming the extra.

:func:`content_hash` identifies a source by its bytes (sha256; an Arrow folder by its
files' names and bytes); :func:`stat_signature` is the cheap check (sizes and
modification times) that says when the hash must be taken again.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from aligner.runtime import UserError

ROWS_PER_BATCH = 1024  # rows read at once from columnar files


class DataFormatError(ValueError):
    """A row does not follow its format: the message names file, line and field."""


# ------------------------------------------------------------------------------ JSON Lines
def parse_json_line(raw: bytes, where: str) -> Optional[dict]:
    """One line of a jsonl file -> its JSON object (None for a blank line); errors name
    ``where`` (``file:line``) and what is wrong. The one jsonl line reader of the toolkit."""
    try:
        line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def iter_json_objects(path):
    """``(line number, object)`` for every non-blank line of a jsonl file (strict: the first
    bad line raises :class:`DataFormatError` naming ``file:line``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            row = parse_json_line(raw, f"{path}:{lineno}")
            if row is not None:
                yield lineno, row


# ------------------------------------------------------------------------------ any source
def source_type(path) -> Optional[str]:
    """``jsonl``, ``jsonl.gz``, ``parquet`` or ``arrow`` (a ``save_to_disk`` folder); None
    for anything else (e.g. a prepared folder, which holds samples, not rows)."""
    p = Path(path)
    if p.is_dir():
        return "arrow" if (p / "state.json").is_file() else None
    name = p.name.lower()
    if name.endswith(".gz"):
        return "jsonl.gz"
    if name.endswith(".parquet"):
        return "parquet"
    return "jsonl"


def iter_lines(path) -> Iterator[Tuple[int, bytes]]:
    """``(line number, raw line)`` of a JSON Lines file, gzip-compressed or not."""
    path = Path(path)
    if source_type(path) == "jsonl.gz":
        try:
            with gzip.open(path, "rb") as f:
                for lineno, raw in enumerate(f, 1):
                    yield lineno, raw
        except (OSError, EOFError, zlib.error) as exc:  # not gzip, or cut short
            raise DataFormatError(f"{path}: not a complete gzip file ({exc})") from None
        return
    with open(path, "rb") as f:
        yield from enumerate(f, 1)


def iter_rows(path) -> Iterator[Tuple[int, Optional[dict]]]:
    """``(number, row)`` for every row of a source (``row`` None for a blank jsonl line);
    a line that is not a JSON object raises :class:`DataFormatError` naming ``file:line``
    when the consumer reaches it (the consumer decides whether to skip it)."""
    path = Path(path)
    kind = source_type(path)
    if kind is None:
        if (path / "manifest.json").is_file():
            raise DataFormatError(f"{path}: a prepared dataset holds samples, not rows: read the source it was"
                                  " prepared from, or load the prepared dataset")
        raise DataFormatError(f"{path}: a folder that is neither a prepared dataset (manifest.json) nor an Arrow"
                              " dataset written by datasets' save_to_disk (state.json)" + _splits_hint(path))
    if not path.exists():
        raise FileNotFoundError(f"{path}: data file not found")
    if kind in ("jsonl", "jsonl.gz"):
        for lineno, raw in iter_lines(path):
            yield lineno, _Line(raw, f"{path}:{lineno}")
        return
    batches = _parquet_batches(path) if kind == "parquet" else _arrow_batches(path)
    number = 0
    for batch in batches:
        for row in batch:
            number += 1
            yield number, {k: v for k, v in row.items() if v is not None}


class _Line:
    """A raw jsonl line, parsed when asked (so that a bad line fails where it is consumed)."""

    __slots__ = ("raw", "where")

    def __init__(self, raw: bytes, where: str):
        self.raw, self.where = raw, where

    def parse(self) -> Optional[dict]:
        return parse_json_line(self.raw, self.where)


def row_of(item) -> Optional[dict]:
    """The row an :func:`iter_rows` item carries (a jsonl line is parsed here)."""
    return item.parse() if isinstance(item, _Line) else item


def _require(module: str, path, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        # not a fault of the data: the install lacks the optional extra
        raise UserError(f"{path}: reading {what} needs the optional package {module!r}: pip install"
                        " 'aligner[data]'") from None


def _parquet_batches(path) -> Iterator[List[dict]]:
    _require("pyarrow", path, "parquet files")
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(str(path))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise DataFormatError(f"{path}: not a readable parquet file ({exc})") from None
    for batch in reader.iter_batches(batch_size=ROWS_PER_BATCH):
        yield batch.to_pylist()


def _arrow_batches(path) -> Iterator[List[dict]]:
    datasets = _require("datasets", path, "Arrow folders")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - datasets raises several types for a damaged folder
        raise DataFormatError(f"{path}: not a readable Arrow dataset folder ({exc})") from None
    for batch in ds.iter(batch_size=ROWS_PER_BATCH):
        names = list(batch)
        yield [dict(zip(names, values)) for values in zip(*(batch[n] for n in names))]


def _splits_hint(path) -> str:
    p = Path(path)
    if (p / "dataset_dict.json").is_file():
        splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
        return f"; it is a DatasetDict: name one of its splits ({', '.join(str(p / s) for s in splits)})"
    return ""


def count_rows(path) -> Optional[int]:
    """The number of rows (jsonl: non-blank lines), read cheaply where the format allows; None
    where it would cost a pass over compressed data."""
    kind = source_type(path)
    if kind == "jsonl":
        count, last = 0, b"\n"
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                count += block.count(b"\n")
                last = block[-1:]
        return count + (last != b"\n")
    if kind == "parquet":
        _require("pyarrow", path, "parquet files")
        import pyarrow.parquet as pq

        return pq.ParquetFile(str(path)).metadata.num_rows
    if kind == "arrow":
        datasets = _require("datasets", path, "Arrow folders")
        return len(datasets.load_from_disk(str(path)))
    return None


# ------------------------------------------------------------------------------ identity
def _files(path) -> List[Path]:
    p = Path(path)
    return sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]


def content_hash(path) -> str:
    """sha256 of a source's bytes (a folder: of its files' names and bytes, in name order)."""
    digest = hashlib.sha256()
    folder = Path(path).is_dir()
    for f in _files(path):
        if folder:
            digest.update(f.name.encode() + b"\0")
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def stat_signature(path) -> List[list]:
    """``[name, size, mtime_ns]`` of a source's files: unchanged signature, unchanged bytes
    (the assumption ``make`` and git's index make too)."""
    out = []
    for f in _files(path):
        st = os.stat(f)
        out.append([f.name, st.st_size, st.st_mtime_ns])
    return out
