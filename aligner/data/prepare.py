"""Preparing datasets: rows read, rendered and tokenised once, written as a prepared folder.

:func:`prepare_dataset` (``aligner data prepare``) reads every row of its sources in order
(:func:`aligner.data.datasets.read_rows`: validation, skipping, HelpSteer2 pairing), renders
them in worker processes (:func:`aligner.data.datasets.render_sample`, the rendering
:func:`~aligner.data.datasets.read_samples` uses) and writes the samples in order
(:class:`aligner.data.prepared.PreparedWriter`), with a progress bar. Errors come in row
order, as a sequential read would raise them. The folder is built under a temporary name
beside ``out`` and renamed into place once its manifest is written: an interrupted
preparation leaves no folder that looks complete.

:func:`cached_prepare` is the same on first use of a raw source, into a cache folder keyed
by the source's content hash, the tokenizer's hash, the template and the sample options
(``$ALIGNER_DATA_CACHE``, default ``~/.cache/aligner/data``; delete it to reclaim the
space). Processes that ask for the same preparation at once (the ranks of a job) take a
file lock: one prepares, the others wait and map what it wrote.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

from tqdm import tqdm

from aligner.data.datasets import (
    HELPSTEER2_ATTRIBUTES,
    KIND_FORMATS,
    UNITS,
    DataFormatError,
    dataset_kind,
    read_rows,
    render_sample,
)
from aligner.data.prepared import (
    VERSION,
    PreparedWriter,
    encode_sample,
    is_prepared,
    layout_of,
    remove_folder,
    rendering,
    sample_options,
    write_manifest,
)
from aligner.data.readers import content_hash, count_rows, source_type, stat_signature
from aligner.data.tokenizer import load_tokenizer, tokenizer_hash
from aligner.runtime import UserError

CHUNK_ROWS = 512  # rows a worker renders per task
AUTO_WORKERS_FROM_BYTES = 32 << 20  # smaller sources are rendered in the preparing process


# ------------------------------------------------------------------------------ rendering
_worker_tokenizer = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _render_chunk(chunk, kind: str, layout: str, options: dict, tokenizer=None):
    """Rendered and encoded samples of ``chunk`` (``(source, number, row, format)`` tuples):
    ``[(encoded fields or None)]`` and the counts rendering made."""
    counts: Counter = Counter()
    out = []
    for source, number, row, fmt, where in chunk:
        sample = render_sample(tokenizer or _worker_tokenizer, kind, row, fmt, number, where, counts=counts,
                               **options)
        out.append(None if sample is None else encode_sample(layout, sample, source, number))
    return out, counts


class _Inline:
    """The worker pool's interface (``submit``, ``shutdown``), rendering in this process: for
    small sources, where starting workers would cost more than it saves."""

    class _Result:
        def __init__(self, fn, args):
            self.fn, self.args = fn, args

        def result(self):
            return self.fn(*self.args)

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def submit(self, fn, *args):
        return self._Result(fn, (*args, self.tokenizer))

    def shutdown(self, wait=True, cancel_futures=False):
        pass


def _workers(requested: Optional[int], sources: Sequence[Path]) -> int:
    if requested is not None:
        return max(0, int(requested))
    size = sum(f.stat().st_size for p in sources for f in ([p] if p.is_file() else p.iterdir()) if f.is_file())
    return min(os.cpu_count() or 1, 8) if size >= AUTO_WORKERS_FROM_BYTES else 0


# ------------------------------------------------------------------------------ prepare
def prepare_dataset(sources: Sequence, out, kind: str, tokenizer, *, fmt: str = "auto", template: str = "auto",
                    max_length: int = 4096, overlong: str = "truncate_left", skip_invalid: bool = False,
                    attributes: Sequence[str] = HELPSTEER2_ATTRIBUTES, reward_model: bool = False,
                    packing: bool = False, workers: Optional[int] = None, progress: bool = True,
                    overwrite: bool = False) -> dict:
    """Prepare the rows of ``sources`` (in order, as one dataset) into the folder ``out``;
    returns its manifest. ``workers``: rendering processes (None: one per core, up to 8, for
    sources of 32 MiB and more, else none). ``overwrite``: replace a prepared folder at ``out``."""
    kind = dataset_kind(kind)
    out = Path(out)
    sources = [Path(s) for s in sources]
    if not sources:
        raise ValueError("no sources to prepare")
    for path in sources:
        if not path.exists():
            raise FileNotFoundError(f"{path}: data file not found")
        if source_type(path) is None:
            raise DataFormatError(f"{path}: not a data file (.jsonl, .jsonl.gz, .parquet) or an Arrow folder written"
                                  " by datasets' save_to_disk")
    if out.exists() and not (overwrite and is_prepared(out)):
        raise UserError(f"{out}: already exists" + (" (a prepared dataset)" if is_prepared(out) else ""),
                        hint="--overwrite replaces a prepared dataset" if is_prepared(out) else "choose another --out")
    options = sample_options(kind, fmt=fmt, max_length=max_length, overlong=overlong, skip_invalid=skip_invalid,
                             attributes=attributes, reward_model=reward_model, packing=packing)
    render_options = {"template": template, "max_length": max_length, "overlong": overlong,
                      "attributes": list(attributes), "reward_model": reward_model, "packing": packing}
    manifest = {
        "aligner_prepared": VERSION, "kind": kind,
        "tokenizer": {"path": str(Path(tokenizer.path).resolve()), "sha256": tokenizer_hash(tokenizer),
                      "vocab_size": int(tokenizer.vocab_size)},
        "template": {"asked": str(template), "rendered": rendering(tokenizer, kind, template, reward_model)},
        "options": options,
        "sources": [{"path": str(p.resolve()), "type": source_type(p), "sha256": content_hash(p),
                     "stat": stat_signature(p)} for p in sources],
    }
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    remove_folder(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = _workers(workers, sources)
    # fresh interpreters, not forks: the preparing process may be a rank with threads running;
    # a worker that dies fails the preparation (BrokenProcessPool) instead of being restarted
    pool = (ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                initargs=(str(tokenizer.path),)) if n > 0 else _Inline(tokenizer))
    started = time.monotonic()
    try:
        counts = _write(sources, tmp, kind, manifest, fmt, skip_invalid, render_options, pool, n, tokenizer, progress)
        pool.shutdown()
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        remove_folder(tmp)
        raise
    manifest["report"] = dict(sorted(counts.items()))
    manifest["seconds"] = round(time.monotonic() - started, 3)
    write_manifest(tmp, manifest)
    if out.exists():  # overwrite: the old folder goes only once the new one is complete
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        remove_folder(old)
    else:
        os.rename(tmp, out)
    return manifest


def _write(sources, folder, kind, manifest, fmt, skip_invalid, render_options, pool, workers, tokenizer, progress):
    """Read, render (in ``pool``) and write every sample into ``folder``; the counts of what was
    skipped, dropped or cut. Fills the manifest's sources (format, rows), layout, samples and fields."""
    counts: Counter = Counter()
    writer = None
    pending: deque = deque()
    total = [count_rows(p) for p in sources]
    bar = tqdm(total=None if None in total else sum(total), unit=" rows", disable=not progress, file=sys.stderr,
               desc=f"aligner data: preparing {kind}", mininterval=1.0, dynamic_ncols=True)

    def chunks():
        for index, path in enumerate(sources):
            source = manifest["sources"][index]
            source["rows"], chunk = 0, []
            try:
                for number, row, rfmt in read_rows(path, fmt, KIND_FORMATS[kind], skip_invalid, counts):
                    source["format"] = rfmt
                    source["rows"] += 1
                    chunk.append((index, number, row, rfmt, f"{path}:{number}"))
                    if len(chunk) == CHUNK_ROWS:
                        yield chunk
                        chunk = []
            except DataFormatError:
                if chunk:  # rows before the bad one: their errors come first
                    yield chunk
                raise
            if chunk:
                yield chunk
            if "format" not in source:
                source["format"] = fmt

    def write(result):
        nonlocal writer
        samples, render_counts = result.result()
        counts.update(render_counts)
        for fields in samples:
            if fields is not None:
                if writer is None:
                    writer = PreparedWriter(folder, manifest["layout"], tokenizer.vocab_size)
                writer.add(fields)
        bar.update(len(samples))

    def drain(limit):
        while len(pending) > limit:
            write(pending.popleft())

    reader = chunks()
    try:
        while True:
            try:
                chunk = next(reader)
            except StopIteration:
                break
            except DataFormatError:
                drain(0)  # a render error in an earlier row is the first error
                raise
            layout = layout_of(kind, chunk[0][3])
            if manifest.setdefault("layout", layout) != layout:
                raise DataFormatError(f"{chunk[0][4]}: rows of format {chunk[0][3]!r} do not go with the earlier"
                                      " sources' (prepare them separately)")
            pending.append(pool.submit(_render_chunk, chunk, kind, layout, render_options))
            drain(2 * max(workers, 1))
        drain(0)
    finally:
        bar.close()
    samples = writer.samples if writer else 0
    unit = UNITS.get(kind, "samples")
    if not samples:
        raise DataFormatError(f"{', '.join(map(str, sources))}: no usable {unit} ({dict(counts) or 'empty file'})")
    manifest["samples"] = samples
    manifest["fields"] = writer.finalize()
    return counts


# ------------------------------------------------------------------------------ the cache
def cache_dir() -> Path:
    """``$ALIGNER_DATA_CACHE``, else ``$XDG_CACHE_HOME/aligner/data`` (``~/.cache/aligner/data``)."""
    env = os.environ.get("ALIGNER_DATA_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aligner" / "data"


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def source_hash(path, cache: Path) -> str:
    """The content hash of ``path``, remembered in the cache by path, sizes and modification
    times (so that an unchanged source is not read again to find its preparation)."""
    path = Path(path).resolve()
    memo = cache / "sources" / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
    stat = stat_signature(path)
    try:
        known = json.loads(memo.read_text())
        if known["stat"] == stat:
            return known["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = content_hash(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    _atomic_json(memo, {"path": str(path), "stat": stat, "sha256": digest})
    return digest


@contextmanager
def _locked(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_prepare(source, kind: str, tokenizer, *, fmt: str = "auto", template: str = "auto",
                   max_length: int = 4096, overlong: str = "truncate_left", skip_invalid: bool = False,
                   attributes: Sequence[str] = HELPSTEER2_ATTRIBUTES, reward_model: bool = False,
                   packing: bool = False) -> Path:
    """The cache folder holding ``source`` prepared with these settings, prepared now if it is
    not there yet (see the module docstring)."""
    kind = dataset_kind(kind)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: data file not found")
    cache = cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataFormatError(f"{cache}: cannot create the prepared-data cache ({exc.strerror}); set"
                              " ALIGNER_DATA_CACHE to a writable folder") from None
    options = sample_options(kind, fmt=fmt, max_length=max_length, overlong=overlong, skip_invalid=skip_invalid,
                             attributes=attributes, reward_model=reward_model, packing=packing)
    identity = {"version": VERSION, "source": source_hash(path, cache), "kind": kind,
                "tokenizer": tokenizer_hash(tokenizer),
                "template": [str(template), rendering(tokenizer, kind, template, reward_model)], "options": options}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
    folder = cache / key
    if is_prepared(folder):
        return folder
    with _locked(cache / f"{key}.lock"):
        if not is_prepared(folder):  # nobody prepared it while this process waited
            print(f"aligner data: preparing {path} ({kind}) into {folder}", file=sys.stderr)
            prepare_dataset([path], folder, kind, tokenizer, fmt=fmt, template=template, max_length=max_length,
                            overlong=overlong, skip_invalid=skip_invalid, attributes=attributes,
                            reward_model=reward_model, packing=packing, progress=sys.stderr.isatty())
    return folder
