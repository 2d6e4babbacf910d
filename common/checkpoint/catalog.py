"""Committed versions and their tags: listing, resolving refs, publishing and removing manifests.

A version exists exactly when its manifest object exists. `publish` writes it with
create-if-absent, so two stores committing the same name at once get distinct version numbers.
Committed manifests never change, so they are cached once read.
"""

from __future__ import annotations

import contextlib
import json

from tokenmill.common import failpoints
from tokenmill.common.checkpoint.names import Ref, parse_ref, validate_name, validate_tag
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


def _manifest_temp_written() -> None:
    failpoints.hit("checkpoint.manifest_temp")


class Catalog:
    """The versions and tags of every model in the store."""

    def __init__(self, state: StoreState):
        self.state = state
        self.backend = state.backend
        self._versions: dict[tuple[str, int], Version] = {}  # immutable once committed: cache

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

    def load(self, name: str, version: int) -> Version:
        """The committed record (without tags); NotFound / DataLoss naming the version."""
        cached = self._versions.get((name, version))
        if cached is not None:
            return cached
        try:
            raw = self.backend.get(manifest_key(name, version))
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

    def all_versions(self) -> list[Version]:
        """Every committed record of every model (recovery, GC and whole-store verify walk these)."""
        return [self.load(n, v) for n in self.model_names() for v in self.version_numbers(n)]

    def find_upload(self, upload_id: str) -> str:
        """The ref an upload was committed as, found by scanning manifests; '' when none names it."""
        for name in self.model_names():
            for v in reversed(self.version_numbers(name)):
                if self.load(name, v).upload_id == upload_id:
                    return f"{name}:{v}"
        return ""

    # -- tags ------------------------------------------------------------------------------------
    def tags(self, name: str) -> TagsDoc:
        try:
            return TagsDoc.from_json(json.loads(self.backend.get(tags_key(name))))
        except NotFound:
            return TagsDoc()

    def save_tags(self, name: str, doc: TagsDoc) -> None:
        self.backend.put(tags_key(name), dumps(doc.to_json()))

    def with_tags(self, rec: Version, doc: TagsDoc | None = None, newest: int | None = None) -> Version:
        """`rec` as callers see it: its tags, with `latest` first when it is the newest version."""
        doc = doc if doc is not None else self.tags(rec.name)
        tags = doc.tags_of(rec.version)
        if newest is None:
            versions = self.version_numbers(rec.name)
            newest = versions[-1] if versions else 0
        if newest == rec.version:
            tags.insert(0, "latest")
        return rec.with_tags(tags)

    def set_tag(self, ref: str, tag: str) -> Version:
        validate_tag(tag)
        with self.state.meta:
            name, version = self.resolve(ref)
            doc = self.tags(name)
            doc.tags[tag] = version
            self.save_tags(name, doc)
            return self.get(f"{name}:{version}")

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
            doc = self.tags(n)
            numbers = self.version_numbers(n)
            for v in numbers:
                with contextlib.suppress(NotFound):
                    out.append(self.with_tags(self.load(n, v), doc, numbers[-1]))
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
        self._versions.pop((name, version), None)
