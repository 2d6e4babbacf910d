"""Content-addressed chunk storage: bytes keyed by their digest, verified on every write and read.

Why content addressing: a checkpoint that shares tensors with an earlier one (an unchanged
embedding, a LoRA fine-tune, a re-upload) maps to chunks that already exist, so only new bytes are
stored or sent. The digest doubles as the integrity check: a chunk whose bytes no longer hash to
its name is corrupt, and reads say so (DATA_LOSS) instead of returning it.

Digests name their hash (common/checkpoint/format.py): ``blake3:<hex>`` is stored as
``chunks/ab/blake3-<hex>``, a bare sha256 ``<hex>`` (the original format) as ``chunks/ab/<hex>``.
"""

from __future__ import annotations

import threading

from tokenmill.common.checkpoint.format import CHUNK_PREFIX, chunk_key, digest_from_key, matches
from tokenmill.common.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from tokenmill.common.storage import BlobStore

PREFIX = CHUNK_PREFIX


class ChunkStore:
    """Chunks in a blob backend, with an in-memory index of digest -> size (built by one listing)."""

    def __init__(self, backend: BlobStore):
        self.backend = backend
        self._lock = threading.Lock()
        self._index: dict[str, int] = {}
        self._total = 0  # sum of the index, kept current (the quota check reads it per chunk)
        self.reload()

    def reload(self) -> None:
        index: dict[str, int] = {}
        for key, size in self.backend.list_sizes(PREFIX):
            digest = digest_from_key(key)
            if digest is not None:
                index[digest] = size
        with self._lock:
            self._index = index
            self._total = sum(index.values())

    @property
    def stored_bytes(self) -> int:
        return self._total

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def digests(self) -> dict[str, int]:
        with self._lock:
            return dict(self._index)

    def size(self, digest: str) -> int | None:
        """Size of a stored chunk, or None when absent (checks the backend on an index miss)."""
        with self._lock:
            size = self._index.get(digest)
        if size is not None:
            return size
        try:
            size = self.backend.size(chunk_key(digest))
        except NotFound:
            return None
        with self._lock:
            if digest not in self._index:
                self._index[digest] = size
                self._total += size
        return size

    def has(self, digest: str) -> bool:
        return self.size(digest) is not None

    def put(self, digest: str, data: bytes | bytearray | memoryview) -> bool:
        """Store a chunk after checking its digest; False when it was already present (dedup)."""
        ok, actual = matches(digest, data)
        if not ok:
            raise InvalidArgument(
                f"chunk data does not match its digest: claimed {digest[:23]}..., the "
                f"{len(data)} bytes sent hash to {actual[:23]}...; resend the chunk"
            )
        if self.has(digest):
            return False
        self.backend.put(chunk_key(digest), data)
        with self._lock:
            if digest not in self._index:
                self._index[digest] = len(data)
                self._total += len(data)
        return True

    def adopt(self, digest: str, size: int, src_name: str, *, src_dir_fd: int) -> bool:
        """Publish a file already verified to hold this chunk (same-host uploads) by renaming it
        into place; False (nothing renamed) when the store already had the chunk."""
        files = self.backend.local_files()
        if files is None:
            raise FailedPrecondition(f"{self.backend.url} is not a local directory: chunks cannot be adopted")
        if self.has(digest):
            return False
        files.adopt(chunk_key(digest), src_name, src_dir_fd=src_dir_fd)
        with self._lock:
            if digest not in self._index:
                self._index[digest] = size
                self._total += size
        return True

    def get(self, digest: str, *, what: str, expected_size: int | None = None) -> bytes:
        """The verified bytes of a chunk; DATA_LOSS naming `what` when missing or corrupt."""
        try:
            data = self.backend.get(chunk_key(digest))
        except NotFound:
            raise DataLoss(f"{what}: chunk {digest[:16]}... is missing from the store") from None
        if expected_size is not None and len(data) != expected_size:
            raise DataLoss(
                f"{what}: chunk {digest[:16]}... has {len(data)} bytes, expected {expected_size} (corrupt)"
            )
        ok, actual = matches(digest, data)
        if not ok:
            raise DataLoss(f"{what}: chunk {digest[:23]}... is corrupt (its bytes hash to {actual[:23]}...)")
        return data

    def check(self, digest: str, expected_size: int | None) -> str:
        """'' when the chunk is intact, else a short description of the problem."""
        try:
            data = self.backend.get(chunk_key(digest))
        except NotFound:
            return "missing"
        if expected_size is not None and len(data) != expected_size:
            return f"size {len(data)} != expected {expected_size}"
        if not matches(digest, data)[0]:
            return "digest mismatch"
        return ""

    def delete(self, digest: str) -> int:
        """Remove a chunk; returns the bytes freed (0 when already absent)."""
        with self._lock:
            size = self._index.pop(digest, None)
            if size is not None:
                self._total -= size
        if size is None:
            try:
                size = self.backend.size(chunk_key(digest))
            except NotFound:
                return 0
        return size if self.backend.delete(chunk_key(digest)) else 0
