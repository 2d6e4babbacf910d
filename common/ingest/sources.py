"""Streaming readers: JSONL (plain/.gz/.zst), Parquet (row-group streaming), trees of text/code files.

Every reader yields one ``RawDoc`` at a time and keeps memory bounded by the largest accepted
document (``max_doc_bytes``): an over-long JSONL line is skipped in fixed-size chunks, never read
whole. Bad input is counted in ``SourceStats`` (which becomes the ``read`` stage of the report),
never raised mid-run: malformed JSON, a missing text field, invalid UTF-8 (decoded with
replacement characters and counted), binary files in a tree, empty files, files that vanish
between listing and reading. Only a source that cannot be opened at all before the run raises
(see ``validate_sources``), so a job fails fast with an actionable message.

``s3://bucket/prefix`` sources go through ``tokenmill.common.storage`` (boto3 needed only then).
"""

from __future__ import annotations

import fnmatch
import functools
import gzip
import io
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tokenmill.common.errors import FailedPrecondition, InvalidArgument, NotFound
from tokenmill.common.inputs import check_input_allowed

# In a directory tree only these are parsed as JSON lines; a plain ``.json`` file there is a text
# file (configs and fixtures in code trees). A single ``.json`` source file is read as JSONL.
JSONL_SUFFIXES = (
    ".jsonl",
    ".ndjson",
    ".jsonl.gz",
    ".json.gz",
    ".jsonl.zst",
    ".json.zst",
    ".jsonl.zstd",
)
PARQUET_SUFFIXES = (".parquet", ".pq")
BINARY_SNIFF = 8192
CHUNK = 1 << 20


@dataclass
class RawDoc:
    """One document as read: ``id`` is stable (source path + line/row/file) for reports and dedup ties."""

    id: str
    text: str
    encoding_errors: int = 0


@dataclass
class SourceStats:
    files: int = 0
    docs: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n


def _has_suffix(name: str, suffixes: Sequence[str]) -> bool:
    low = name.lower()
    return any(low.endswith(s) for s in suffixes)


def _matches(rel: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """Globs match the path relative to the tree root or the bare file name (``*.py`` works at any depth)."""
    name = rel.rsplit("/", 1)[-1]

    def hit(globs: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(rel, g) or fnmatch.fnmatchcase(name, g) for g in globs)

    return (not include or hit(include)) and not (exclude and hit(exclude))


def _decode(data: bytes) -> tuple[str, int]:
    """UTF-8 with replacement; returns the text and how many invalid sequences were replaced."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - data.count("\ufffd".encode())


# ------------------------------------------------------------------------------------------ openers


class _RangeReader(io.RawIOBase):
    """A read-only stream over an object store key, fetched in ranges (constant memory)."""

    def __init__(self, store: Any, key: str, size: int):
        self._store, self._key, self._size, self._pos = store, key, size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        if self._pos >= self._size:
            return 0
        data = self._store.get_range(self._key, self._pos, min(len(buf), self._size - self._pos))
        buf[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _open_binary(opener: Callable[[], IO[bytes]], name: str) -> IO[bytes]:
    raw = opener()
    low = name.lower()
    if low.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]  # typeshed: not a typing.IO
    if low.endswith((".zst", ".zstd")):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    return raw


# ------------------------------------------------------------------------------------------ readers


def _get_text(obj: Any, field_path: str) -> Any:
    """``text`` or a dotted path ``meta.body`` into nested objects."""
    for part in field_path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def read_jsonl(
    stream: IO[bytes], name: str, text_field: str, stats: SourceStats, max_doc_bytes: int
) -> Iterator[RawDoc]:
    # typeshed wants a raw stream here; any binary stream with readinto (gzip, zstd, files) works
    buffered = io.BufferedReader(stream, CHUNK) if not isinstance(stream, io.BufferedReader) else stream  # type: ignore[type-var]
    lineno = 0
    while True:
        line = buffered.readline(max_doc_bytes + 1)
        if not line:
            break
        lineno += 1
        if len(line) > max_doc_bytes and not line.endswith(b"\n"):
            # Skip the rest of an over-long line without holding it.
            skipped = len(line)
            while True:
                rest = buffered.readline(CHUNK)
                skipped += len(rest)
                if not rest or rest.endswith(b"\n"):
                    break
            stats.bytes += skipped
            stats.skip("too_large")
            continue
        stats.bytes += len(line)
        if not line.strip():
            continue
        text, errors = _decode(line)
        try:
            obj = json.loads(text)
        except ValueError:
            stats.skip("malformed_json")
            continue
        value = _get_text(obj, text_field)
        if value is None:
            stats.skip("missing_text_field")
            continue
        if not isinstance(value, str):
            stats.skip("text_field_not_string")
            continue
        stats.docs += 1
        yield RawDoc(f"{name}:{lineno}", value, errors)


def read_parquet(path_or_file: Any, name: str, text_field: str, stats: SourceStats) -> Iterator[RawDoc]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path_or_file)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError subclasses
        stats.skip("unreadable_parquet")
        del exc
        return
    if text_field not in pf.schema_arrow.names:
        stats.skip("missing_text_field", pf.metadata.num_rows)
        return
    row = 0
    for rg in range(pf.num_row_groups):
        table = pf.read_row_group(rg, columns=[text_field])
        stats.bytes += table.nbytes
        for value in table.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                stats.skip("missing_text_field" if value is None else "text_field_not_string")
                continue
            stats.docs += 1
            yield RawDoc(f"{name}#{row}", value, 0)


def read_text_file(data: bytes, name: str, stats: SourceStats) -> Iterator[RawDoc]:
    stats.bytes += len(data)
    if not data.strip():
        stats.skip("empty_file")
        return
    if b"\x00" in data[:BINARY_SNIFF]:
        stats.skip("binary_file")
        return
    text, errors = _decode(data)
    stats.docs += 1
    yield RawDoc(name, text, errors)


# ------------------------------------------------------------------------------------------ sources


@dataclass
class SourceOptions:
    text_field: str = "text"
    include_globs: Sequence[str] = ()
    exclude_globs: Sequence[str] = ()
    max_doc_bytes: int = 32 * 1024 * 1024
    follow_symlinks: bool = False
    exclude_dirs: frozenset[str] = frozenset()  # directory names pruned from tree walks


def _iter_local(root: Path, opts: SourceOptions, stats: SourceStats) -> Iterator[RawDoc]:
    if root.is_file():
        yield from _read_local_file(root, root.name, opts, stats, single=True)
        return
    if not root.exists():
        stats.skip("source_vanished")
        return
    for dirpath, dirnames, filenames in os.walk(root, followlinks=opts.follow_symlinks, onerror=None):
        dirnames[:] = sorted(d for d in dirnames if d not in opts.exclude_dirs)
        for fname in sorted(filenames):
            path = Path(dirpath) / fname
            rel = path.relative_to(root).as_posix()
            if not _matches(rel, opts.include_globs, opts.exclude_globs):
                continue
            yield from _read_local_file(path, f"{root.name}/{rel}", opts, stats, single=False)


def _read_local_file(
    path: Path, name: str, opts: SourceOptions, stats: SourceStats, *, single: bool
) -> Iterator[RawDoc]:
    try:
        if path.is_symlink() and not opts.follow_symlinks and not single:
            return
        if not path.is_file():
            if not os.path.lexists(path):
                stats.skip("source_vanished")
            return
        stats.files += 1
        fname = path.name
        if _has_suffix(fname, PARQUET_SUFFIXES):
            yield from read_parquet(str(path), name, opts.text_field, stats)
            return
        if _has_suffix(fname, JSONL_SUFFIXES) or (single and _has_suffix(fname, (".json",))):
            with _open_binary(lambda: open(path, "rb"), fname) as stream:
                yield from read_jsonl(stream, name, opts.text_field, stats, opts.max_doc_bytes)
            return
        size = path.stat().st_size
        if size > opts.max_doc_bytes:
            stats.bytes += size
            stats.skip("too_large")
            return
        data = path.read_bytes()
    except FileNotFoundError:
        stats.skip("source_vanished")
        return
    except PermissionError:
        stats.skip("unreadable_file")
        return
    except (OSError, EOFError):
        # a truncated .gz/.zst or an I/O error on one file must not end the whole run
        stats.skip("corrupt_file")
        return
    yield from read_text_file(data, name, stats)


def _iter_s3(
    url: str, opts: SourceOptions, stats: SourceStats, input_roots: Sequence[str]
) -> Iterator[RawDoc]:
    store, prefix = _open_s3(url, input_roots)
    for key, size in store.list_sizes(prefix):
        rel = key[len(prefix) :].lstrip("/") or key.rsplit("/", 1)[-1]
        if not _matches(rel, opts.include_globs, opts.exclude_globs):
            continue
        stats.files += 1
        name = f"{url.rstrip('/')}/{rel}" if rel != key else f"s3://{key}"
        try:
            if _has_suffix(key, PARQUET_SUFFIXES):
                yield from read_parquet(
                    io.BufferedReader(_RangeReader(store, key, size)), name, opts.text_field, stats
                )
            elif _has_suffix(key, JSONL_SUFFIXES):
                # a RawIOBase is a binary stream; typeshed does not count it as a typing.IO
                opener = functools.partial(_RangeReader, store, key, size)
                with _open_binary(opener, key) as stream:  # type: ignore[arg-type]
                    yield from read_jsonl(stream, name, opts.text_field, stats, opts.max_doc_bytes)
            elif size > opts.max_doc_bytes:
                stats.bytes += size
                stats.skip("too_large")
            else:
                yield from read_text_file(store.get(key), name, stats)
        except NotFound:
            stats.skip("source_vanished")


def _open_s3(url: str, input_roots: Sequence[str] = ()) -> tuple[Any, str]:
    check_input_allowed(url, input_roots, what="source")
    try:
        from tokenmill.common.storage import open_store
    except ImportError as exc:  # pragma: no cover - storage module is part of the platform
        raise FailedPrecondition(
            f"cannot read {url}: tokenmill.common.storage is unavailable ({exc})"
        ) from None
    rest = url[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise InvalidArgument(f"source {url!r}: expected s3://bucket/prefix")
    return open_store(f"s3://{bucket}"), prefix


def validate_sources(sources: Sequence[str], input_roots: Sequence[str] = ()) -> None:
    """Fail fast, before a job starts, on sources that cannot be read at all or that lie outside
    `input_roots` (checked before existence, so nothing about other locations leaks)."""
    if not sources:
        raise InvalidArgument("no sources given; pass at least one local path or s3:// URL")
    for src in sources:
        if not src or "\x00" in src:
            raise InvalidArgument(f"source {src!r} is not a valid path")
        if src.startswith("s3://"):
            store, prefix = _open_s3(src, input_roots)
            if next(iter(store.list(prefix)), None) is None:
                raise NotFound(f"source {src} has no objects; check the bucket and prefix")
            continue
        if "://" in src:
            raise InvalidArgument(
                f"source {src!r}: unsupported scheme; use a local path or s3://bucket/prefix"
            )
        check_input_allowed(src, input_roots, what="source")
        path = Path(src)
        if not path.exists():
            raise NotFound(f"source {src} does not exist; give an existing file or directory")
        if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
            raise FailedPrecondition(
                f"source {src} is not readable by the ingest worker; fix its permissions"
            )
        if not (path.is_file() or path.is_dir()):
            raise InvalidArgument(f"source {src} is neither a regular file nor a directory")


def iter_sources(
    sources: Sequence[str], opts: SourceOptions, stats: SourceStats, input_roots: Sequence[str] = ()
) -> Iterator[RawDoc]:
    """All documents of all sources, in a deterministic order (sorted directory walks).

    With `input_roots`, each source is checked again and a local one is read through its resolved
    path, so a symlink swapped after the submit-time check cannot redirect the read elsewhere.
    Tree walks never follow symlinks out of a source (see SourceOptions.follow_symlinks)."""
    for src in sources:
        if src.startswith("s3://"):
            yield from _iter_s3(src, opts, stats, input_roots)
        else:
            path = Path(check_input_allowed(src, input_roots, what="source")) if input_roots else Path(src)
            yield from _iter_local(path, opts, stats)
