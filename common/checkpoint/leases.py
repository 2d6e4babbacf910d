"""Read leases: a running job pins the version it reads, so retention and unforced deletes skip it.

A lease is an object under `leases/<name>/<version>/` with an expiry, so it survives server
restarts and lapses by itself when its holder dies. Downloads in progress pin their version too,
in memory (`StoreState.readers`); `busy` reports both.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid

from tokenmill.common.checkpoint.catalog import Catalog
from tokenmill.common.checkpoint.records import Lease, dumps, leases_prefix
from tokenmill.common.checkpoint.state import StoreState
from tokenmill.common.errors import InvalidArgument, NotFound
from tokenmill.common.names import validate_name

MAX_TTL = 7 * 24 * 3600


def lease_key(lease_id: str) -> str:
    """`leases/<name>/<version>/<id>.json` for a lease id `<name>:<version>:<32 hex>`."""
    parts = lease_id.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or len(parts[2]) != 32:
        raise InvalidArgument(f"invalid lease id {lease_id!r}")
    validate_name(parts[0])
    return f"{leases_prefix(parts[0], int(parts[1]))}{parts[2]}.json"


class Leases:
    def __init__(self, state: StoreState, catalog: Catalog):
        self.state = state
        self.backend = state.backend
        self.catalog = catalog

    def acquire(self, ref: str, holder: str, ttl_seconds: float) -> Lease:
        if not (1 <= ttl_seconds <= MAX_TTL):
            raise InvalidArgument(f"lease ttl_seconds {ttl_seconds} out of range [1, {MAX_TTL}]")
        if not holder or len(holder) > 200 or not holder.isprintable():
            raise InvalidArgument("lease holder must be 1..200 printable characters (e.g. a job id)")
        with self.state.meta:
            name, version = self.catalog.resolve(ref)
            self.catalog.load(name, version)  # no lease on a damaged version: DATA_LOSS naming it
            lease = Lease(
                f"{name}:{version}:{uuid.uuid4().hex}",
                f"{name}:{version}",
                holder,
                self.state.clock() + ttl_seconds,
            )
            self.backend.put(lease_key(lease.lease_id), dumps(lease.__dict__))
            return lease

    def release(self, lease_id: str) -> bool:
        with self.state.meta:
            return self.backend.delete(lease_key(lease_id))

    def held(self, name: str, version: int) -> list[Lease]:
        """The unexpired leases on one version (expired ones are deleted on the way)."""
        out = []
        now = self.state.clock()
        for key in self.backend.list(leases_prefix(name, version)):
            with contextlib.suppress(NotFound, ValueError, KeyError):
                lease = Lease(**json.loads(self.backend.get(key)))
                if lease.expires_at >= now:
                    out.append(lease)
                else:
                    self.backend.delete(key)
        return out

    def busy(self, name: str, version: int) -> str:
        """Why a version is in use ('' when it is not): downloads in progress and leases held."""
        readers = self.state.readers.get((name, version), 0)
        reasons = []
        if readers:
            reasons.append(f"{readers} download(s) in progress")
        reasons += [
            f"lease held by {lease.holder!r} until {time.strftime('%H:%M:%S', time.gmtime(lease.expires_at))} UTC"
            for lease in self.held(name, version)
        ]
        return "; ".join(reasons)

    def drop_all(self, name: str, version: int) -> None:
        """Remove every lease on a version (it is being deleted)."""
        for key in list(self.backend.list(leases_prefix(name, version))):
            self.backend.delete(key)
