"""The checkpoint store engine: upload sessions, atomic commit, tags, leases, retention, GC, verify.

Layout in the blob backend (the backend is the system of record; nothing lives only in Redis):

    chunks/ab/blake3-<hex>                content-addressed bytes (see chunks.py; bare <hex>: sha256)
    manifests/<name>/<version:010d>.json  one committed version: the commit record, written last
    tags/<name>.json                      {"tags": {tag: version}, "applied_through": version}
    uploads/<upload_id>.json              an upload session (resumable across server restarts)
    staging/<upload_id>/<chunk file>      chunks a same-host client wrote for an upload (adopt_staged);
                                          never read as chunks until re-hashed and renamed into chunks/
    idem/<name>/<hash of key>.json        idempotency key -> upload id / committed ref
    leases/<name>/<version>/<id>.json     read leases held by running jobs
    access/<nonce>                        same-host read proof (local_access), removed on close

A version exists exactly when its manifest object exists, and the manifest is published (with
create-if-absent, so two concurrent commits get distinct versions) only after every chunk it names
is durable. A crash at any point therefore leaves the old state or the new one. Commit tags are
recorded in the manifest and re-applied on open if the crash fell between manifest and tag writes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import stat
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.common.checkpoint.chunks import ChunkStore
from tokenmill.common.checkpoint.digest import STAGING_PREFIX, chunk_file_name, matches, staging_key
from tokenmill.common.checkpoint.manifest import FileEntry, Manifest, TensorEntry, check_digest, chunk_lengths
from tokenmill.common.checkpoint.names import Ref, parse_ref, validate_name, validate_tag
from tokenmill.common.checkpoint.rwlock import RWLock
from tokenmill.common.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from tokenmill.common.storage import BlobStore, LocalBlobStore, open_store, remove_path

FAULT_ENV = "TOKENMILL_CHECKPOINT_FAULT"  # test hook: "<point>:<marker file>"; see _fault
MAX_ADOPT = 1024  # digests per AdoptStagedChunks call


@dataclass
class Version:
    """A committed version as stored in its manifest object."""

    name: str
    version: int
    created_at: float
    manifest: Manifest
    new_bytes: int = 0
    commit_tags: list[str] = field(default_factory=list)
    upload_id: str = ""
    tags: list[str] = field(default_factory=list)  # filled from the tags document when read

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": 1,
            "name": self.name,
            "version": self.version,
            "created_at": self.created_at,
            "new_bytes": self.new_bytes,
            "commit_tags": self.commit_tags,
            "upload_id": self.upload_id,
            "manifest": self.manifest.to_json(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Version:
        return cls(
            name=d["name"],
            version=int(d["version"]),
            created_at=float(d["created_at"]),
            manifest=Manifest.from_json(d["manifest"]),
            new_bytes=int(d.get("new_bytes", 0)),
            commit_tags=list(d.get("commit_tags", [])),
            upload_id=d.get("upload_id", ""),
        )


@dataclass
class UploadState:
    upload_id: str
    name: str
    manifest: Manifest
    tags: list[str]
    idempotency_key: str
    created_at: float
    expires_at: float
    planned_new: list[str] = field(default_factory=list)  # digests absent when planned (new bytes)
    committed_ref: str = ""
    _sizes: dict[str, int] | None = field(default=None, repr=False)

    def sizes(self) -> dict[str, int]:
        """digest -> expected length, cached (a chunk upload looks it up once per message)."""
        if self._sizes is None:
            self._sizes = self.manifest.expected_sizes()
        return self._sizes

    def to_json(self) -> dict[str, Any]:
        return {
            "upload_id": self.upload_id,
            "name": self.name,
            "manifest": self.manifest.to_json(),
            "tags": self.tags,
            "idempotency_key": self.idempotency_key,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "planned_new": self.planned_new,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> UploadState:
        return cls(
            upload_id=d["upload_id"],
            name=d["name"],
            manifest=Manifest.from_json(d["manifest"]),
            tags=list(d.get("tags", [])),
            idempotency_key=d.get("idempotency_key", ""),
            created_at=float(d["created_at"]),
            expires_at=float(d["expires_at"]),
            planned_new=list(d.get("planned_new", [])),
        )


@dataclass
class UploadStatus:
    upload_id: str
    name: str
    missing_chunks: list[str]
    missing_bytes: int
    total_chunks: int
    expires_at: float
    committed_ref: str = ""


@dataclass
class ReadChunk:
    entry: str
    is_file: bool
    index: int
    offset: int
    data: bytes


@dataclass
class Lease:
    lease_id: str
    ref: str
    holder: str
    expires_at: float


@dataclass
class VerifyReport:
    ok: bool
    chunks_checked: int
    problems: list[str]


@dataclass
class StoreStats:
    models: int
    versions: int
    chunks: int
    stored_bytes: int
    logical_bytes: int
    backend: str
    quota_bytes: int


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _manifest_key(name: str, version: int) -> str:
    return f"manifests/{name}/{version:010d}.json"


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
        self.quota_bytes = int(quota_bytes)
        self.upload_ttl = float(upload_ttl_seconds)
        self.clock = clock
        self.chunks = ChunkStore(backend)
        self._meta = threading.RLock()  # metadata writes (sessions, manifests, tags, leases)
        self._gc_lock = RWLock()  # chunk uploads share it; garbage collection takes it alone
        self._sessions: dict[str, UploadState] = {}
        self._versions: dict[tuple[str, int], Version] = {}  # immutable once committed: cache
        self._readers: Counter[tuple[str, int]] = Counter()
        self._recent_commits: dict[str, str] = {}  # upload id -> ref, so a retried commit succeeds
        self._pool = ThreadPoolExecutor(max_workers=read_threads, thread_name_prefix="ckpt-read")
        self._access_nonce = ""  # see local_access
        self._tls = threading.local()  # per-thread read buffers of adopt_staged
        self._quota_lock = threading.Lock()  # adopt_staged: quota check + publish, one chunk at a time
        self._install_fault_hook()
        self.recover()

    @classmethod
    def open(cls, url: str, **kwargs: Any) -> CheckpointStore:
        return cls(open_store(url), **kwargs)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._access_nonce:
            with contextlib.suppress(Exception):
                self.backend.delete(f"access/{self._access_nonce}")
        self.backend.close()

    # -- same-host reads -----------------------------------------------------------------------------
    def local_access(self) -> tuple[str, str]:
        """(root directory, nonce) for clients on the same filesystem; ("", "") for object stores.

        Why: on one machine, pulling chunk files through gRPC costs ~4x the CPU of reading them, so
        a client that can see the store's directory reads chunk files itself (verifying every
        digest, under a read lease). The nonce file `access/<nonce>` lets it prove it sees *this*
        store's files and not a same-named directory on another host."""
        if not isinstance(self.backend, LocalBlobStore):
            return "", ""
        with self._meta:
            if not self._access_nonce:
                nonce = uuid.uuid4().hex
                self.backend.put(f"access/{nonce}", nonce.encode())
                # where same-host clients stage upload chunks (adopt_staged); they add one
                # directory per upload under it
                self.backend.path(STAGING_PREFIX.rstrip("/")).mkdir(exist_ok=True)
                self._access_nonce = nonce
            return str(self.backend.root), self._access_nonce

    # -- recovery ------------------------------------------------------------------------------------
    def recover(self) -> None:
        """Finish what a crash interrupted: apply pending commit tags, settle committed sessions."""
        if isinstance(self.backend, LocalBlobStore):
            self.backend.remove_stale_temps()
        committed_uploads: dict[str, str] = {}
        for name in self.model_names():
            doc = self._tags_doc(name)
            changed = False
            for version in self._version_numbers(name):
                rec = self._load_version(name, version)
                if rec.upload_id:
                    committed_uploads[rec.upload_id] = rec.ref
                if version > doc["applied_through"]:
                    for tag in rec.commit_tags:
                        doc["tags"][tag] = version
                    doc["applied_through"] = version
                    changed = True
            if changed:
                self.backend.put(f"tags/{name}.json", _dumps(doc))
        for key in list(self.backend.list("uploads/")):
            upload_id = key[len("uploads/") : -len(".json")]
            if upload_id in committed_uploads:
                state = self._load_session(upload_id)
                if state is not None:
                    self._finish_session(state, committed_uploads[upload_id])
        self._sweep_staging(dry_run=False)

    # -- fault injection (tests) ---------------------------------------------------------------------
    def _install_fault_hook(self) -> None:
        spec = os.environ.get(FAULT_ENV, "")
        self._fault_point, _, self._fault_marker = spec.partition(":")
        if self._fault_point == "manifest_temp" and isinstance(self.backend, LocalBlobStore):

            def hook(key: str) -> None:
                if key.startswith("manifests/"):
                    self._fault("manifest_temp")

            self.backend.before_publish = hook

    def _fault(self, point: str) -> None:
        """When the fault env names this point: write the marker file and stop here until killed."""
        if self._fault_point != point:
            return
        if self._fault_marker:
            Path(self._fault_marker).write_text(point)
        while True:  # the test kills the process with SIGKILL while it waits here
            time.sleep(0.05)

    # -- names, versions, tags -----------------------------------------------------------------------
    def model_names(self) -> list[str]:
        names = {key.split("/")[1] for key in self.backend.list("manifests/") if key.count("/") == 2}
        return sorted(names)

    def _version_numbers(self, name: str) -> list[int]:
        out = []
        for key in self.backend.list(f"manifests/{name}/"):
            stem = key.rsplit("/", 1)[-1].removesuffix(".json")
            if stem.isdigit():
                out.append(int(stem))
        return sorted(out)

    def _load_version(self, name: str, version: int) -> Version:
        cached = self._versions.get((name, version))
        if cached is not None:
            return cached
        try:
            raw = self.backend.get(_manifest_key(name, version))
        except NotFound:
            raise NotFound(
                f"checkpoint '{name}:{version}' not found; list versions with 'tokenmill ckpt list {name}'"
            ) from None
        try:
            rec = Version.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            raise DataLoss(f"checkpoint '{name}:{version}': manifest is unreadable ({exc})") from None
        self._versions[(name, version)] = rec
        return rec

    def _tags_doc(self, name: str) -> dict[str, Any]:
        try:
            doc = json.loads(self.backend.get(f"tags/{name}.json"))
        except NotFound:
            return {"tags": {}, "applied_through": 0}
        return {
            "tags": {k: int(v) for k, v in doc.get("tags", {}).items()},
            "applied_through": int(doc.get("applied_through", 0)),
        }

    def _with_tags(
        self, rec: Version, doc: dict[str, Any] | None = None, newest: int | None = None
    ) -> Version:
        doc = doc if doc is not None else self._tags_doc(rec.name)
        tags = sorted(t for t, v in doc["tags"].items() if v == rec.version)
        if newest is None:
            versions = self._version_numbers(rec.name)
            newest = versions[-1] if versions else 0
        if newest == rec.version:
            tags.insert(0, "latest")
        out = Version(**{**rec.__dict__})
        out.tags = tags
        return out

    def resolve(self, ref: str) -> tuple[str, int]:
        """`name`, `name:N`, `name:tag` or `name:latest` -> (name, version); NotFound with a hint."""
        r: Ref = parse_ref(ref)
        versions = self._version_numbers(r.name)
        if not versions:
            raise NotFound(f"no checkpoint named {r.name!r}; list them with 'tokenmill ckpt list'")
        if r.selector in ("", "latest"):
            return r.name, versions[-1]
        if r.is_version:
            v = int(r.selector)
            if v not in versions:
                raise NotFound(f"checkpoint '{r.name}:{v}' not found; versions: {versions[-10:]}")
            return r.name, v
        doc = self._tags_doc(r.name)
        v = doc["tags"].get(r.selector)
        if v is None or v not in versions:
            raise NotFound(f"checkpoint {r.name!r} has no tag {r.selector!r}; tags: {sorted(doc['tags'])}")
        return r.name, v

    def get(self, ref: str) -> Version:
        name, version = self.resolve(ref)
        return self._with_tags(self._load_version(name, version))

    def list(self, name: str = "") -> list[Version]:
        names = [validate_name(name)] if name else self.model_names()
        out = []
        for n in names:
            doc = self._tags_doc(n)
            versions = self._version_numbers(n)
            for v in versions:
                with contextlib.suppress(NotFound):
                    out.append(self._with_tags(self._load_version(n, v), doc, versions[-1]))
        return out

    def set_tag(self, ref: str, tag: str) -> Version:
        validate_tag(tag)
        with self._meta:
            name, version = self.resolve(ref)
            doc = self._tags_doc(name)
            doc["tags"][tag] = version
            self.backend.put(f"tags/{name}.json", _dumps(doc))
            return self.get(f"{name}:{version}")

    def delete_tag(self, name: str, tag: str) -> bool:
        validate_name(name)
        validate_tag(tag)
        with self._meta:
            doc = self._tags_doc(name)
            if doc["tags"].pop(tag, None) is None:
                return False
            self.backend.put(f"tags/{name}.json", _dumps(doc))
            return True

    # -- uploads -------------------------------------------------------------------------------------
    def begin_upload(
        self,
        name: str,
        manifest: Manifest,
        *,
        tags: list[str] | tuple[str, ...] = (),
        idempotency_key: str = "",
    ) -> UploadStatus:
        validate_name(name)
        for tag in tags:
            validate_tag(tag)
        if len(idempotency_key) > 256:
            raise InvalidArgument("idempotency_key is longer than 256 characters")
        manifest.validate()
        with self._meta:
            idem_key = ""
            if idempotency_key:
                idem_key = f"idem/{name}/{hashlib.sha256(idempotency_key.encode()).hexdigest()[:40]}.json"
                with contextlib.suppress(NotFound):
                    rec = json.loads(self.backend.get(idem_key))
                    if rec.get("ref"):
                        return UploadStatus(rec["upload_id"], name, [], 0, 0, 0.0, committed_ref=rec["ref"])
                    existing = self._session_or_none(rec["upload_id"])
                    if existing is not None:
                        return self._status(existing)
            now = self.clock()
            state = UploadState(
                upload_id=uuid.uuid4().hex,
                name=name,
                manifest=manifest,
                tags=list(tags),
                idempotency_key=idempotency_key,
                created_at=now,
                expires_at=now + self.upload_ttl,
            )
            state.planned_new = self._plan(state, manifest.digests())
            self.backend.put(f"uploads/{state.upload_id}.json", _dumps(state.to_json()))
            self._sessions[state.upload_id] = state
            if idem_key:
                self.backend.put(idem_key, _dumps({"upload_id": state.upload_id, "ref": ""}))
            return self._status(state)

    def extend_upload(
        self, upload_id: str, tensors: list[TensorEntry], files: list[FileEntry]
    ) -> UploadStatus:
        with self._meta:
            state = self._session(upload_id)
            # a retried ExtendUpload (response lost) re-adds identical entries: accept those as no-ops
            have = {t.name: t for t in state.manifest.tensors} | {f.name: f for f in state.manifest.files}
            fresh_t = [t for t in tensors if not self._same_entry(upload_id, have, t)]
            fresh_f = [f for f in files if not self._same_entry(upload_id, have, f)]
            tensors, files = fresh_t, fresh_f
            candidate = Manifest.from_json(state.manifest.to_json())
            candidate.extend(tensors, files)  # validates the combined manifest
            new = {d for e in [*tensors, *files] for d in e.chunks}
            planned = self._plan(state, new, extra_reserved=state.planned_new, manifest=candidate)
            state.manifest = candidate
            state._sizes = None
            state.planned_new = sorted(set(state.planned_new) | set(planned))
            self.backend.put(f"uploads/{state.upload_id}.json", _dumps(state.to_json()))
            return self._status(state)

    @staticmethod
    def _same_entry(
        upload_id: str, have: dict[str, TensorEntry | FileEntry], entry: TensorEntry | FileEntry
    ) -> bool:
        existing = have.get(entry.name)
        if existing is None:
            return False
        if type(existing) is not type(entry) or existing.to_json() != entry.to_json():
            raise InvalidArgument(
                f"upload {upload_id}: entry {entry.name!r} was already added with different contents"
            )
        return True

    def _plan(
        self,
        state: UploadState,
        digests: set[str],
        extra_reserved: list[str] | None = None,
        manifest: Manifest | None = None,
    ) -> list[str]:
        """Digests the store lacks; RESOURCE_EXHAUSTED when storing them would pass the quota.

        `manifest`: the session's manifest as it will be (ExtendUpload plans the added entries
        before they become part of the session, so their sizes are only in the candidate)."""
        sizes = (manifest or state.manifest).expected_sizes()
        missing = sorted(d for d in digests if not self.chunks.has(d))
        if self.quota_bytes:
            reserved = sum(sizes.get(d, 0) for d in (extra_reserved or []) if not self.chunks.has(d))
            need = sum(sizes[d] for d in missing if d in sizes)
            stored = self.chunks.stored_bytes
            if stored + reserved + need > self.quota_bytes:
                raise ResourceExhausted(
                    f"checkpoint store quota exceeded: {stored} bytes stored + {need + reserved} new would pass "
                    f"the quota of {self.quota_bytes}; delete old versions ('tokenmill ckpt retention') and run "
                    "'tokenmill ckpt gc'"
                )
        return missing

    def _session_or_none(self, upload_id: str) -> UploadState | None:
        state = self._sessions.get(upload_id)
        if state is None:
            state = self._load_session(upload_id)
        if state is None or state.expires_at < self.clock():
            return None
        return state

    def _load_session(self, upload_id: str) -> UploadState | None:
        if not upload_id or not all(c in "0123456789abcdef" for c in upload_id) or len(upload_id) != 32:
            return None
        try:
            state = UploadState.from_json(json.loads(self.backend.get(f"uploads/{upload_id}.json")))
        except NotFound:
            return None
        self._sessions[upload_id] = state
        return state

    def _session(self, upload_id: str) -> UploadState:
        state = self._session_or_none(upload_id)
        if state is None:
            raise NotFound(
                f"upload {upload_id!r} not found (never begun, committed, aborted or expired); begin a new upload"
            )
        return state

    def _status(self, state: UploadState) -> UploadStatus:
        sizes = state.sizes()
        missing = sorted(d for d in sizes if not self.chunks.has(d))
        return UploadStatus(
            upload_id=state.upload_id,
            name=state.name,
            missing_chunks=missing,
            missing_bytes=sum(sizes[d] for d in missing),
            total_chunks=len(sizes),
            expires_at=state.expires_at,
            committed_ref=state.committed_ref,
        )

    def upload_status(self, upload_id: str) -> UploadStatus:
        with self._meta:
            return self._status(self._session(upload_id))

    def put_chunk(self, upload_id: str, digest: str, data: bytes | bytearray | memoryview) -> bool:
        """Store one chunk of an open upload; False when the store already had it."""
        check_digest(digest)
        with self._gc_lock.shared():
            with self._meta:
                state = self._session(upload_id)
                expected = state.sizes().get(digest)
            if expected is None:
                raise InvalidArgument(
                    f"chunk {digest[:16]}... is not part of upload {upload_id}; add the entry that "
                    "contains it first (ExtendUpload)"
                )
            if len(data) != expected:
                raise InvalidArgument(
                    f"chunk {digest[:16]}... is {len(data)} bytes but the manifest places {expected} bytes there"
                )
            if (
                self.quota_bytes
                and not self.chunks.has(digest)
                and self.chunks.stored_bytes + len(data) > self.quota_bytes
            ):
                raise ResourceExhausted(
                    f"checkpoint store quota of {self.quota_bytes} bytes reached; delete old versions and "
                    "run 'tokenmill ckpt gc'"
                )
            return self.chunks.put(digest, data)

    # -- same-host uploads ---------------------------------------------------------------------------
    def adopt_staged(self, upload_id: str, digests: list[str]) -> tuple[int, int, int]:
        """Adopt chunks a same-host client staged under staging/<upload_id>/; returns (chunks
        adopted, bytes adopted, chunks the store already had).

        Why: on one machine, pushing chunk bytes through gRPC costs several CPU-seconds per GB in
        copies; the client writes the chunk files itself instead. Nothing about the client is
        trusted: the server builds every path from the upload id it issued and digests it
        validated, refuses symlinks and non-regular files, re-hashes every staged file (a mismatch
        deletes it: INVALID_ARGUMENT naming the chunk), fsyncs it and only then renames it into the
        chunk store (fsync dir), under the same quota and GC rules as UploadChunks."""
        if not isinstance(self.backend, LocalBlobStore):
            raise FailedPrecondition(
                f"the store {self.backend.url} is not a local directory, so nothing can be staged in it; "
                "send the chunks with UploadChunks"
            )
        if not digests:
            raise InvalidArgument("AdoptStagedChunks needs at least one chunk digest")
        if len(digests) > MAX_ADOPT:
            raise InvalidArgument(
                f"AdoptStagedChunks takes at most {MAX_ADOPT} digests per call, got {len(digests)}"
            )
        for d in digests:
            check_digest(d)
        unique = list(dict.fromkeys(digests))
        with self._gc_lock.shared():
            with self._meta:
                sizes = self._session(upload_id).sizes()
            unknown = [d for d in unique if d not in sizes]
            if unknown:
                raise InvalidArgument(
                    f"chunk {unknown[0][:23]}... is not part of upload {upload_id}; add the entry that "
                    "contains it first (ExtendUpload)"
                )
            staging = self.backend.path(staging_key(upload_id))
            try:
                dir_fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except FileNotFoundError:
                raise FailedPrecondition(
                    f"upload {upload_id} has no staging directory {staging}: write the chunks there first "
                    "(or send them with UploadChunks)"
                ) from None
            except OSError as exc:  # a symlink (ELOOP) or a file (ENOTDIR) where the directory belongs
                self.backend.remove_tree(staging_key(upload_id))
                raise InvalidArgument(
                    f"upload {upload_id}: {staging} is not a plain directory ({exc.strerror}); it was "
                    "removed, stage the chunks again"
                ) from None
            try:
                futures = [self._pool.submit(self._adopt_one, upload_id, dir_fd, d, sizes[d]) for d in unique]
                # every one finishes before dir_fd closes (its number could be reused meanwhile)
                wait(futures)
            finally:
                os.close(dir_fd)
        results = [f.result() for f in futures]  # raises the first failure, in digest order
        adopted = [n for n in results if n is not None]
        return len(adopted), sum(adopted), len(results) - len(adopted)

    def _adopt_one(self, upload_id: str, dir_fd: int, digest: str, expected: int) -> int | None:
        """Verify and publish one staged chunk; its size, or None when the store already had it."""
        name = chunk_file_name(digest)
        what = f"staged chunk {digest[:23]}... of upload {upload_id}"

        def discard() -> None:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dir_fd)

        if self.chunks.has(digest):
            discard()
            return None
        try:
            # O_NONBLOCK: a FIFO in the chunk's place must not hang this thread (no effect on files)
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
        except FileNotFoundError:
            if self.chunks.has(digest):  # a concurrent adoption of the same chunk took the file
                return None
            raise FailedPrecondition(
                f"{what} was not found (expected staging/{upload_id}/{name}); write it there first "
                "(or send it with UploadChunks)"
            ) from None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            discard()
            raise InvalidArgument(
                f"{what} is a symlink, not a file; it was removed, stage it again"
            ) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                discard()
                raise InvalidArgument(f"{what} is not a regular file; it was removed, stage it again")
            if st.st_size != expected:
                discard()
                raise InvalidArgument(
                    f"{what} is {st.st_size} bytes but the manifest places {expected} bytes there; "
                    "the staged file was deleted, stage the chunk again"
                )
            # read, not mmap: a writer truncating the file meanwhile would SIGBUS an mmap reader
            view = self._staging_buffer(expected)
            got = 0
            while got < expected:
                n = os.readv(fd, [view[got:]])
                if not n:
                    break
                got += n
            ok, actual = matches(digest, view[:got])
            if ok and os.fstat(fd).st_size != expected:  # still being written to: not what was hashed
                discard()
                raise InvalidArgument(f"{what} changed while it was verified; it was deleted, stage it again")
            if not ok:
                discard()
                raise InvalidArgument(
                    f"{what} does not match its digest: the {expected} bytes staged hash to "
                    f"{actual[:23]}...; the staged file was deleted, stage or send the chunk again"
                )
            if self.backend.fsync:
                os.fsync(fd)  # the client's fsync is not trusted either (cheap when it did sync)
        finally:
            os.close(fd)
        # chunks of one call are adopted in parallel: check the quota and publish as one step
        with self._quota_lock if self.quota_bytes else contextlib.nullcontext():
            if (
                self.quota_bytes
                and not self.chunks.has(digest)
                and self.chunks.stored_bytes + expected > self.quota_bytes
            ):
                discard()
                raise ResourceExhausted(
                    f"checkpoint store quota of {self.quota_bytes} bytes reached; delete old versions and "
                    "run 'tokenmill ckpt gc'"
                )
            try:
                adopted = self.chunks.adopt(digest, expected, name, src_dir_fd=dir_fd)
            except OSError as exc:  # e.g. staged by another user in a directory this one cannot modify
                raise FailedPrecondition(
                    f"{what} cannot be moved into the chunk store ({exc.strerror}); send it with UploadChunks"
                ) from None
            if not adopted:
                discard()
                return None
        return expected

    def _staging_buffer(self, size: int) -> memoryview:
        """A per-thread reusable read buffer (chunks are all about the same size)."""
        buf: bytearray | None = getattr(self._tls, "buf", None)
        if buf is None or len(buf) < size:
            buf = bytearray(size)
            self._tls.buf = buf
        return memoryview(buf)[:size]

    def _remove_staging(self, upload_id: str) -> None:
        if isinstance(self.backend, LocalBlobStore) and len(upload_id) == 32:
            with contextlib.suppress(InvalidArgument, OSError):
                self.backend.remove_tree(staging_key(upload_id))

    def _sweep_staging(self, dry_run: bool) -> int:
        """Remove staging directories whose upload is gone (committed, aborted, expired or never
        begun: a killed client's leftovers); returns how many there were."""
        if not isinstance(self.backend, LocalBlobStore):
            return 0
        base = self.backend.path(STAGING_PREFIX.rstrip("/"))
        try:
            names = sorted(os.listdir(base))
        except (FileNotFoundError, NotADirectoryError):
            return 0
        doomed = []
        for upload_id in names:
            try:
                staging_key(upload_id)
            except InvalidArgument:
                doomed.append(upload_id)  # nothing a client may create
                continue
            if self._session_or_none(upload_id) is None:
                doomed.append(upload_id)
        if not dry_run:
            for upload_id in doomed:
                remove_path(base / upload_id)
        return len(doomed)

    def commit(self, upload_id: str) -> Version:
        """Publish the version atomically once every chunk is durable; FAILED_PRECONDITION otherwise."""
        with self._gc_lock.shared(), self._meta:
            state = self._session_or_none(upload_id)
            if state is None:
                done = self._committed_ref_for(upload_id)
                if done:
                    return self.get(done)  # a retried commit after success
                raise NotFound(f"upload {upload_id!r} not found (aborted or expired); begin a new upload")
            m = state.manifest
            if not m.tensors and not m.files:
                raise FailedPrecondition(
                    f"upload {upload_id} for {state.name!r} has no tensors or files to commit"
                )
            self._check_complete(state)
            self._fault("before_manifest")
            versions = self._version_numbers(state.name)
            # never reuse a number, even of a deleted version: a ref names one content forever
            high_water = self._tags_doc(state.name)["applied_through"]
            version = max(versions[-1] if versions else 0, high_water) + 1
            sizes = m.expected_sizes()
            rec = Version(
                name=state.name,
                version=version,
                created_at=self.clock(),
                manifest=m,
                new_bytes=sum(sizes[d] for d in state.planned_new if d in sizes),
                commit_tags=list(state.tags),
                upload_id=upload_id,
            )
            while not self.backend.put_if_absent(
                _manifest_key(state.name, rec.version), _dumps(rec.to_json())
            ):
                rec.version += 1  # another process committed this number first
            self._versions[(rec.name, rec.version)] = rec
            self._fault("after_manifest")
            doc = self._tags_doc(state.name)
            for tag in state.tags:
                doc["tags"][tag] = rec.version
            doc["applied_through"] = max(doc["applied_through"], rec.version)
            self.backend.put(f"tags/{state.name}.json", _dumps(doc))
            self._finish_session(state, rec.ref)
            return self._with_tags(rec, doc)

    def _check_complete(self, state: UploadState) -> None:
        m = state.manifest
        missing_total = 0
        first = ""
        for kind, entries in (("tensor", m.tensors), ("file", m.files)):
            for e in entries:
                for i, (d, n) in enumerate(zip(e.chunks, chunk_lengths(e.nbytes, m.chunk_size), strict=True)):
                    size = self.chunks.size(d)
                    if size is None:
                        missing_total += 1
                        first = first or f"{kind} {e.name!r} chunk {i} ({d[:16]}...) was never uploaded"
                    elif size != n:
                        raise DataLoss(
                            f"{kind} {e.name!r} chunk {i} ({d[:16]}...) is stored with {size} bytes, expected {n}"
                        )
        if missing_total:
            raise FailedPrecondition(
                f"cannot commit {state.name!r}: {first}; {missing_total} chunk(s) missing in total. "
                "Send them (GetUploadStatus lists them), then commit again"
            )

    def _committed_ref_for(self, upload_id: str) -> str:
        ref = self._recent_commits.get(upload_id, "")
        if ref or len(upload_id) != 32:
            return ref
        for name in self.model_names():  # after a restart: look for the manifest that names it
            for v in reversed(self._version_numbers(name)):
                if self._load_version(name, v).upload_id == upload_id:
                    return f"{name}:{v}"
        return ""

    def _finish_session(self, state: UploadState, ref: str) -> None:
        state.committed_ref = ref
        if state.idempotency_key:
            key = f"idem/{state.name}/{hashlib.sha256(state.idempotency_key.encode()).hexdigest()[:40]}.json"
            self.backend.put(key, _dumps({"upload_id": state.upload_id, "ref": ref}))
        self.backend.delete(f"uploads/{state.upload_id}.json")
        self._sessions.pop(state.upload_id, None)
        self._remove_staging(state.upload_id)  # chunks staged twice or deduplicated meanwhile
        self._recent_commits[state.upload_id] = ref
        while len(self._recent_commits) > 10_000:  # bounded: older retries fall back to a manifest scan
            self._recent_commits.pop(next(iter(self._recent_commits)))

    def abort(self, upload_id: str) -> bool:
        with self._meta:
            state = self._session_or_none(upload_id)
            if state is None:
                return False
            self.backend.delete(f"uploads/{upload_id}.json")
            self._sessions.pop(upload_id, None)
            self._remove_staging(upload_id)
            if state.idempotency_key:
                key = f"idem/{state.name}/{hashlib.sha256(state.idempotency_key.encode()).hexdigest()[:40]}.json"
                self.backend.delete(key)
            return True

    # -- reading -------------------------------------------------------------------------------------
    def read(
        self,
        ref: str,
        tensors: list[str] | None = None,
        files: list[str] | None = None,
        *,
        stream_index: int = 0,
        stream_count: int = 1,
        prefetch: int = 4,
    ) -> Iterator[ReadChunk]:
        """Verified chunks of the selected entries (everything when both lists are empty).

        With stream_count > 1 only every stream_count-th chunk (starting at stream_index) is
        returned, so a client can pull one checkpoint over several parallel streams. The version is
        resolved and its implicit read lease taken together, under the metadata lock, on the first
        `next()`, and the lease ends when the iterator is exhausted or closed.
        """
        if stream_count < 1 or not (0 <= stream_index < stream_count) or stream_count > 64:
            raise InvalidArgument(
                f"stream_index {stream_index} / stream_count {stream_count} out of range (count 1..64)"
            )
        return self._read_iter(ref, tensors or [], files or [], stream_index, stream_count, max(1, prefetch))

    def _read_plan(
        self, rec: Version, tensors: list[str], files: list[str]
    ) -> list[tuple[str, bool, int, int, str, int]]:
        m = rec.manifest
        if not tensors and not files:
            t_entries: list[TensorEntry | FileEntry] = list(m.tensors)
            f_entries: list[TensorEntry | FileEntry] = list(m.files)
        else:
            t_entries, f_entries = [], []
            for n in dict.fromkeys(tensors):
                e = m.tensor(n)
                if e is None:
                    raise NotFound(f"checkpoint {rec.ref!r} has no tensor {n!r}")
                t_entries.append(e)
            for n in dict.fromkeys(files):
                e2 = m.file(n)
                if e2 is None:
                    raise NotFound(
                        f"checkpoint {rec.ref!r} has no file {n!r}; files: {[f.name for f in m.files]}"
                    )
                f_entries.append(e2)
        plan = []
        for is_file, entries in ((False, t_entries), (True, f_entries)):
            for e in entries:
                offset = 0
                for i, (d, n) in enumerate(zip(e.chunks, chunk_lengths(e.nbytes, m.chunk_size), strict=True)):
                    plan.append((e.name, is_file, i, offset, d, n))
                    offset += n
        return plan

    def _read_iter(
        self,
        ref: str,
        tensors: list[str],
        files: list[str],
        stream_index: int,
        stream_count: int,
        prefetch: int,
    ) -> Iterator[ReadChunk]:
        with self._meta:
            name, version = self.resolve(ref)
            rec = self._load_version(name, version)
            plan = self._read_plan(rec, tensors, files)[stream_index::stream_count]
            self._readers[(name, version)] += 1

        def load(item: tuple[str, bool, int, int, str, int]) -> bytes:
            entry, is_file, index, _, digest, size = item
            what = f"checkpoint '{rec.ref}' {'file' if is_file else 'tensor'} '{entry}' chunk {index}"
            return self.chunks.get(digest, what=what + "; run 'tokenmill ckpt verify'", expected_size=size)

        pending: deque[tuple[tuple[str, bool, int, int, str, int], Future[bytes]]] = deque()
        items = iter(plan)
        try:
            # keep `prefetch` chunks being read and verified in the pool while one is being sent
            for item in itertools.islice(items, prefetch):
                pending.append((item, self._pool.submit(load, item)))
            while pending:
                item, fut = pending.popleft()
                nxt = next(items, None)
                if nxt is not None:
                    pending.append((nxt, self._pool.submit(load, nxt)))
                yield ReadChunk(item[0], item[1], item[2], item[3], fut.result())
        finally:
            for _, fut in pending:
                fut.cancel()
            with self._meta:
                self._readers[(name, version)] -= 1
                if self._readers[(name, version)] <= 0:
                    del self._readers[(name, version)]

    # -- leases, delete, retention, GC ---------------------------------------------------------------
    def acquire_lease(self, ref: str, holder: str, ttl_seconds: float) -> Lease:
        if not (1 <= ttl_seconds <= 7 * 24 * 3600):
            raise InvalidArgument(f"lease ttl_seconds {ttl_seconds} out of range [1, 604800]")
        if not holder or len(holder) > 200 or not holder.isprintable():
            raise InvalidArgument("lease holder must be 1..200 printable characters (e.g. a job id)")
        with self._meta:
            name, version = self.resolve(ref)
            lease = Lease(
                f"{name}:{version}:{uuid.uuid4().hex}",
                f"{name}:{version}",
                holder,
                self.clock() + ttl_seconds,
            )
            self.backend.put(self._lease_key(lease.lease_id), _dumps(lease.__dict__))
            return lease

    def _lease_key(self, lease_id: str) -> str:
        parts = lease_id.split(":")
        if len(parts) != 3 or not parts[1].isdigit() or len(parts[2]) != 32:
            raise InvalidArgument(f"invalid lease id {lease_id!r}")
        validate_name(parts[0])
        return f"leases/{parts[0]}/{int(parts[1])}/{parts[2]}.json"

    def release_lease(self, lease_id: str) -> bool:
        with self._meta:
            return self.backend.delete(self._lease_key(lease_id))

    def leases(self, name: str, version: int) -> list[Lease]:
        out = []
        now = self.clock()
        for key in self.backend.list(f"leases/{name}/{version}/"):
            with contextlib.suppress(NotFound, ValueError, KeyError):
                lease = Lease(**json.loads(self.backend.get(key)))
                if lease.expires_at >= now:
                    out.append(lease)
                else:
                    self.backend.delete(key)
        return out

    def _busy(self, name: str, version: int) -> str:
        readers = self._readers.get((name, version), 0)
        held = self.leases(name, version)
        reasons = []
        if readers:
            reasons.append(f"{readers} download(s) in progress")
        reasons += [
            f"lease held by {lease.holder!r} until {time.strftime('%H:%M:%S', time.gmtime(lease.expires_at))} UTC"
            for lease in held
        ]
        return "; ".join(reasons)

    def delete(self, ref: str, *, force: bool = False) -> bool:
        r = parse_ref(ref)
        if not r.selector:
            raise InvalidArgument(
                f"delete needs a version or tag ('{r.name}:3'), not the bare name {r.name!r}"
            )
        with self._meta:
            name, version = self.resolve(ref)
            busy = self._busy(name, version)
            if busy and not force:
                raise FailedPrecondition(
                    f"checkpoint '{name}:{version}' is in use ({busy}); wait for the reader to finish or delete with force"
                )
            self._delete_version(name, version)
            return True

    def _delete_version(self, name: str, version: int) -> None:
        doc = self._tags_doc(name)
        dropped = [t for t, v in doc["tags"].items() if v == version]
        if dropped:
            for t in dropped:
                del doc["tags"][t]
            self.backend.put(f"tags/{name}.json", _dumps(doc))
        self.backend.delete(_manifest_key(name, version))
        self._versions.pop((name, version), None)
        for key in list(self.backend.list(f"leases/{name}/{version}/")):
            self.backend.delete(key)

    def apply_retention(
        self, name: str, keep_last: int, keep_tagged: bool = True, dry_run: bool = False
    ) -> list[str]:
        """Delete all but the newest `keep_last` versions (and tagged/in-use ones); returns deleted refs."""
        validate_name(name)
        if keep_last < 1:
            raise InvalidArgument("keep_last must be at least 1 (the newest version is always kept)")
        with self._meta:
            versions = self._version_numbers(name)
            if not versions:
                raise NotFound(f"no checkpoint named {name!r}")
            tagged = set(self._tags_doc(name)["tags"].values()) if keep_tagged else set()
            doomed = [v for v in versions[:-keep_last] if v not in tagged and not self._busy(name, v)]
            if not dry_run:
                for v in doomed:
                    self._delete_version(name, v)
            return [f"{name}:{v}" for v in doomed]

    def collect_garbage(self, dry_run: bool = False, min_age_seconds: float = 0.0) -> tuple[int, int]:
        """Delete chunks no version or live upload references; returns (chunks, bytes) freed."""
        with self._gc_lock.exclusive(), self._meta:
            self.chunks.reload()
            stored = self.chunks.digests()
            live: set[str] = set()
            for name in self.model_names():
                for v in self._version_numbers(name):
                    live |= self._load_version(name, v).manifest.digests()
            now = self.clock()
            for key in list(self.backend.list("uploads/")):
                state = self._load_session(key[len("uploads/") : -len(".json")])
                if state is None:
                    continue
                if state.expires_at < now:
                    if not dry_run:
                        self.backend.delete(key)
                        self._sessions.pop(state.upload_id, None)
                    continue
                live |= state.manifest.digests()
            self._sweep_staging(dry_run=dry_run)
            doomed = [d for d in stored if d not in live]
            freed = sum(stored[d] for d in doomed)
            if not dry_run:
                for d in doomed:
                    self.chunks.delete(d)
            return len(doomed), freed

    # -- integrity and stats -------------------------------------------------------------------------
    def verify(self, ref: str = "") -> VerifyReport:
        """Hash every chunk of one version (or the whole store); problems name version, entry, chunk."""
        if ref:
            name, version = self.resolve(ref)
            recs = [self._load_version(name, version)]
        else:
            recs = []
            for n in self.model_names():
                for v in self._version_numbers(n):
                    try:
                        recs.append(self._load_version(n, v))
                    except DataLoss as exc:
                        return VerifyReport(False, 0, [str(exc)])
        uses: dict[str, list[str]] = {}
        sizes: dict[str, int] = {}
        for rec in recs:
            m = rec.manifest
            for kind, entries in (("tensor", m.tensors), ("file", m.files)):
                for e in entries:
                    for i, (d, n) in enumerate(
                        zip(e.chunks, chunk_lengths(e.nbytes, m.chunk_size), strict=True)
                    ):
                        uses.setdefault(d, []).append(f"{rec.ref} {kind} {e.name} chunk {i}")
                        sizes[d] = n
        digests = sorted(uses)
        results = list(self._pool.map(lambda d: self.chunks.check(d, sizes[d]), digests))
        problems = [
            f"{use} ({d[:16]}...): {res}"
            for d, res in zip(digests, results, strict=True)
            if res
            for use in uses[d]
        ]
        return VerifyReport(not problems, len(digests), problems)

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
