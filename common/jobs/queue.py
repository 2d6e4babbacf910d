"""Client side of the job system: submit, inspect, list, cancel, watch, and queue depth."""

from __future__ import annotations

import base64
import binascii
import builtins
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import redis

from tokenmill.common import errors
from tokenmill.common.jobs.keys import JobKeys
from tokenmill.common.jobs.model import Job, JobEvent, JobState
from tokenmill.common.jobs.scripts import JobScripts

MAX_BLOCK_SECONDS = 10.0  # blocking reads stay well below the client's socket timeout (redis_conn)
_TYPE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_OFFSET_RE = re.compile(r"^\d{1,20}-\d{1,20}$")


class JobQueue:
    """Submit, inspect, list, cancel and watch jobs; holds the settings workers share. Thread-safe."""

    def __init__(
        self,
        redis_client: redis.Redis,
        *,
        namespace: str = "tokenmill",
        lease_seconds: float = 30.0,
        max_attempts: int = 3,
    ):
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        if not 1 <= max_attempts <= 100:
            raise ValueError("max_attempts must be between 1 and 100")
        self.redis = redis_client
        self.keys = JobKeys(namespace)
        self.scripts = JobScripts(redis_client, self.keys)
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self._groups_ready: set[str] = set()

    @classmethod
    def from_config(cls, config: Any, redis_client: redis.Redis | None = None) -> JobQueue:
        """A queue with the config's lease and attempt settings (connects if no client is given)."""
        if redis_client is None:
            from tokenmill.common.redis_conn import connect

            redis_client = connect(config)
        return cls(
            redis_client, lease_seconds=config.jobs.lease_seconds, max_attempts=config.jobs.max_attempts
        )

    def ensure_group(self, job_type: str, *, force: bool = False) -> None:
        """Create the stream and its consumer group (from the start, so nothing is skipped)."""
        if job_type in self._groups_ready and not force:
            return
        try:
            self.redis.xgroup_create(
                self.keys.stream(job_type), self.keys.group(job_type), id="0", mkstream=True
            )
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups_ready.add(job_type)

    def submit(
        self,
        job_type: str,
        spec: dict[str, Any],
        *,
        idempotency_key: str = "",
        max_attempts: int | None = None,
    ) -> Job:
        """Create a job (or return the one already created with this idempotency key)."""
        if not _TYPE_RE.fullmatch(job_type or ""):
            raise errors.InvalidArgument(f"job type {job_type!r} must match {_TYPE_RE.pattern}")
        if not isinstance(spec, dict):
            raise errors.InvalidArgument("job spec must be a JSON object (dict)")
        if len(idempotency_key) > 256:
            raise errors.InvalidArgument("idempotency_key is longer than 256 characters")
        attempts = self.max_attempts if max_attempts is None else max_attempts
        if not 1 <= attempts <= 100:
            raise errors.InvalidArgument(f"max_attempts={attempts}: must be between 1 and 100")
        try:
            spec_json = json.dumps(spec, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise errors.InvalidArgument(f"job spec is not JSON-serialisable: {exc}") from None
        self.ensure_group(job_type)
        job_id, now = uuid.uuid4().hex, time.time()
        created, existing_id = self.scripts.submit(
            job_id=job_id,
            job_type=job_type,
            spec_json=spec_json,
            idempotency_key=idempotency_key,
            max_attempts=attempts,
            now=now,
        )
        if created:
            return Job(
                id=job_id,
                type=job_type,
                state=JobState.PENDING,
                spec=json.loads(spec_json),
                idempotency_key=idempotency_key,
                max_attempts=attempts,
                created_at=now,
            )
        existing = self.get(existing_id)
        if (
            existing.type != job_type
            or json.dumps(existing.spec, sort_keys=True, separators=(",", ":")) != spec_json
        ):
            raise errors.AlreadyExists(
                f"idempotency key {idempotency_key!r} was already used for job {existing.id} with a different "
                "spec; use a new key for a different request"
            )
        return existing

    def get(self, job_id: str) -> Job:
        if not job_id:
            raise errors.InvalidArgument("job_id is empty")
        h = self.redis.hgetall(self.keys.job(job_id))
        if not h:
            raise errors.NotFound(f"job {job_id!r} not found")
        return Job.from_hash(h)

    def list(
        self,
        job_type: str,
        *,
        state: JobState | None = None,
        page_size: int = 50,
        page_token: str = "",
    ) -> tuple[list[Job], str]:
        """Jobs of one type, newest first; `page_token` comes from the previous page ("" = first)."""
        page_size = min(page_size or 50, 1000)
        if page_size < 0:
            raise errors.InvalidArgument("page_size must not be negative")
        cursor = _decode_page_token(page_token)
        key = self.keys.index(job_type)
        jobs: list[Job] = []
        batch = max(page_size, 50) if state else page_size
        while len(jobs) < page_size:
            max_score = f"{cursor[0]!r}" if cursor else "+inf"
            raw = self.redis.zrevrangebyscore(
                key, max_score, "-inf", start=0, num=batch + 16, withscores=True
            )
            # ties on the score come in reverse member order; skip what the cursor already covered
            items = [(m, s) for m, s in raw if cursor is None or s < cursor[0] or m < cursor[1]][:batch]
            if not items:
                return jobs, ""
            pipe = self.redis.pipeline(transaction=False)
            for member, _ in items:
                pipe.hgetall(self.keys.job(member))
            for (member, score), h in zip(items, pipe.execute(), strict=True):
                cursor = (score, member)
                if h and (state is None or h.get("state") == state.value):
                    jobs.append(Job.from_hash(h))
                    if len(jobs) == page_size:
                        break
        assert cursor is not None
        score, member = cursor
        older = self.redis.zcount(key, "-inf", f"({score!r}")
        if older or any(m < member for m in self.redis.zrangebyscore(key, score, score)):
            return jobs, _encode_page_token(cursor)
        return jobs, ""

    def cancel(self, job_id: str, reason: str = "") -> Job:
        """PENDING -> CANCELLED at once; RUNNING -> cancel flag the worker checks between steps."""
        job = self.get(job_id)
        reason = reason or "cancelled by request"
        state = self.scripts.cancel(job_id=job_id, job_type=job.type, now=time.time(), reason=reason)
        if state == "missing":
            raise errors.NotFound(f"job {job_id!r} not found")
        if state in ("SUCCEEDED", "FAILED"):
            raise errors.FailedPrecondition(f"job {job_id} already {state}; there is nothing to cancel")
        return self.get(job_id)

    def events(
        self, job_id: str, *, after: str = "", count: int = 100, block_seconds: float = 0
    ) -> builtins.list[JobEvent]:  # `list` here is JobQueue.list
        """Events after offset `after` ("" = from the first); optionally block until one arrives."""
        after = _check_offset(after)
        if not self.redis.exists(self.keys.job(job_id)):
            raise errors.NotFound(f"job {job_id!r} not found")
        key = self.keys.events(job_id)
        if block_seconds > 0:
            block_ms = int(min(block_seconds, MAX_BLOCK_SECONDS) * 1000)
            reply = self.redis.xread({key: after or "0-0"}, count=count, block=block_ms)
            entries = reply[0][1] if reply else []
        else:
            entries = self.redis.xrange(key, min=f"({after}" if after else "-", count=count)
        return [JobEvent.from_entry(job_id, offset, fields) for offset, fields in entries]

    def watch(
        self,
        job_id: str,
        *,
        after: str = "",
        follow: bool = True,
        is_active: Callable[[], bool] = lambda: True,
    ) -> Iterator[JobEvent]:
        """Events from `after` on; with `follow`, until the terminal event (or `is_active()` is false)."""
        after = _check_offset(after)
        while is_active():
            batch = self.events(job_id, after=after, count=100, block_seconds=1.0 if follow else 0)
            for ev in batch:
                yield ev
                after = ev.offset
                if ev.terminal:
                    return
            # nothing new: stop when not following, or when the job ended before `after`
            if not batch and (not follow or self.get(job_id).state.terminal):
                return

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job is terminal (or `timeout` seconds pass) and return it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for _ in self.watch(job_id, is_active=lambda: deadline is None or time.monotonic() < deadline):
            pass
        return self.get(job_id)

    def depth(self, job_type: str) -> dict[str, int]:
        """{"waiting", "running", "dead"} entries for `tokenmill status` and autoscaling."""
        self.ensure_group(job_type)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(self.keys.stream(job_type))
        pipe.xpending(self.keys.stream(job_type), self.keys.group(job_type))
        pipe.xlen(self.keys.dead(job_type))
        total, pending, dead = pipe.execute()
        running = int(pending["pending"])
        return {"waiting": max(int(total) - running, 0), "running": running, "dead": int(dead)}

    def dead_letters(self, job_type: str, count: int = 100) -> builtins.list[dict[str, str]]:
        """The newest dead-lettered entries (job, attempts, error, time)."""
        return [dict(f, id=eid) for eid, f in self.redis.xrevrange(self.keys.dead(job_type), count=count)]


def _check_offset(offset: str) -> str:
    if offset and not _OFFSET_RE.fullmatch(offset):
        raise errors.InvalidArgument(
            f"offset {offset!r} is not an event offset (expected '<ms>-<seq>' from a previous event, or '')"
        )
    return offset


def _encode_page_token(cursor: tuple[float, str]) -> str:
    raw = json.dumps([cursor[0], cursor[1]]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_page_token(token: str) -> tuple[float, str] | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        score, member = json.loads(raw)
        if not isinstance(member, str) or not isinstance(score, int | float):
            raise ValueError
        return float(score), member
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise errors.InvalidArgument(
            "page_token is malformed; pass the next_page_token of the previous page, or '' for the first page"
        ) from None
