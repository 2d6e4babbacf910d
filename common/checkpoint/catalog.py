"""Committed versions and their tags: listing, resolving refs, publishing and removing manifests.

A version exists exactly when its manifest object exists. `publish` writes it with
create-if-absent, so two stores committing the same name at once get distinct version numbers.
Committed manifests never change, so they are cached once read.

A damaged manifest (empty, truncated, garbled, or JSON that is not a valid record of its version)
quarantines only its version: every read of it (by number, by a tag pointing at it, or as `latest`
when it is the newest) answers DATA_LOSS naming the file and what to do, and the error log names the
file once. Listings skip it (the protocol has no "damaged" field; `verify` reports it), so `latest`
is never shown on an older version either. Deleting it works (a delete never reads the manifest).
It is re-read on every use, so a manifest restored from a backup serves without a restart.
A damaged tags document is set aside and rebuilt from the commit tags the manifests record.
"""

from __future__ import annotations

import contextlib
import json

from tokenmill.common import failpoints
from tokenmill.common.checkpoint.damage import PARSE_ERRORS, describe, log, object_location, set_aside
from tokenmill.common.checkpoint.names import Ref, parse_ref
from tokenmill.common.checkpoint.recorded import MetricsDoc, RecordedMetrics, qualified
from tokenmill.common.checkpoint.records import (
    MANIFESTS,
    TagsDoc,
    Version,
    dumps,
    manifest_key,
    tags_key,
)
from tokenmill.common.checkpoint.state import StoreState
from tokenmill.common.errors import DataLoss, NotFound
from tokenmill.common.names import validate_name, validate_tag


def _manifest_temp_written() -> None:
    failpoints.hit("checkpoint.manifest_temp")


class Catalog:
    """The versions and tags of every model in the store."""

    def __init__(self, state: StoreState):
        self.state = state
        self.backend = state.backend
        self._versions: dict[tuple[str, int], Version] = {}  # immutable once committed: cache
        self._damaged: dict[tuple[str, int], str] = {}  # quarantined versions -> what is wrong
        self.recorded = RecordedMetrics(state.backend)

    # -- names and versions ----------------------------------------------------------------------
    def model_names(self) -> list[str]:
        names = {key.split("/")[1] for key in self.backend.list(MANIFESTS) if key.count("/") == 2}
        return sorted(names)

    def version_numbers(self, name: str) -> list[int]:
        out = []
        for key in self.backend.list(f"{MANIFESTS}{name}/"):
            stem = key.rsplit("/", 1)[-1].removesuffix(".json")
            if stem.isdigit():
                out.append(int(stem))
        return sorted(out)

    def load(self, name: str, version: int, *, fresh: bool = False) -> Version:
        """The committed record (without tags); NotFound / DataLoss naming the version.

        `fresh` reads the manifest object again instead of the cache (verify checks what is on
        disk); found damaged, the version is quarantined from then on, as a restart would."""
        cached = None if fresh else self._versions.get((name, version))
        if cached is not None:
            return cached
        try:
            raw = self.backend.get(manifest_key(name, version))
        except NotFound:
            raise NotFound(
                f"checkpoint '{name}:{version}' not found; list versions with 'tokenmill ckpt list {name}'"
            ) from None
        try:
            rec = parse_version(raw, name, version)
        except PARSE_ERRORS as exc:
            self._versions.pop((name, version), None)
            raise self._quarantine(name, version, exc) from None
        self._damaged.pop((name, version), None)
        self._versions[(name, version)] = rec
        return rec

    def _quarantine(self, name: str, version: int, exc: BaseException) -> DataLoss:
        """Note a damaged manifest (logged once per kind of damage) and the DATA_LOSS its version answers."""
        where = object_location(self.backend, manifest_key(name, version))
        problem = describe(exc)
        if self._damaged.get((name, version)) != problem:
            log.error(
                "checkpoint '%s:%d' is quarantined: its manifest %s %s; the other versions serve",
                name,
                version,
                where,
                problem,
            )
        self._damaged[(name, version)] = problem
        return DataLoss(
            f"checkpoint '{name}:{version}' is damaged: its manifest {where} {problem}. Restore that file "
            f"from a backup, or delete the version with 'tokenmill ckpt delete {name}:{version}' "
            "(the other versions are unaffected)"
        )

    def load_or_none(self, name: str, version: int) -> Version | None:
        """The record, or None when it is damaged (quarantined and logged) or was deleted meanwhile."""
        try:
            return self.load(name, version)
        except (DataLoss, NotFound):
            return None

    def all_refs(self) -> list[tuple[str, int]]:
        """(name, version) of every committed version, damaged ones included."""
        return [(n, v) for n in self.model_names() for v in self.version_numbers(n)]

    def all_versions(self) -> list[Version]:
        """Every committed record of every model (GC walks these); DATA_LOSS on a damaged one."""
        return [self.load(n, v) for n, v in self.all_refs()]

    def find_upload(self, upload_id: str) -> str:
        """The ref an upload was committed as, found by scanning manifests; '' when none names it."""
        for name in self.model_names():
            for v in reversed(self.version_numbers(name)):
                rec = self.load_or_none(name, v)
                if rec is not None and rec.upload_id == upload_id:
                    return f"{name}:{v}"
        return ""

    # -- tags ------------------------------------------------------------------------------------
    def tags(self, name: str) -> TagsDoc:
        try:
            raw = self.backend.get(tags_key(name))
        except NotFound:
            return TagsDoc()
        try:
            return parse_tags(raw)
        except PARSE_ERRORS as exc:
            return self._rebuild_tags(name, raw, exc)

    def _rebuild_tags(self, name: str, raw: bytes, exc: BaseException) -> TagsDoc:
        """Set a damaged tags document aside and rebuild it from the commit tags in the manifests.

        Why rebuild: commit tags are recorded in each manifest, so only tags moved later by SetTag
        are lost, and the log says so; versions past every manifest are never reused because
        `applied_through` becomes the newest version number."""
        with self.state.meta:
            key = tags_key(name)
            with contextlib.suppress(NotFound, *PARSE_ERRORS):
                return parse_tags(self.backend.get(key))  # another thread rebuilt it meanwhile
            where = object_location(self.backend, key)
            copy = set_aside(self.backend, key, raw)
            doc = TagsDoc()
            for version in self.version_numbers(name):
                rec = self.load_or_none(name, version)
                for tag in rec.commit_tags if rec is not None else []:
                    doc.tags[tag] = version
                doc.applied_through = version
            self.save_tags(name, doc)
            log.error(
                "tags of checkpoint %r: %s %s; moved it to %s and rebuilt it from the commit tags "
                "(%s); tags set later with 'tokenmill ckpt tag' must be set again",
                name,
                where,
                describe(exc),
                copy,
                doc.tags or "none",
            )
            return doc

    def save_tags(self, name: str, doc: TagsDoc) -> None:
        self.backend.put(tags_key(name), dumps(doc.to_json()))

    def with_tags(
        self,
        rec: Version,
        doc: TagsDoc | None = None,
        newest: int | None = None,
        metrics: MetricsDoc | None = None,
    ) -> Version:
        """`rec` as callers see it: its tags, with `latest` first when it is the newest version, and
        the metrics recorded with it after commit."""
        doc = doc if doc is not None else self.tags(rec.name)
        metrics = metrics if metrics is not None else self.recorded.doc(rec.name)
        tags = doc.tags_of(rec.version)
        if newest is None:
            versions = self.version_numbers(rec.name)
            newest = versions[-1] if versions else 0
        if newest == rec.version:
            tags.insert(0, "latest")
        return rec.with_tags(tags, metrics.of(rec.version))

    def set_tag(self, ref: str, tag: str) -> Version:
        validate_tag(tag)
        with self.state.meta:
            name, version = self.resolve(ref)
            rec = self.load(name, version)  # DATA_LOSS before a tag points at a damaged version
            doc = self.tags(name)
            doc.tags[tag] = version
            self.save_tags(name, doc)
            return self.with_tags(rec, doc)

    def record_metrics(self, ref: str, namespace: str, values: dict[str, float]) -> Version:
        """Merge `values` under `namespace` into the version's recorded metrics, atomically (one
        write under the metadata lock); recording the same values again changes nothing."""
        checked = qualified(namespace, values)
        with self.state.meta:
            name, version = self.resolve(ref)
            rec = self.load(name, version)  # DATA_LOSS: metrics never attach to a damaged version
            self.recorded.merge(name, version, checked)
            return self.with_tags(rec)

    def delete_tag(self, name: str, tag: str) -> bool:
        validate_name(name)
        validate_tag(tag)
        with self.state.meta:
            doc = self.tags(name)
            if doc.tags.pop(tag, None) is None:
                return False
            self.save_tags(name, doc)
            return True

    # -- lookups ---------------------------------------------------------------------------------
    def resolve(self, ref: str) -> tuple[str, int]:
        """`name`, `name:N`, `name:tag` or `name:latest` -> (name, version); NotFound with a hint."""
        r: Ref = parse_ref(ref)
        versions = self.version_numbers(r.name)
        if not versions:
            raise NotFound(f"no checkpoint named {r.name!r}; list them with 'tokenmill ckpt list'")
        if r.selector in ("", "latest"):
            return r.name, versions[-1]
        if r.is_version:
            v = int(r.selector)
            if v not in versions:
                raise NotFound(f"checkpoint '{r.name}:{v}' not found; versions: {versions[-10:]}")
            return r.name, v
        doc = self.tags(r.name)
        tagged = doc.tags.get(r.selector)
        if tagged is None or tagged not in versions:
            raise NotFound(f"checkpoint {r.name!r} has no tag {r.selector!r}; tags: {sorted(doc.tags)}")
        return r.name, tagged

    def get(self, ref: str) -> Version:
        name, version = self.resolve(ref)
        return self.with_tags(self.load(name, version))

    def versions(self, name: str = "") -> list[Version]:
        """Every version of `name` (of every model when empty), oldest first, with tags."""
        names = [validate_name(name)] if name else self.model_names()
        out = []
        for n in names:
            doc, metrics = self.tags(n), self.recorded.doc(n)
            numbers = self.version_numbers(n)
            for v in numbers:
                rec = self.load_or_none(n, v)  # damaged: skipped here, logged, reported by verify
                if rec is not None:
                    out.append(self.with_tags(rec, doc, numbers[-1], metrics))
        return out

    # -- publishing and removing -----------------------------------------------------------------
    def publish(self, rec: Version) -> Version:
        """Write `rec`'s manifest under the first free version number from `rec.version` on."""
        while not self.backend.put_if_absent(
            manifest_key(rec.name, rec.version), dumps(rec.to_json()), before_publish=_manifest_temp_written
        ):
            rec.version += 1  # another process committed this number first
        self._versions[(rec.name, rec.version)] = rec
        return rec

    def remove(self, name: str, version: int) -> None:
        """Drop a version's manifest and the tags pointing at it (leases are the caller's)."""
        doc = self.tags(name)
        dropped = [t for t, v in doc.tags.items() if v == version]
        if dropped:
            for t in dropped:
                del doc.tags[t]
            self.save_tags(name, doc)
        self.backend.delete(manifest_key(name, version))
        self.recorded.drop(name, version)
        self._versions.pop((name, version), None)


def parse_version(raw: bytes, name: str, version: int) -> Version:
    """The record in the manifest object of `name:version`; one of PARSE_ERRORS when the bytes are
    not valid JSON, not a valid record, or the record of another version."""
    d = json.loads(raw)
    if not isinstance(d, dict):
        raise TypeError(f"expected a JSON object, found {type(d).__name__}")
    rec = Version.from_json(d)
    if (rec.name, rec.version) != (name, version):
        raise ValueError(f"it is the record of '{rec.name}:{rec.version}'")
    rec.manifest.validate()
    return rec


def parse_tags(raw: bytes) -> TagsDoc:
    """A tags document; one of PARSE_ERRORS when the bytes are not one."""
    d = json.loads(raw)
    if not isinstance(d, dict):
        raise TypeError(f"expected a JSON object, found {type(d).__name__}")
    return TagsDoc.from_json(d)
