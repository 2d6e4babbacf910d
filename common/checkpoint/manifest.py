"""The checkpoint manifest: what a version contains, as JSON (the store's commit record).

A manifest lists every tensor (dtype, shape, byte size, chunk digests, optional shard placement)
and every file, plus config, metrics, lineage and labels. It is validated before an upload starts
(dtype/shape must match nbytes; chunk counts must match the chunk size) so that a committed version
always describes bytes that can be reassembled exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from tokenmill.common.checkpoint.format import DTYPE_SIZES, parse_digest
from tokenmill.common.checkpoint.names import validate_entry_name
from tokenmill.common.errors import InvalidArgument
from tokenmill.common.names import validate_file_name

DEFAULT_CHUNK_SIZE = 4 << 20
MIN_CHUNK_SIZE = 64 << 10
MAX_CHUNK_SIZE = 16 << 20
MAX_ENTRIES = 200_000
MAX_DIMS = 8


def check_digest(digest: str) -> str:
    """`digest` if it is a valid chunk digest ('blake3:<hex>' or a bare sha256 hex), else INVALID_ARGUMENT."""
    parse_digest(digest)
    return digest


def chunk_lengths(nbytes: int, chunk_size: int) -> list[int]:
    """Byte length of each chunk of an entry of `nbytes` bytes."""
    if nbytes == 0:
        return []
    full, rest = divmod(nbytes, chunk_size)
    return [chunk_size] * full + ([rest] if rest else [])


@dataclass
class ShardInfo:
    """Where a piece sits in its logical tensor (FSDP shards): per-dimension offsets."""

    logical_name: str
    global_shape: list[int]
    offsets: list[int]

    def to_json(self) -> dict[str, Any]:
        return {"logical_name": self.logical_name, "global_shape": self.global_shape, "offsets": self.offsets}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardInfo:
        return cls(
            str(d["logical_name"]), [int(x) for x in d["global_shape"]], [int(x) for x in d["offsets"]]
        )


@dataclass
class TensorEntry:
    name: str
    dtype: str
    shape: list[int]
    nbytes: int
    chunks: list[str]
    shard: ShardInfo | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "dtype": self.dtype,
            "shape": self.shape,
            "nbytes": self.nbytes,
            "chunks": self.chunks,
        }
        if self.shard is not None:
            d["shard"] = self.shard.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorEntry:
        shard = ShardInfo.from_json(d["shard"]) if d.get("shard") else None
        return cls(
            str(d["name"]),
            str(d["dtype"]),
            [int(x) for x in d["shape"]],
            int(d["nbytes"]),
            list(d["chunks"]),
            shard,
        )


@dataclass
class FileEntry:
    name: str
    nbytes: int
    chunks: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "nbytes": self.nbytes, "chunks": self.chunks}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FileEntry:
        return cls(str(d["name"]), int(d["nbytes"]), list(d["chunks"]))


# Either kind of entry, where only what both share matters: name, nbytes and chunk digests.
Entry: TypeAlias = TensorEntry | FileEntry


@dataclass
class Manifest:
    tensors: list[TensorEntry] = field(default_factory=list)
    files: list[FileEntry] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, str] = field(default_factory=dict)  # parent, dataset, job_id
    labels: dict[str, str] = field(default_factory=dict)
    chunk_size: int = DEFAULT_CHUNK_SIZE

    @property
    def logical_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors) + sum(f.nbytes for f in self.files)

    def digests(self) -> set[str]:
        out: set[str] = set()
        for e in self.tensors:
            out.update(e.chunks)
        for f in self.files:
            out.update(f.chunks)
        return out

    def expected_sizes(self) -> dict[str, int]:
        """digest -> byte length implied by its position; InvalidArgument on contradictions."""
        sizes: dict[str, int] = {}
        for kind, entries in (("tensor", self.tensors), ("file", self.files)):
            for e in entries:
                for i, (d, n) in enumerate(
                    zip(e.chunks, chunk_lengths(e.nbytes, self.chunk_size), strict=True)
                ):
                    if sizes.setdefault(d, n) != n:
                        raise InvalidArgument(
                            f"{kind} {e.name!r} chunk {i} has digest {d[:12]}... with length {n}, but the "
                            f"same digest appears elsewhere with length {sizes[d]}: digests are wrong"
                        )
        return sizes

    def tensor(self, name: str) -> TensorEntry | None:
        return next((t for t in self.tensors if t.name == name), None)

    def file(self, name: str) -> FileEntry | None:
        return next((f for f in self.files if f.name == name), None)

    def extend(self, tensors: list[TensorEntry], files: list[FileEntry]) -> None:
        self.tensors.extend(tensors)
        self.files.extend(files)
        self.validate()

    def to_json(self) -> dict[str, Any]:
        return {
            "tensors": [t.to_json() for t in self.tensors],
            "files": [f.to_json() for f in self.files],
            "config": self.config,
            "metrics": self.metrics,
            "lineage": self.lineage,
            "labels": self.labels,
            "chunk_size": self.chunk_size,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        return cls(
            tensors=[TensorEntry.from_json(t) for t in d.get("tensors", [])],
            files=[FileEntry.from_json(f) for f in d.get("files", [])],
            config=dict(d.get("config") or {}),
            metrics=dict(d.get("metrics") or {}),
            lineage={k: str(v) for k, v in (d.get("lineage") or {}).items()},
            labels={k: str(v) for k, v in (d.get("labels") or {}).items()},
            chunk_size=int(d.get("chunk_size") or DEFAULT_CHUNK_SIZE),
        )

    def validate(self) -> None:
        """Raise InvalidArgument naming the first entry that cannot describe real bytes."""
        if not (MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE):
            raise InvalidArgument(
                f"chunk_size {self.chunk_size} out of range [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}] bytes"
            )
        if len(self.tensors) + len(self.files) > MAX_ENTRIES:
            raise InvalidArgument(
                f"too many entries ({len(self.tensors) + len(self.files)}); limit {MAX_ENTRIES}"
            )
        seen: set[str] = set()
        for t in self.tensors:
            validate_entry_name(t.name)
            if t.name in seen:
                raise InvalidArgument(f"tensor {t.name!r} appears twice in the manifest")
            seen.add(t.name)
            _validate_tensor(t)
            self._validate_chunks("tensor", t.name, t.nbytes, t.chunks)
        seen_files: set[str] = set()
        for f in self.files:
            validate_file_name(f.name)
            if f.name in seen_files:
                raise InvalidArgument(f"file {f.name!r} appears twice in the manifest")
            seen_files.add(f.name)
            if f.nbytes < 0:
                raise InvalidArgument(f"file {f.name!r} has negative nbytes")
            self._validate_chunks("file", f.name, f.nbytes, f.chunks)
        self.expected_sizes()

    def _validate_chunks(self, kind: str, name: str, nbytes: int, chunks: list[str]) -> None:
        want = math.ceil(nbytes / self.chunk_size)
        if len(chunks) != want:
            raise InvalidArgument(
                f"{kind} {name!r}: {nbytes} bytes at chunk_size {self.chunk_size} needs {want} chunk digests, "
                f"got {len(chunks)}"
            )
        for d in chunks:
            check_digest(d)


def _validate_tensor(t: TensorEntry) -> None:
    if t.dtype not in DTYPE_SIZES:
        raise InvalidArgument(f"tensor {t.name!r}: unknown dtype {t.dtype!r}; known: {sorted(DTYPE_SIZES)}")
    if len(t.shape) > MAX_DIMS or any(d < 0 for d in t.shape):
        raise InvalidArgument(f"tensor {t.name!r}: invalid shape {t.shape}")
    expected = math.prod(t.shape) * DTYPE_SIZES[t.dtype]
    if expected != t.nbytes:
        raise InvalidArgument(
            f"tensor {t.name!r}: dtype {t.dtype} with shape {t.shape} is {expected} bytes, "
            f"but nbytes says {t.nbytes}"
        )
    if t.shard is not None:
        s = t.shard
        validate_entry_name(s.logical_name)
        if len(s.global_shape) != len(t.shape) or len(s.offsets) != len(t.shape):
            raise InvalidArgument(
                f"tensor {t.name!r}: shard global_shape {s.global_shape} / offsets {s.offsets} must have "
                f"{len(t.shape)} dimensions like its shape {t.shape}"
            )
        for dim, (off, size, total) in enumerate(zip(s.offsets, t.shape, s.global_shape, strict=True)):
            if off < 0 or off + size > total:
                raise InvalidArgument(
                    f"tensor {t.name!r}: shard dimension {dim} covers [{off}, {off + size}) outside "
                    f"the global size {total}"
                )
