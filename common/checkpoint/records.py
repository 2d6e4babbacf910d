"""What the checkpoint store keeps in its blob backend, where each record lives, and its JSON form.

Layout in the blob backend (the backend is the system of record; nothing lives only in Redis):

    chunks/ab/blake3-<hex>                content-addressed bytes (see chunks.py; bare <hex>: sha256)
    manifests/<name>/<version:010d>.json  one committed version: the commit record, written last
    tags/<name>.json                      {"tags": {tag: version}, "applied_through": version}
    metrics/<name>.json                   metrics recorded after commit, by version (recorded.py)
    uploads/<upload_id>.json              an upload session (resumable across server restarts)
    staging/<upload_id>/<chunk file>      chunks a same-host client wrote for an upload (adopt_staged);
                                          never read as chunks until re-hashed and renamed into chunks/
    idem/<name>/<hash of key>.json        idempotency key -> upload id / committed ref
    leases/<name>/<version>/<id>.json     read leases held by running jobs
    access/<nonce>                        same-host read proof (local_access), removed on close

The dataclasses below are also what the engine returns to its callers (the gRPC server converts
them to protobuf; the trainer's local mode uses them directly).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from tokenmill.common.checkpoint.manifest import Manifest

MANIFESTS = "manifests/"
UPLOADS = "uploads/"


def dumps(obj: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces): equal records are equal objects."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def manifest_key(name: str, version: int) -> str:
    return f"{MANIFESTS}{name}/{version:010d}.json"


def tags_key(name: str) -> str:
    return f"tags/{name}.json"


def upload_key(upload_id: str) -> str:
    return f"{UPLOADS}{upload_id}.json"


def upload_id_of(key: str) -> str:
    """The upload id an `uploads/<id>.json` key names."""
    return key[len(UPLOADS) :].removesuffix(".json")


def idempotency_record_key(name: str, idempotency_key: str) -> str:
    """Where a client's idempotency key is remembered (hashed: the key is free text)."""
    return f"idem/{name}/{hashlib.sha256(idempotency_key.encode()).hexdigest()[:40]}.json"


def leases_prefix(name: str, version: int) -> str:
    return f"leases/{name}/{version}/"


def access_key(nonce: str) -> str:
    return f"access/{nonce}"


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
    recorded_metrics: dict[str, float] = field(default_factory=dict)  # filled from metrics/ when read

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def with_tags(self, tags: list[str], recorded_metrics: dict[str, float] | None = None) -> Version:
        """A copy carrying `tags` and recorded metrics (the cached record itself stays as committed)."""
        return dataclasses.replace(self, tags=tags, recorded_metrics=dict(recorded_metrics or {}))

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
class TagsDoc:
    """A model's tags, and the newest version whose commit tags are applied (recovery's mark).

    `applied_through` also never goes down when versions are deleted, so version numbers are
    never reused: a ref names one content forever."""

    tags: dict[str, int] = field(default_factory=dict)
    applied_through: int = 0

    def tags_of(self, version: int) -> list[str]:
        return sorted(t for t, v in self.tags.items() if v == version)

    def to_json(self) -> dict[str, Any]:
        return {"tags": self.tags, "applied_through": self.applied_through}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TagsDoc:
        return cls(
            tags={k: int(v) for k, v in d.get("tags", {}).items()},
            applied_through=int(d.get("applied_through", 0)),
        )


@dataclass
class UploadState:
    """An open upload session, persisted so an upload resumes across server restarts."""

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

    def replace_manifest(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self._sizes = None

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
