"""What the platform serves beyond the live heartbeats: the models replicas have served, and why a
replica could not load its model (docs/contracts.md "Redis keys").

`tokenmill:inference:models` (hash: resolved ref -> its tags, JSON) outlives the replicas, so a
request for a model scaled to zero is queued (KEDA sees the backlog and starts one) while a
selector nothing ever served is NOT_FOUND. `tokenmill:inference:load_errors` (hash: replica id ->
LoadError, JSON) is refreshed on every failed load attempt and cleared when the replica loads or
stops: the router answers FAILED_PRECONDITION with the reason, and `tokenmill serve` prints it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import redis

from tokenmill.services.inference.dispatch.protocol import NS
from tokenmill.services.inference.dispatch.selector import Selector, Served

MODELS = f"{NS}:models"
LOAD_ERRORS = f"{NS}:load_errors"
LOAD_ERROR_FRESH_S = 60.0  # a replica retries its load every few seconds; older entries are stale


@dataclass(frozen=True)
class LoadError:
    """A replica that could not load `model` (the ref it was started with), and why."""

    replica_id: str
    model: str
    message: str
    time: float

    def concerns(self, selector: Selector | None) -> bool:
        """Whether a request naming `selector` waits on this replica (same model name; any for None)."""
        if selector is None:
            return True
        return self.model.partition(":")[0] == selector.name


def register_model(r: redis.Redis, served: Served) -> None:
    r.hset(MODELS, served.ref, json.dumps(list(served.tags)))


def forget_model(r: redis.Redis, name: str) -> int:
    """Drop every version of `name` from the served models (`tokenmill serve --remove`)."""
    refs = [ref for ref in r.hkeys(MODELS) if ref.partition(":")[0] == name]
    return int(r.hdel(MODELS, *refs)) if refs else 0


def known_models(r: redis.Redis) -> list[Served]:
    out = []
    for ref, raw in r.hgetall(MODELS).items():
        try:
            tags = tuple(str(t) for t in json.loads(raw))
        except (TypeError, ValueError):
            tags = ()
        out.append(Served(ref, tags))
    return out


def publish_load_error(r: redis.Redis, replica_id: str, model: str, message: str) -> None:
    r.hset(LOAD_ERRORS, replica_id, json.dumps(asdict(LoadError(replica_id, model, message, time.time()))))


def clear_load_error(r: redis.Redis, replica_id: str) -> None:
    r.hdel(LOAD_ERRORS, replica_id)


def load_errors(r: redis.Redis, fresh_s: float = LOAD_ERROR_FRESH_S) -> list[LoadError]:
    """Load errors reported within `fresh_s` (unparsable entries skipped)."""
    now, out = time.time(), []
    for raw in r.hvals(LOAD_ERRORS):
        try:
            err = LoadError(**json.loads(raw))
        except (TypeError, ValueError):
            continue
        if now - err.time <= fresh_s:
            out.append(err)
    return out
