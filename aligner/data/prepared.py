"""Prepared datasets: samples tokenised once, kept in megatron-core's memory-mapped indexed format.

A prepared dataset is a folder (docs/data_formats.md, "Prepared datasets")::

    manifest.json         what it holds and how it was made; written last, so a folder
                          without one is not a (finished) prepared dataset
    <field>.bin / .idx    one megatron-core IndexedDataset per field
                          (``megatron.core.datasets.indexed_dataset``)

Document ``i`` of every field holds sample ``i``'s sequences: one, or the ``n`` responses of
a SteerLM 2.0 group. The fields of each layout (token fields take ``uint16`` below 65,500
ids, else ``int32``; masks ``uint8``; text UTF-8 bytes; JSON values as JSON text):

============  ================================================================================
sft           ``tokens``, ``loss_mask``
regression    ``tokens``, ``labels`` (float32, NaN where unlabelled: the label mask)
pairs         ``chosen``, ``chosen_loss_mask``, ``rejected``, ``rejected_loss_mask``,
              ``numbers`` (float64 strength, margin, reward gap; NaN for None), ``subset``
prompts       ``prompt_tokens``, ``prompt``, ``meta`` (JSON), ``conversation`` (JSON),
              ``label`` (empty: None)
steerlm2      ``response_tokens``, ``response_loss_mask`` (n sequences per sample),
              ``log_probs`` (float64: the n values of each of the three log quantities)
unpaired      ``response_tokens``, ``response_loss_mask`` (1 sequence per sample, 2 for a
              pair), ``labels`` (uint8: the n labels, 1 desirable)
============  ================================================================================

and in every layout ``rows`` (int64 ``[source, line]``: the row-index map back to the
source file and line each sample came from, so errors keep naming ``file:line``).

The manifest records the kind and layout, the tokenizer's hash
(:func:`aligner.data.tokenizer.tokenizer_hash`), the template (asked for and rendered),
the options that shape the samples (:func:`sample_options`), each source's path, sha256,
size / modification times and row count, the load report, and each field's dtype and file
sizes. :class:`PreparedDataset` checks the files against it (a missing or truncated file, a
source that changed) and :func:`check_compatible` checks it against a use (another
tokenizer, template or option): each a one-line :class:`DataFormatError`.

:class:`PreparedDataset` maps the files and is a ``Sequence`` of samples: ``[i]`` reads
sample ``i`` (the dicts of :mod:`aligner.data.datasets`, plus ``index``: ``i``) and nothing
else; ranks on one node share the pages through the page cache, and the lengths
(:meth:`PreparedDataset.sample_tokens`, :meth:`~PreparedDataset.longest_sequences`) come
from the mapped index files without reading a token.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from aligner.data.datasets import (
    HELPSTEER2_ATTRIBUTES,
    KIND_FORMATS,
    NO_BOUND,
    UNITS,
    DataFormatError,
    load_report,
    resolve_template,
)
from aligner.data.formats import Conversation, Turn
from aligner.data.readers import content_hash, stat_signature

MANIFEST = "manifest.json"
VERSION = 1  # of the layout below; a prepared folder of another version is prepared again

TOKENS = "tokens"  # a field's dtype placeholder: the dataset's token dtype
LAYOUT_FIELDS = {
    "sft": {"tokens": TOKENS, "loss_mask": np.uint8},
    "regression": {"tokens": TOKENS, "labels": np.float32},
    "pairs": {"chosen": TOKENS, "chosen_loss_mask": np.uint8, "rejected": TOKENS, "rejected_loss_mask": np.uint8,
              "numbers": np.float64, "subset": np.uint8},
    "prompts": {"prompt_tokens": TOKENS, "prompt": np.uint8, "meta": np.uint8, "conversation": np.uint8,
                "label": np.uint8},
    "steerlm2": {"response_tokens": TOKENS, "response_loss_mask": np.uint8, "log_probs": np.float64},
    "unpaired": {"response_tokens": TOKENS, "response_loss_mask": np.uint8, "labels": np.uint8},
}
ROWS = "rows"
TOKEN_FIELDS = {"sft": ("tokens",), "regression": ("tokens",), "pairs": ("chosen", "rejected"),
                "prompts": ("prompt_tokens",), "steerlm2": ("response_tokens",),
                "unpaired": ("response_tokens",)}


def layout_of(kind: str, fmt: str) -> str:
    """How samples of ``kind`` from rows of format ``fmt`` are stored (``any_scored``: as
    regression rows or as pairs)."""
    if kind == "any_scored":
        return "regression" if fmt == "helpsteer2" else "pairs"
    return kind


def token_dtype(vocab_size: int):
    """megatron-core's choice (``DType.optimal_dtype``): uint16 below 65,500 ids, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


# ------------------------------------------------------------------------------ identity
def sample_options(kind: str, *, fmt: str = "auto", max_length: int = 4096, overlong: str = "truncate_left",
                   skip_invalid: bool = False, attributes=HELPSTEER2_ATTRIBUTES, reward_model: bool = False,
                   packing: bool = False) -> dict:
    """The options that shape the samples of ``kind`` (those that do not are left out, so
    that they never make two preparations differ)."""
    options = {"format": fmt, "skip_invalid": bool(skip_invalid), "max_length": int(max_length),
               "overlong": str(overlong)}
    if kind in ("regression", "any_scored"):
        options["attributes"] = [str(a) for a in attributes]
    if kind == "pairs":
        options.update(reward_model=bool(reward_model), packing=bool(packing))
    return options


def rendering(tokenizer, kind: str, template: str, reward_model: bool = False) -> str:
    """What ``template`` renders for ``kind`` with this tokenizer (as aligner.data.datasets
    does): ``auto`` resolved, and for a policy's pairs whether responses end with EOS
    (``auto`` resolved to extra_id) or with ``<extra_id_2>`` (``extra_id`` asked for)."""
    if kind == "steerlm2":
        return "extra_id"  # SteerLM attribute strings render in this template only
    reward = kind in ("regression", "any_scored") or (kind == "pairs" and reward_model)
    resolved = resolve_template(tokenizer, str(template), reward_model=reward)
    if kind in ("pairs", "unpaired") and not reward and resolved == "extra_id" and template != "extra_id":
        return "extra_id, responses ending with EOS"
    return resolved


# ------------------------------------------------------------------------------ encoding
def _bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def _text(arr: np.ndarray) -> str:
    return arr.tobytes().decode("utf-8")


def _mask(mask: torch.Tensor) -> np.ndarray:
    values = mask.numpy()
    if not np.isin(values, (0.0, 1.0)).all():
        raise ValueError("a loss mask holds values other than 0 and 1; it cannot be stored as bytes")
    return values.astype(np.uint8)


def _none_as_nan(value) -> float:
    return math.nan if value is None else float(value)


def encode_sample(layout: str, sample: dict, source: int, line: int) -> Dict[str, List[np.ndarray]]:
    """A sample (a dict of :mod:`aligner.data.datasets`) as the sequences of its fields."""
    if layout == "sft":
        out = {"tokens": [sample["tokens"].numpy()], "loss_mask": [_mask(sample["loss_mask"])]}
    elif layout == "regression":
        labels = sample["labels"].numpy().copy()
        labels[sample["label_mask"].numpy() == 0] = np.nan
        out = {"tokens": [sample["tokens"].numpy()], "labels": [labels]}
    elif layout == "pairs":
        numbers = [float(sample["strength"]), _none_as_nan(sample["margin"]), _none_as_nan(sample["reward_gap"])]
        out = {"chosen": [sample["chosen"].numpy()], "chosen_loss_mask": [_mask(sample["chosen_loss_mask"])],
               "rejected": [sample["rejected"].numpy()], "rejected_loss_mask": [_mask(sample["rejected_loss_mask"])],
               "numbers": [np.array(numbers, dtype=np.float64)], "subset": [_bytes(sample["subset"])]}
    elif layout == "prompts":
        conv = sample["conversation"]
        conversation = {"system": conv.system, "turns": [[t.role, t.content, t.label] for t in conv.turns]}
        out = {"prompt_tokens": [sample["prompt_tokens"].numpy()], "prompt": [_bytes(sample["prompt"])],
               # a value JSON has no type for (a date from a parquet column) is kept as its text
               "meta": [_bytes(json.dumps(sample["meta"], ensure_ascii=False, default=str))],
               "conversation": [_bytes(json.dumps(conversation, ensure_ascii=False))],
               "label": [_bytes(sample["label"] or "")]}
    elif layout == "steerlm2":
        out = {"response_tokens": [t.numpy() for t, _ in sample["responses"]],
               "response_loss_mask": [_mask(m) for _, m in sample["responses"]],
               "log_probs": [torch.cat([sample["log_p_attr"], sample["log_p_sft"], sample["log_q_prime"]]).numpy()]}
    elif layout == "unpaired":
        out = {"response_tokens": [t.numpy() for t, _ in sample["responses"]],
               "response_loss_mask": [_mask(m) for _, m in sample["responses"]],
               "labels": [sample["labels"].numpy().astype(np.uint8)]}
    else:
        raise ValueError(f"unknown layout {layout!r}")
    out[ROWS] = [np.array([source, line], dtype=np.int64)]
    return out


def _long(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.astype(np.int64))


def _float(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.astype(np.float32))


def decode_sample(kind: str, layout: str, read, line: int) -> dict:
    """The sample of :mod:`aligner.data.datasets` from its stored fields; ``read(field)``
    gives the field's sequences of this sample."""
    if layout == "sft":
        return {"tokens": _long(read("tokens")[0]), "loss_mask": _float(read("loss_mask")[0])}
    if layout == "regression":
        labels = read("labels")[0]
        unlabelled = np.isnan(labels)
        sample = {"tokens": _long(read("tokens")[0]),
                  "labels": torch.from_numpy(np.where(unlabelled, 0.0, labels).astype(np.float32)),
                  "label_mask": torch.from_numpy((~unlabelled).astype(np.float32))}
        if kind == "any_scored":
            sample["line"] = line
        return sample
    if layout == "pairs":
        strength, margin, gap = (float(x) for x in read("numbers")[0])
        return {"chosen": _long(read("chosen")[0]), "chosen_loss_mask": _float(read("chosen_loss_mask")[0]),
                "rejected": _long(read("rejected")[0]), "rejected_loss_mask": _float(read("rejected_loss_mask")[0]),
                "strength": strength, "margin": None if math.isnan(margin) else margin,
                "reward_gap": None if math.isnan(gap) else gap, "subset": _text(read("subset")[0]), "line": line}
    if layout == "prompts":
        conv = json.loads(_text(read("conversation")[0]))
        return {"prompt_tokens": _long(read("prompt_tokens")[0]), "prompt": _text(read("prompt")[0]),
                "meta": json.loads(_text(read("meta")[0])),
                "conversation": Conversation([Turn(*t) for t in conv["turns"]], conv["system"]),
                "label": _text(read("label")[0]) or None}
    if layout == "steerlm2":
        tokens, masks = read("response_tokens"), read("response_loss_mask")
        log_probs = read("log_probs")[0]
        n = len(tokens)
        return {"responses": [(_long(t), _float(m)) for t, m in zip(tokens, masks)],
                "log_p_attr": torch.tensor(log_probs[:n]), "log_p_sft": torch.tensor(log_probs[n:2 * n]),
                "log_q_prime": torch.tensor(log_probs[2 * n:]), "line": line}
    if layout == "unpaired":
        tokens, masks = read("response_tokens"), read("response_loss_mask")
        return {"responses": [(_long(t), _float(m)) for t, m in zip(tokens, masks)],
                "labels": torch.from_numpy(read("labels")[0].astype(bool)), "line": line}
    raise ValueError(f"unknown layout {layout!r}")


# ------------------------------------------------------------------------------ writing
class PreparedWriter:
    """Appends samples to one IndexedDatasetBuilder per field in ``folder`` (a new folder;
    :func:`aligner.data.prepare.prepare_dataset` renames it into place once complete)."""

    def __init__(self, folder, layout: str, vocab_size: int):
        # megatron-core takes seconds to import: commands that never prepare or map data do not pay it
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.folder = Path(folder)
        self.folder.mkdir(parents=True)
        self.layout = layout
        self.token_dtype = token_dtype(vocab_size)
        self.token_limit = np.iinfo(self.token_dtype).max
        self.dtypes = {name: (self.token_dtype if dtype == TOKENS else dtype)
                       for name, dtype in {**LAYOUT_FIELDS[layout], ROWS: np.int64}.items()}
        self.builders = {name: IndexedDatasetBuilder(str(self.folder / f"{name}.bin"), dtype=dtype)
                         for name, dtype in self.dtypes.items()}
        self.samples = 0

    def add(self, fields: Dict[str, List[np.ndarray]]) -> None:
        for name, builder in self.builders.items():
            seqs = fields[name]
            if LAYOUT_FIELDS[self.layout].get(name) == TOKENS:
                # a token id beyond the dtype would wrap around silently
                top = max((int(s.max()) for s in seqs if s.size), default=0)
                if top > self.token_limit:
                    raise ValueError(f"token id {top} does not fit {self.token_dtype.__name__} (the tokenizer's"
                                     " vocabulary size is too small for its ids)")
            builder.add_document(np.concatenate(seqs) if len(seqs) > 1 else seqs[0], [len(s) for s in seqs])
        self.samples += 1

    def finalize(self) -> Dict[str, dict]:
        """Write the index files; the fields' dtypes, sequence counts and file sizes (for the manifest)."""
        out = {}
        for name, builder in self.builders.items():
            builder.finalize(str(self.folder / f"{name}.idx"))
            if not builder.sequence_lengths or not sum(builder.sequence_lengths):
                # numpy cannot map an empty file (all values empty, e.g. no pair has a subset):
                # one byte that no sequence points at
                with open(self.folder / f"{name}.bin", "ab") as f:
                    f.write(b"\0")
            out[name] = {"dtype": self.dtypes[name].__name__, "sequences": len(builder.sequence_lengths),
                         "bin_bytes": (self.folder / f"{name}.bin").stat().st_size,
                         "idx_bytes": (self.folder / f"{name}.idx").stat().st_size}
        return out


def write_manifest(folder, manifest: dict) -> None:
    """``manifest.json``, written under a temporary name and renamed: present means complete."""
    tmp = Path(folder) / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, Path(folder) / MANIFEST)


# ------------------------------------------------------------------------------ reading
def is_prepared(path) -> bool:
    """Whether ``path`` is a prepared dataset folder (it has a manifest)."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(folder) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        inside = sorted(p.name for p in folder.iterdir() if (p / MANIFEST).is_file()) if folder.is_dir() else []
        hint = f"; it holds the prepared datasets {', '.join(inside)}: name one" if inside else ""
        raise DataFormatError(f"{folder}: no {MANIFEST}: not a prepared dataset, or its preparation did not finish"
                              + hint)
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{path}: not a readable manifest ({exc})") from None
    if manifest.get("aligner_prepared") != VERSION:
        raise DataFormatError(f"{folder}: prepared in layout version {manifest.get('aligner_prepared')!r}; this"
                              f" aligner reads version {VERSION}: prepare the data again")
    return manifest


def check_files(folder, manifest: dict) -> None:
    """Every field's ``.bin`` and ``.idx`` present, of the sizes the manifest records, with the
    sequence count it records (a one-line error naming the file otherwise)."""
    folder = Path(folder)
    for name, info in manifest["fields"].items():
        for suffix, key in ((".idx", "idx_bytes"), (".bin", "bin_bytes")):
            path = folder / f"{name}{suffix}"
            if not path.is_file():
                raise DataFormatError(f"{path}: missing (the manifest lists field {name!r}): prepare the data again")
            size = path.stat().st_size
            if size != info[key]:
                state = "truncated" if size < info[key] else "longer than written"
                raise DataFormatError(f"{path}: {size} bytes, the manifest records {info[key]}: the file is {state};"
                                      " prepare the data again")
        with open(folder / f"{name}.idx", "rb") as f:
            header = f.read(26)  # magic (9), version (8), dtype code (1), sequence count (8)
        if len(header) < 26 or header[:9] != b"MMIDIDX\x00\x00" or struct.unpack("<Q", header[18:26])[0] != info[
                "sequences"]:
            raise DataFormatError(f"{folder / (name + '.idx')}: not the index the manifest describes; prepare the"
                                  " data again")


def check_sources(folder, manifest: dict) -> None:
    """A source that still exists must hold the bytes it was prepared from (hashed again only
    when its sizes or modification times changed); a missing source is fine: the prepared
    folder holds everything training reads."""
    for source in manifest["sources"]:
        path = Path(source["path"])
        if not path.exists() or stat_signature(path) == source["stat"]:
            continue
        now = content_hash(path)
        if now != source["sha256"]:
            raise DataFormatError(f"{folder}: its source {path} changed since it was prepared (sha256 {now[:12]} now,"
                                  f" {source['sha256'][:12]} then): prepare it again")


def check_compatible(folder, manifest: dict, *, kind: str, tokenizer_sha256: str, tokenizer_path: str,
                     rendered: str, template: str, options: dict, longest: Optional[int] = None) -> None:
    """Refuse a prepared folder for a use it does not fit: another kind, tokenizer, template
    or sample option (one line naming what differs and how to prepare it again).

    Prompts whose preparation cut and dropped none, the longest ``longest`` tokens, are the
    samples of any length policy that lets that many through: their ``max_length`` and
    ``overlong`` are then not compared (a folder prepared before prompts were fitted too)."""
    where = f"{folder}: prepared"
    report = manifest["report"]
    fitted = {k: report[k] for k in ("truncated_left", "dropped_overlong") if report.get(k)}
    if kind == "prompts" and longest is not None and longest <= options["max_length"] and not fitted:
        options = {k: v for k, v in options.items() if k not in ("max_length", "overlong")}
    elif kind == "prompts" and options["max_length"] == NO_BOUND:
        raise DataFormatError(f"{where} with max_length = {manifest['options'].get('max_length')}, which cut or"
                              f" dropped prompts ({fitted}); this use reads the prompts whole and fits them itself:"
                              " prepare it again with a --max-length every prompt fits, or give the source file")
    if manifest["kind"] != kind:
        raise DataFormatError(f"{where} as {manifest['kind']!r} samples; this use reads {kind!r} samples (allowed"
                              f" formats {list(KIND_FORMATS[kind])}): prepare it again with --kind {kind}")
    if manifest["tokenizer"]["sha256"] != tokenizer_sha256:
        theirs = manifest["tokenizer"]
        raise DataFormatError(f"{where} with another tokenizer ({theirs['path']}, sha256 {theirs['sha256'][:12]}); this"
                              f" use's is {tokenizer_path} (sha256 {tokenizer_sha256[:12]}): prepare it again with"
                              f" --tokenizer {tokenizer_path}")
    fmt = options["format"]
    if fmt != "auto" and any(s["format"] != fmt for s in manifest["sources"]):
        raise DataFormatError(f"{where} from rows of format {sorted({s['format'] for s in manifest['sources']})};"
                              f" this use names the format {fmt!r}")
    skipped = sum(v for k, v in manifest["report"].items() if k.startswith("invalid: "))
    if skipped and not options["skip_invalid"]:
        raise DataFormatError(f"{where} with skip_invalid, which skipped {skipped} invalid rows; this use does not"
                              " skip invalid rows (set skip_invalid, or fix the rows and prepare again)")
    for key, value in options.items():
        theirs = manifest["options"].get(key)
        if key in ("format", "skip_invalid") or theirs == value:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            again = f"{'with' if value else 'without'} {flag}"
        else:
            again = f"with {flag} {','.join(value) if isinstance(value, list) else value}"
        raise DataFormatError(f"{where} with {key} = {theirs!r}; this use asks for {value!r}: prepare it again {again}")
    if manifest["template"]["rendered"] != rendered:
        theirs = manifest["template"]
        raise DataFormatError(f"{where} with template {theirs['asked']} (rendering {theirs['rendered']}); this use's"
                              f" template {template} renders {rendered}: prepare it again with --template {template}")


class PreparedDataset(Sequence):
    """A prepared folder, mapped: a ``Sequence`` of samples read on access (module docstring).

    ``verify_sources``: compare the sources with the manifest (off for the implicit cache,
    whose folders are keyed by their sources' content). ``name``: what reports call it (the
    source for a cached preparation, else the folder). ``report``: the load report.
    """

    def __init__(self, folder, verify_sources: bool = True, name=None):
        # megatron-core takes seconds to import: commands that never prepare or map data do not pay it
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.folder = Path(folder)
        self.name = str(name or folder)
        self.manifest = read_manifest(self.folder)
        check_files(self.folder, self.manifest)
        if verify_sources:
            check_sources(self.folder, self.manifest)
        self.kind, self.layout = self.manifest["kind"], self.manifest["layout"]
        self.fields = {name: IndexedDataset(str(self.folder / name)) for name in self.manifest["fields"]}
        self._n = self.manifest["samples"]
        self.report = dict(load_report(self.name, self.kind, self._n, self.manifest["report"]),
                           prepared=str(self.folder))
        self.unit = UNITS.get(self.kind, "samples")

    def __reduce__(self):  # picklable: the folder is mapped again where it is unpickled
        return PreparedDataset, (self.folder, False, self.name)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        i = int(i)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"sample {i} of a prepared dataset of {self._n}")
        _, line = self.fields[ROWS][i]

        def read(name):
            ds = self.fields[name]
            docs = ds.document_indices
            return [ds[int(s)] for s in range(int(docs[i]), int(docs[i + 1]))]

        return dict(decode_sample(self.kind, self.layout, read, int(line)), index=i)

    def where(self, i: int) -> str:
        """``file:line`` of the row sample ``i`` came from."""
        source, line = self.fields[ROWS][int(i)]
        return f"{self.manifest['sources'][int(source)]['path']}:{int(line)}"

    def _per_sample(self, name: str, reduce) -> np.ndarray:
        ds = self.fields[name]
        if ds.document_indices.shape[0] - 1 == len(ds.sequence_lengths):  # one sequence per sample
            return np.asarray(ds.sequence_lengths, dtype=np.int64)
        return reduce.reduceat(np.asarray(ds.sequence_lengths, dtype=np.int64), ds.document_indices[:-1])

    def sample_tokens(self) -> np.ndarray:
        """[n] tokens each sample puts through the model (every sequence counted), from the index files."""
        return sum(self._per_sample(name, np.add) for name in TOKEN_FIELDS[self.layout])

    def longest_sequences(self) -> np.ndarray:
        """[n] each sample's longest sequence, from the index files."""
        lengths = [self._per_sample(name, np.maximum) for name in TOKEN_FIELDS[self.layout]]
        return np.maximum.reduce(lengths) if len(lengths) > 1 else lengths[0]


def remove_folder(folder) -> None:
    """Remove a (partial) prepared folder, if there is one."""
    shutil.rmtree(folder, ignore_errors=True)
