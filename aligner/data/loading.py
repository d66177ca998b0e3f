"""Loading data for training and the commands: a source, a prepared folder or a blend.

:func:`load_dataset` returns a ``Sequence`` of samples (the dicts of
:mod:`aligner.data.datasets`, each with ``index``: its position) that holds no sample in
memory; ``[i]`` reads sample ``i`` from memory-mapped files:

- a prepared folder (``aligner data prepare``) is mapped once it is checked against the use
  (tokenizer, template, sample options): :class:`aligner.data.prepared.PreparedDataset`;
- a source (``.jsonl``, ``.jsonl.gz``, ``.parquet``, an Arrow folder) is prepared on first use
  into the cache (:func:`aligner.data.prepare.cached_prepare`), then mapped;
- a blend, a list of ``{"path", "weight"}`` entries (each a source or a prepared folder), is
  drawn from in proportion to the weights (:class:`aligner.data.blend.BlendedDataset`,
  seeded by ``seed``).

The sequence's ``report`` is what loading counted (skipped, dropped or cut samples; printed
when there is any). :func:`check_dataset` checks what needs no tokenizer (every row of a
source; a prepared folder's files and sources) for a trainer's checks before any process
group; :func:`dataset_paths` lists the paths a source names; :func:`source_format` says which
format its rows have.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence as SequenceABC
from pathlib import Path
from typing import List, Optional, Sequence

from aligner.data.blend import BlendedDataset
from aligner.data.datasets import (
    HELPSTEER2_ATTRIBUTES,
    KIND_FORMATS,
    DataFormatError,
    dataset_kind,
    print_report,
    read_rows,
)
from aligner.data.prepare import cached_prepare
from aligner.data.prepared import PreparedDataset, check_compatible, is_prepared, rendering, sample_options
from aligner.data.tokenizer import tokenizer_hash


def is_blend(source) -> bool:
    """Whether ``source`` is a blend: a list of ``{"path", "weight"}`` entries."""
    return isinstance(source, SequenceABC) and not isinstance(source, (str, bytes))


def blend_entries(source) -> List[tuple]:
    """``[(path, weight)]`` of a blend; a ValueError names the entry that is not ``{path, weight}``."""
    entries = []
    for i, entry in enumerate(source):
        if not isinstance(entry, Mapping) or set(entry) != {"path", "weight"}:
            raise ValueError(f"blend entry {i}: expected {{path: ..., weight: ...}}, got {entry!r}")
        weight = entry["weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"blend entry {i} ({entry['path']}): weight must be a positive number, got {weight!r}")
        entries.append((str(entry["path"]), float(weight)))
    if not entries:
        raise ValueError("a blend needs at least one {path, weight} entry")
    return entries


def dataset_paths(source) -> List[str]:
    """The paths a source names (one, or a blend's)."""
    return [path for path, _ in blend_entries(source)] if is_blend(source) else [str(source)]


def load_dataset(source, kind: str, tokenizer, fmt: str = "auto", template: str = "auto", max_length: int = 4096,
                 overlong: str = "truncate_left", skip_invalid: bool = False,
                 attributes: Sequence[str] = HELPSTEER2_ATTRIBUTES, reward_model: bool = False,
                 packing: bool = False, seed: int = 0):
    """Samples of ``kind`` from ``source`` (a path, a prepared folder or a blend; module
    docstring). The options are those of :func:`aligner.data.datasets.read_samples`, which
    reads the same samples into memory; ``seed`` draws a blend's samples."""
    options = dict(fmt=fmt, template=template, max_length=max_length, overlong=overlong, skip_invalid=skip_invalid,
                   attributes=attributes, reward_model=reward_model, packing=packing)
    if is_blend(source):
        entries = blend_entries(source)
        parts = [load_dataset(path, kind, tokenizer, **options) for path, _ in entries]
        return BlendedDataset(parts, [w for _, w in entries], seed, names=[p for p, _ in entries])
    kind = dataset_kind(kind)
    path = Path(source)
    if is_prepared(path):
        data = PreparedDataset(path)
        check_compatible(path, data.manifest, kind=kind, tokenizer_sha256=tokenizer_hash(tokenizer),
                         tokenizer_path=str(tokenizer.path), template=str(template),
                         rendered=rendering(tokenizer, kind, template, reward_model),
                         options=sample_options(kind, fmt=fmt, max_length=max_length, overlong=overlong,
                                                skip_invalid=skip_invalid, attributes=attributes,
                                                reward_model=reward_model, packing=packing),
                         longest=int(data.longest_sequences().max()) if kind == "prompts" and len(data) else None)
    else:
        data = PreparedDataset(cached_prepare(path, kind, tokenizer, **options), verify_sources=False, name=path)
    print_report(data.name, len(data), data.manifest["report"], data.unit)
    return data


def check_dataset(source, kind: str, fmt: str = "auto", skip_invalid: bool = False) -> None:
    """What can be checked of ``source`` for samples of ``kind`` without a tokenizer: every row
    of a raw source (errors name ``file:line``); a prepared folder's files, sources, kind and
    format; every entry of a blend."""
    if is_blend(source):
        for path, _ in blend_entries(source):
            check_dataset(path, kind, fmt, skip_invalid)
        return
    kind = dataset_kind(kind)
    if is_prepared(source):
        manifest = PreparedDataset(source).manifest
        if manifest["kind"] != kind:
            raise DataFormatError(f"{source}: prepared as {manifest['kind']!r} samples; this use reads {kind!r}"
                                  " samples: prepare it again with --kind " + kind)
        formats = {s["format"] for s in manifest["sources"]}
        if fmt != "auto" and formats != {fmt}:
            raise DataFormatError(f"{source}: prepared from rows of format {sorted(formats)}; this use names the"
                                  f" format {fmt!r}")
        return
    for _ in read_rows(source, fmt, KIND_FORMATS[kind], skip_invalid):
        pass


def source_format(source, fmt: str = "auto", allowed: Sequence[str] = ()) -> Optional[str]:
    """The format of a source's rows (its first valid row's, or ``fmt`` when named; a
    prepared folder's from its manifest); None for a source without rows."""
    if is_prepared(source):
        return PreparedDataset(source).manifest["sources"][0]["format"]
    for _, _, found in read_rows(source, fmt, allowed):
        return found
    return None

