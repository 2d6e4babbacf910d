"""The checkpoint store engine: upload sessions, atomic commit, tags, leases, retention, GC, verify.

`CheckpointStore` is a small facade; each concern lives in its own module and they share one
`StoreState` (state.py):

    records.py    what is stored where (the backend layout) and its JSON form
    catalog.py    committed versions and tags: list, resolve, publish, remove
    uploads.py    upload sessions: begin, extend, chunks, commit, abort
    staging.py    the staging directory same-host clients write upload chunks into
    same_host.py  same-host clients: read proof (local_access) and adopting staged chunks
    reads.py      verified chunk streams and whole-store verification
    leases.py     read leases and "is this version in use"
    retention.py  delete, retention policies, garbage collection
    recovery.py   finishing what a crash interrupted, on open
    damage.py     damaged records: a bad manifest quarantines its version (DATA_LOSS naming the
                  file; listings skip it, verify reports it, delete removes it), never the store

A version exists exactly when its manifest object exists, and the manifest is published (with
create-if-absent, so two concurrent commits get distinct versions) only after every chunk it names
is durable. A crash at any point therefore leaves the old state or the new one. Commit tags are
recorded in the manifest and re-applied on open if the crash fell between manifest and tag writes.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tokenmill.common.checkpoint.catalog import Catalog
from tokenmill.common.checkpoint.chunks import ChunkStore
from tokenmill.common.checkpoint.leases import Leases
from tokenmill.common.checkpoint.manifest import FileEntry, Manifest, TensorEntry
from tokenmill.common.checkpoint.reads import Reads
from tokenmill.common.checkpoint.records import (
    Lease,
    ReadChunk,
    StoreStats,
    UploadStatus,
    VerifyReport,
    Version,
)
from tokenmill.common.checkpoint.recovery import recover
from tokenmill.common.checkpoint.retention import Retention
from tokenmill.common.checkpoint.same_host import SameHost
from tokenmill.common.checkpoint.staging import StagingArea
from tokenmill.common.checkpoint.state import Quota, StoreState
from tokenmill.common.checkpoint.uploads import Uploads
from tokenmill.common.storage import BlobStore, open_store


class CheckpointStore:
    """The engine behind CheckpointService; thread-safe, importable without gRPC."""

    def __init__(
        self,
        backend: BlobStore,
        *,
        quota_bytes: int = 0,
        upload_ttl_seconds: float = 24 * 3600,
        read_threads: int = 8,
        clock: Callable[[], float] = time.time,
    ):
        self.backend = backend
        self.chunks = ChunkStore(backend)
        self._state = StoreState(
            backend=backend,
            chunks=self.chunks,
            quota=Quota(self.chunks, quota_bytes),
            upload_ttl=float(upload_ttl_seconds),
            clock=clock,
            pool=ThreadPoolExecutor(max_workers=read_threads, thread_name_prefix="ckpt-read"),
        )
        self._catalog = Catalog(self._state)
        self._staging = StagingArea(self._state)
        self._uploads = Uploads(self._state, self._catalog, self._staging)
        self._same_host = SameHost(self._state, self._uploads, self._staging)
        self._reads = Reads(self._state, self._catalog)
        self._leases = Leases(self._state, self._catalog)
        self._retention = Retention(self._state, self._catalog, self._leases, self._uploads, self._staging)
        self.recover()

    @classmethod
    def open(cls, url: str, **kwargs: Any) -> CheckpointStore:
        return cls(open_store(url), **kwargs)

    def close(self) -> None:
        self._state.pool.shutdown(wait=False, cancel_futures=True)
        self._same_host.close()
        self.backend.close()

    # -- settings callers (and tests) may change on a live store ---------------------------------
    @property
    def quota_bytes(self) -> int:
        return self._state.quota.limit

    @quota_bytes.setter
    def quota_bytes(self, value: int) -> None:
        self._state.quota.limit = int(value)

    @property
    def clock(self) -> Callable[[], float]:
        return self._state.clock

    @clock.setter
    def clock(self, value: Callable[[], float]) -> None:
        self._state.clock = value

    @property
    def upload_ttl(self) -> float:
        return self._state.upload_ttl

    # -- recovery and same-host access -----------------------------------------------------------
    def recover(self) -> None:
        """Finish what a crash interrupted: apply pending commit tags, settle committed sessions."""
        recover(self._state, self._catalog, self._uploads, self._staging)

    def local_access(self) -> tuple[str, str]:
        """(root directory, nonce) for clients on the same filesystem; ("", "") for object stores."""
        return self._same_host.local_access()

    # -- names, versions, tags -------------------------------------------------------------------
    def model_names(self) -> builtins.list[str]:
        return self._catalog.model_names()

    def resolve(self, ref: str) -> tuple[str, int]:
        """`name`, `name:N`, `name:tag` or `name:latest` -> (name, version); NotFound with a hint."""
        return self._catalog.resolve(ref)

    def get(self, ref: str) -> Version:
        return self._catalog.get(ref)

    def list(self, name: str = "") -> builtins.list[Version]:
        return self._catalog.versions(name)

    def set_tag(self, ref: str, tag: str) -> Version:
        return self._catalog.set_tag(ref, tag)

    def record_metrics(self, ref: str, namespace: str, values: dict[str, float]) -> Version:
        """Attach metrics to a committed version (merged under `namespace`; see recorded.py)."""
        return self._catalog.record_metrics(ref, namespace, values)

    def delete_tag(self, name: str, tag: str) -> bool:
        return self._catalog.delete_tag(name, tag)

    # -- uploads ---------------------------------------------------------------------------------
    def begin_upload(
        self,
        name: str,
        manifest: Manifest,
        *,
        tags: builtins.list[str] | tuple[str, ...] = (),
        idempotency_key: str = "",
    ) -> UploadStatus:
        return self._uploads.begin(name, manifest, tags, idempotency_key)

    def extend_upload(
        self, upload_id: str, tensors: builtins.list[TensorEntry], files: builtins.list[FileEntry]
    ) -> UploadStatus:
        return self._uploads.extend(upload_id, tensors, files)

    def upload_status(self, upload_id: str) -> UploadStatus:
        return self._uploads.status(upload_id)

    def put_chunk(self, upload_id: str, digest: str, data: bytes | bytearray | memoryview) -> bool:
        """Store one chunk of an open upload; False when the store already had it."""
        return self._uploads.put_chunk(upload_id, digest, data)

    def adopt_staged(self, upload_id: str, digests: builtins.list[str]) -> tuple[int, int, int]:
        """Adopt chunks a same-host client staged; (chunks adopted, bytes adopted, already had)."""
        return self._same_host.adopt_staged(upload_id, digests)

    def commit(self, upload_id: str) -> Version:
        """Publish the version atomically once every chunk is durable; FAILED_PRECONDITION otherwise."""
        return self._uploads.commit(upload_id)

    def abort(self, upload_id: str) -> bool:
        return self._uploads.abort(upload_id)

    # -- reading ---------------------------------------------------------------------------------
    def read(
        self,
        ref: str,
        tensors: builtins.list[str] | None = None,
        files: builtins.list[str] | None = None,
        *,
        stream_index: int = 0,
        stream_count: int = 1,
        prefetch: int = 4,
    ) -> Iterator[ReadChunk]:
        """Verified chunks of the selected entries (everything when both lists are empty); see
        `Reads.read` for streams and the implicit read lease."""
        return self._reads.read(
            ref,
            tensors or [],
            files or [],
            stream_index=stream_index,
            stream_count=stream_count,
            prefetch=prefetch,
        )

    def verify(self, ref: str = "") -> VerifyReport:
        """Check the manifests (read from disk) and hash every chunk of one version (or the whole
        store); problems name the damaged manifest's file, or the version, entry and chunk."""
        return self._reads.verify(ref)

    # -- leases, delete, retention, GC -----------------------------------------------------------
    def acquire_lease(self, ref: str, holder: str, ttl_seconds: float) -> Lease:
        return self._leases.acquire(ref, holder, ttl_seconds)

    def release_lease(self, lease_id: str) -> bool:
        return self._leases.release(lease_id)

    def leases(self, name: str, version: int) -> builtins.list[Lease]:
        return self._leases.held(name, version)

    def delete(self, ref: str, *, force: bool = False) -> bool:
        return self._retention.delete(ref, force=force)

    def apply_retention(
        self, name: str, keep_last: int, keep_tagged: bool = True, dry_run: bool = False
    ) -> builtins.list[str]:
        """Delete all but the newest `keep_last` versions (and tagged/in-use ones); returns deleted refs."""
        return self._retention.apply_retention(name, keep_last, keep_tagged=keep_tagged, dry_run=dry_run)

    def collect_garbage(self, dry_run: bool = False) -> tuple[int, int]:
        """Delete chunks no version or live upload references; returns (chunks, bytes) freed."""
        return self._retention.collect_garbage(dry_run=dry_run)

    def stats(self) -> StoreStats:
        versions = self.list()
        return StoreStats(
            models=len({v.name for v in versions}),
            versions=len(versions),
            chunks=len(self.chunks),
            stored_bytes=self.chunks.stored_bytes,
            logical_bytes=sum(v.manifest.logical_bytes for v in versions),
            backend=self.backend.url,
            quota_bytes=self.quota_bytes,
        )
