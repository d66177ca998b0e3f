"""Files written whole or not at all: the content goes to ``<name>.tmp`` beside the target,
which then replaces the target in one rename (``os.replace``), so a crash leaves the
previous file or none, never a half-written one. The parent folder is created."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Union

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """``text`` as UTF-8 (newlines as given)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def jsonl_text(rows: Iterable[Any], **dumps_options) -> str:
    """One JSON document a line (``json.dumps(row, **dumps_options)``), each line ending in ``\\n``."""
    return "".join(json.dumps(row, **dumps_options) + "\n" for row in rows)


def write_jsonl(path: PathLike, rows: Iterable[Any], **dumps_options) -> Path:
    """``rows`` as a JSON-lines file, atomically (``dumps_options`` as for ``json.dumps``)."""
    return atomic_write_text(path, jsonl_text(rows, **dumps_options))
