"""Upload sessions: begin, extend, receive chunks, commit atomically, abort.

A session is persisted under `uploads/<id>.json`, so an upload resumes across server restarts,
and an idempotency key maps a retried save to its session (or to the version it became). Commit
publishes the manifest only after every chunk it names is durable, then applies the commit's tags
and closes the session; a crash between those steps is finished by recovery (recovery.py).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable

from tokenmill.common import failpoints
from tokenmill.common.checkpoint.catalog import Catalog
from tokenmill.common.checkpoint.damage import PARSE_ERRORS, describe, log, object_location, set_aside
from tokenmill.common.checkpoint.manifest import (
    Entry,
    FileEntry,
    Manifest,
    TensorEntry,
    check_digest,
    chunk_lengths,
)
from tokenmill.common.checkpoint.records import (
    UPLOADS,
    UploadState,
    UploadStatus,
    Version,
    dumps,
    idempotency_record_key,
    upload_id_of,
    upload_key,
)
from tokenmill.common.checkpoint.staging import StagingArea
from tokenmill.common.checkpoint.state import StoreState
from tokenmill.common.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from tokenmill.common.names import validate_name, validate_tag

RECENT_COMMITS = 10_000  # upload ids remembered in memory; older retries fall back to a manifest scan


class Uploads:
    def __init__(self, state: StoreState, catalog: Catalog, staging: StagingArea):
        self.state = state
        self.backend = state.backend
        self.chunks = state.chunks
        self.catalog = catalog
        self.staging = staging
        self._sessions: dict[str, UploadState] = {}
        self._recent_commits: dict[str, str] = {}  # upload id -> ref, so a retried commit succeeds

    # -- sessions --------------------------------------------------------------------------------
    def load_session(self, upload_id: str) -> UploadState | None:
        """The persisted session (expired or not); None for a malformed or unknown id."""
        if not upload_id or not all(c in "0123456789abcdef" for c in upload_id) or len(upload_id) != 32:
            return None
        key = upload_key(upload_id)
        try:
            raw = self.backend.get(key)
        except NotFound:
            return None
        try:
            state = parse_session(raw, upload_id)
        except PARSE_ERRORS as exc:
            self._set_aside(
                key, raw, exc, f"upload session {upload_id}", "its client must begin a new upload"
            )
            return None
        self._sessions[upload_id] = state
        return state

    def _set_aside(self, key: str, raw: bytes, exc: BaseException, what: str, consequence: str) -> None:
        """Move a damaged session or idempotency record out of the way, naming its file in the log."""
        with self.state.meta:
            where = object_location(self.backend, key)
            copy = set_aside(self.backend, key, raw)
        log.error("%s: %s %s; moved it to %s, %s", what, where, describe(exc), copy, consequence)

    def _idempotency_record(self, key: str) -> dict[str, str] | None:
        """The upload id / committed ref an idempotency key maps to; None when absent or damaged."""
        try:
            raw = self.backend.get(key)
        except NotFound:
            return None
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict) or not all(
                isinstance(rec.get(f), str) for f in ("upload_id", "ref")
            ):
                raise TypeError("expected {'upload_id': str, 'ref': str}")
            return rec
        except PARSE_ERRORS as exc:
            self._set_aside(key, raw, exc, "idempotency record", "so that key starts a new upload")
            return None

    def session_or_none(self, upload_id: str) -> UploadState | None:
        """The open (unexpired) session, or None."""
        state = self._sessions.get(upload_id)
        if state is None:
            state = self.load_session(upload_id)
        if state is None or state.expires_at < self.state.clock():
            return None
        return state

    def is_open(self, upload_id: str) -> bool:
        return self.session_or_none(upload_id) is not None

    def session(self, upload_id: str) -> UploadState:
        state = self.session_or_none(upload_id)
        if state is None:
            raise NotFound(
                f"upload {upload_id!r} not found (never begun, committed, aborted or expired); begin a new upload"
            )
        return state

    def live_sessions(self, *, drop_expired: bool) -> list[UploadState]:
        """Every unexpired session (GC keeps their chunks); expired ones are deleted when asked."""
        now = self.state.clock()
        live = []
        for key in list(self.backend.list(UPLOADS)):
            state = self.load_session(upload_id_of(key))
            if state is None:
                continue
            if state.expires_at >= now:
                live.append(state)
            elif drop_expired:
                self.backend.delete(key)
                self._sessions.pop(state.upload_id, None)
        return live

    def _save(self, state: UploadState) -> None:
        self.backend.put(upload_key(state.upload_id), dumps(state.to_json()))

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

    def status(self, upload_id: str) -> UploadStatus:
        with self.state.meta:
            return self._status(self.session(upload_id))

    # -- begin and extend ------------------------------------------------------------------------
    def begin(self, name: str, manifest: Manifest, tags: Iterable[str], idempotency_key: str) -> UploadStatus:
        tags = list(tags)
        validate_name(name)
        for tag in tags:
            validate_tag(tag)
        if len(idempotency_key) > 256:
            raise InvalidArgument("idempotency_key is longer than 256 characters")
        manifest.validate()
        with self.state.meta:
            idem_key = idempotency_record_key(name, idempotency_key) if idempotency_key else ""
            rec = self._idempotency_record(idem_key) if idem_key else None
            if rec is not None:
                if rec["ref"]:
                    return UploadStatus(rec["upload_id"], name, [], 0, 0, 0.0, committed_ref=rec["ref"])
                existing = self.session_or_none(rec["upload_id"])
                if existing is not None:
                    return self._status(existing)
            now = self.state.clock()
            state = UploadState(
                upload_id=uuid.uuid4().hex,
                name=name,
                manifest=manifest,
                tags=tags,
                idempotency_key=idempotency_key,
                created_at=now,
                expires_at=now + self.state.upload_ttl,
            )
            state.planned_new = self._plan(manifest, manifest.digests())
            self._save(state)
            self._sessions[state.upload_id] = state
            if idem_key:
                self.backend.put(idem_key, dumps({"upload_id": state.upload_id, "ref": ""}))
            return self._status(state)

    def extend(self, upload_id: str, tensors: list[TensorEntry], files: list[FileEntry]) -> UploadStatus:
        with self.state.meta:
            state = self.session(upload_id)
            # a retried ExtendUpload (response lost) re-adds identical entries: accept those as no-ops
            have = {t.name: t for t in state.manifest.tensors} | {f.name: f for f in state.manifest.files}
            tensors = [t for t in tensors if not _same_entry(upload_id, have, t)]
            files = [f for f in files if not _same_entry(upload_id, have, f)]
            candidate = Manifest.from_json(state.manifest.to_json())
            candidate.extend(tensors, files)  # validates the combined manifest
            added: list[Entry] = [*tensors, *files]
            new = {d for e in added for d in e.chunks}
            planned = self._plan(candidate, new, reserved=state.planned_new)
            state.replace_manifest(candidate)
            state.planned_new = sorted(set(state.planned_new) | set(planned))
            self._save(state)
            return self._status(state)

    def _plan(self, manifest: Manifest, digests: set[str], reserved: Iterable[str] = ()) -> list[str]:
        """Digests the store lacks; RESOURCE_EXHAUSTED when storing them, on top of the session's
        `reserved` (planned, still missing) chunks, would pass the quota.

        `manifest`: the session's manifest as it will be (ExtendUpload plans the added entries
        before they become part of the session, so their sizes are only in the candidate)."""
        missing = sorted(d for d in digests if not self.chunks.has(d))
        if self.state.quota.limit:
            sizes = manifest.expected_sizes()
            held = sum(sizes.get(d, 0) for d in reserved if not self.chunks.has(d))
            self.state.quota.check(sum(sizes[d] for d in missing if d in sizes), reserved=held)
        return missing

    # -- chunks ----------------------------------------------------------------------------------
    def put_chunk(self, upload_id: str, digest: str, data: bytes | bytearray | memoryview) -> bool:
        """Store one chunk of an open upload; False when the store already had it."""
        check_digest(digest)
        with self.state.gc_lock.shared():
            with self.state.meta:
                expected = self.session(upload_id).sizes().get(digest)
            if expected is None:
                raise InvalidArgument(
                    f"chunk {digest[:16]}... is not part of upload {upload_id}; add the entry that "
                    "contains it first (ExtendUpload)"
                )
            if len(data) != expected:
                raise InvalidArgument(
                    f"chunk {digest[:16]}... is {len(data)} bytes but the manifest places {expected} bytes there"
                )
            self.state.quota.check_chunk(digest, len(data))
            return self.chunks.put(digest, data)

    # -- commit and abort ------------------------------------------------------------------------
    def commit(self, upload_id: str) -> Version:
        """Publish the version atomically once every chunk is durable; FAILED_PRECONDITION otherwise."""
        with self.state.gc_lock.shared(), self.state.meta:
            state = self.session_or_none(upload_id)
            if state is None:
                done = self._committed_ref_for(upload_id)
                if done:
                    return self.catalog.get(done)  # a retried commit after success
                raise NotFound(f"upload {upload_id!r} not found (aborted or expired); begin a new upload")
            m = state.manifest
            if not m.tensors and not m.files:
                raise FailedPrecondition(
                    f"upload {upload_id} for {state.name!r} has no tensors or files to commit"
                )
            self._check_complete(state)
            failpoints.hit("checkpoint.before_manifest")
            versions = self.catalog.version_numbers(state.name)
            # never reuse a number, even of a deleted version: a ref names one content forever
            high_water = self.catalog.tags(state.name).applied_through
            sizes = m.expected_sizes()
            rec = self.catalog.publish(
                Version(
                    name=state.name,
                    version=max(versions[-1] if versions else 0, high_water) + 1,
                    created_at=self.state.clock(),
                    manifest=m,
                    new_bytes=sum(sizes[d] for d in state.planned_new if d in sizes),
                    commit_tags=list(state.tags),
                    upload_id=upload_id,
                )
            )
            failpoints.hit("checkpoint.after_manifest")
            doc = self.catalog.tags(state.name)
            for tag in state.tags:
                doc.tags[tag] = rec.version
            doc.applied_through = max(doc.applied_through, rec.version)
            self.catalog.save_tags(state.name, doc)
            self.settle(state, rec.ref)
            return self.catalog.with_tags(rec, doc)

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
        return self.catalog.find_upload(upload_id)  # after a restart: the manifest that names it

    def settle(self, state: UploadState, ref: str) -> None:
        """Close a session whose version `ref` is committed (commit, or recovery after a crash)."""
        state.committed_ref = ref
        if state.idempotency_key:
            self.backend.put(
                idempotency_record_key(state.name, state.idempotency_key),
                dumps({"upload_id": state.upload_id, "ref": ref}),
            )
        self._drop(state.upload_id)
        self._recent_commits[state.upload_id] = ref
        while len(self._recent_commits) > RECENT_COMMITS:
            self._recent_commits.pop(next(iter(self._recent_commits)))

    def abort(self, upload_id: str) -> bool:
        with self.state.meta:
            state = self.session_or_none(upload_id)
            if state is None:
                return False
            self._drop(upload_id)
            if state.idempotency_key:
                self.backend.delete(idempotency_record_key(state.name, state.idempotency_key))
            return True

    def _drop(self, upload_id: str) -> None:
        self.backend.delete(upload_key(upload_id))
        self._sessions.pop(upload_id, None)
        self.staging.remove(upload_id)


def _same_entry(upload_id: str, have: dict[str, Entry], entry: Entry) -> bool:
    """True when `entry` was already added identically (a retry); INVALID_ARGUMENT if differently."""
    existing = have.get(entry.name)
    if existing is None:
        return False
    if type(existing) is not type(entry) or existing.to_json() != entry.to_json():
        raise InvalidArgument(
            f"upload {upload_id}: entry {entry.name!r} was already added with different contents"
        )
    return True


def parse_session(raw: bytes, upload_id: str) -> UploadState:
    """The session stored for `upload_id`; one of PARSE_ERRORS when the bytes are not one."""
    d = json.loads(raw)
    if not isinstance(d, dict):
        raise TypeError(f"expected a JSON object, found {type(d).__name__}")
    state = UploadState.from_json(d)
    if state.upload_id != upload_id:
        raise ValueError(f"it is the session of upload {state.upload_id!r}")
    state.manifest.validate()
    return state
