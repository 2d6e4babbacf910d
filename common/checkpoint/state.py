"""The state every part of the checkpoint store shares: backend, chunks, quota, clock, locks, pool.

Why one explicit object: the store's parts (catalog, uploads, same-host staging, reads, leases,
retention) each take this instead of reaching into one another, so what they share, and under
which lock, is written down in one place.

Locks, always taken in this order:

* ``gc_lock`` (readers-writer): chunk uploads, adoptions and commits share it; garbage collection
  takes it alone, so it never deletes a chunk an upload is about to reference.
* ``meta`` (re-entrant): every metadata read-modify-write (sessions, manifests, tags, leases).
* ``Quota`` holds its own lock only around a same-host adoption's check-and-publish.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tokenmill.common.checkpoint.chunks import ChunkStore
from tokenmill.common.checkpoint.rwlock import RWLock
from tokenmill.common.errors import ResourceExhausted
from tokenmill.common.storage import BlobStore, LocalFiles


class Quota:
    """The store's byte quota (0 = none): the one check every path that adds bytes makes."""

    def __init__(self, chunks: ChunkStore, limit_bytes: int):
        self.chunks = chunks
        self.limit = int(limit_bytes)
        self._lock = threading.Lock()

    def check(self, new_bytes: int, *, reserved: int = 0) -> None:
        """RESOURCE_EXHAUSTED when storing `new_bytes` (on top of bytes other uploads have
        `reserved`) would pass the quota."""
        if not self.limit:
            return
        stored = self.chunks.stored_bytes
        if stored + reserved + new_bytes > self.limit:
            raise ResourceExhausted(
                f"checkpoint store quota exceeded: {stored} bytes stored + {new_bytes + reserved} new would "
                f"pass the quota of {self.limit}; delete old versions ('tokenmill ckpt retention') and run "
                "'tokenmill ckpt gc'"
            )

    def check_chunk(self, digest: str, size: int) -> None:
        """The check for one chunk: free when the store already has it (dedup)."""
        if self.limit and not self.chunks.has(digest):
            self.check(size)

    @contextlib.contextmanager
    def admitting(self, digest: str, size: int) -> Iterator[None]:
        """Check one chunk and hold the check until the caller has published it.

        Why: one AdoptStagedChunks call publishes its chunks in parallel; checking them one at a
        time under a lock keeps them from passing the quota together."""
        if not self.limit:
            yield
            return
        with self._lock:
            self.check_chunk(digest, size)
            yield


@dataclass
class StoreState:
    """Shared by the store's parts; built once by `CheckpointStore`."""

    backend: BlobStore
    chunks: ChunkStore
    quota: Quota
    upload_ttl: float
    clock: Callable[[], float]
    pool: ThreadPoolExecutor  # chunk reads, verification and adoption run here
    meta: threading.RLock = field(default_factory=threading.RLock)
    gc_lock: RWLock = field(default_factory=RWLock)
    # downloads in progress per (name, version): a version being read is not deleted unforced
    readers: Counter[tuple[str, int]] = field(default_factory=Counter)

    @property
    def files(self) -> LocalFiles | None:
        """The backend's plain-files capability (same-host reads and staging), if it has one."""
        return self.backend.local_files()
