"""Removing what is no longer wanted: deleting versions, retention policies, garbage collection.

Deleting a version only removes its manifest (and tags and leases); its chunks may be shared with
other versions, so bytes are freed by `collect_garbage`, which deletes the chunks that no version
and no open upload references, holding the GC lock alone so no upload adds a reference meanwhile.
"""

from __future__ import annotations

from tokenmill.common.checkpoint.catalog import Catalog
from tokenmill.common.checkpoint.leases import Leases
from tokenmill.common.checkpoint.names import parse_ref
from tokenmill.common.checkpoint.staging import StagingArea
from tokenmill.common.checkpoint.state import StoreState
from tokenmill.common.checkpoint.uploads import Uploads
from tokenmill.common.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from tokenmill.common.names import validate_name


class Retention:
    def __init__(
        self, state: StoreState, catalog: Catalog, leases: Leases, uploads: Uploads, staging: StagingArea
    ):
        self.state = state
        self.catalog = catalog
        self.leases = leases
        self.uploads = uploads
        self.staging = staging

    def delete(self, ref: str, *, force: bool) -> bool:
        r = parse_ref(ref)
        if not r.selector:
            raise InvalidArgument(
                f"delete needs a version or tag ('{r.name}:3'), not the bare name {r.name!r}"
            )
        with self.state.meta:
            name, version = self.catalog.resolve(ref)
            busy = self.leases.busy(name, version)
            if busy and not force:
                raise FailedPrecondition(
                    f"checkpoint '{name}:{version}' is in use ({busy}); wait for the reader to finish or delete with force"
                )
            self._delete_version(name, version)
            return True

    def _delete_version(self, name: str, version: int) -> None:
        self.catalog.remove(name, version)
        self.leases.drop_all(name, version)

    def apply_retention(self, name: str, keep_last: int, *, keep_tagged: bool, dry_run: bool) -> list[str]:
        """Delete all but the newest `keep_last` versions (and tagged/in-use ones); returns deleted refs."""
        validate_name(name)
        if keep_last < 1:
            raise InvalidArgument("keep_last must be at least 1 (the newest version is always kept)")
        with self.state.meta:
            versions = self.catalog.version_numbers(name)
            if not versions:
                raise NotFound(f"no checkpoint named {name!r}")
            tagged = set(self.catalog.tags(name).tags.values()) if keep_tagged else set()
            doomed = [v for v in versions[:-keep_last] if v not in tagged and not self.leases.busy(name, v)]
            if not dry_run:
                for v in doomed:
                    self._delete_version(name, v)
            return [f"{name}:{v}" for v in doomed]

    def collect_garbage(self, *, dry_run: bool) -> tuple[int, int]:
        """Delete chunks no version or live upload references; returns (chunks, bytes) freed."""
        chunks = self.state.chunks
        with self.state.gc_lock.exclusive(), self.state.meta:
            chunks.reload()
            stored = chunks.digests()
            live: set[str] = set()
            try:
                for rec in self.catalog.all_versions():
                    live |= rec.manifest.digests()
            except DataLoss as exc:
                raise FailedPrecondition(
                    f"garbage collection did not run: it cannot tell which chunks a damaged version "
                    f"still needs. {exc}"
                ) from None
            for session in self.uploads.live_sessions(drop_expired=not dry_run):
                live |= session.manifest.digests()
            self.staging.sweep(self.uploads.is_open, dry_run=dry_run)
            doomed = [d for d in stored if d not in live]
            freed = sum(stored[d] for d in doomed)
            if not dry_run:
                for d in doomed:
                    chunks.delete(d)
            return len(doomed), freed
