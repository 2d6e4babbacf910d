"""The Redis Streams job system every long operation (ingest, train, compress, generate) runs on.

Model (see docs/contracts.md "Jobs" and "Redis keys"):

* A job is a hash `tokenmill:job:{id}` plus one entry on its type's stream
  `tokenmill:jobs:{type}:stream`, read by the consumer group `{type}-workers`.
* A worker takes an entry with XREADGROUP; the entry sits in the group's pending list (PEL) while it
  runs. The entry's PEL idle time is the lease: heartbeats reset it (XCLAIM of its own entry), and
  after `lease_seconds` without one any worker may take it over with XAUTOCLAIM.
* The hash field `attempts` is a fencing token. Starting an attempt increments it; every write a
  worker makes (progress, result, failure) names its attempt and is refused when it is not the
  current one. A worker whose lease was taken (paused, partitioned) therefore cannot overwrite the
  outcome of the attempt that replaced it: the client sees exactly one completion.
* Every state change runs in one Lua script (atomic), so transitions are monotonic:
  PENDING -> RUNNING -> SUCCEEDED | FAILED | CANCELLED, and RUNNING -> PENDING only when a failed
  attempt is re-queued. Terminal states never change.
* Each job has an event stream `tokenmill:job:{id}:events` (state, progress and log events);
  its stream IDs are the offsets clients resume from. A terminal job's stream ends with the
  terminal state event.
* Delivery is at-least-once (a crash after the work but before the result is recorded re-runs it),
  so handlers must be idempotent. Finished entries are XACKed and XDELeted, so the stream holds only
  waiting and running work (`depth()` is cheap and the stream does not grow without bound).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from tokenmill.common import errors

log = logging.getLogger(__name__)

MAX_BLOCK_SECONDS = 10.0  # blocking reads stay well below the client's socket timeout (redis_conn)
EVENTS_MAXLEN = 10_000  # per-job event stream cap (approximate trimming)
_TYPE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_OFFSET_RE = re.compile(r"^\d{1,20}-\d{1,20}$")


class JobState(enum.Enum):
    """Values equal the proto enum names without the `JOB_STATE_` prefix."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class JobCancelled(errors.Cancelled):
    """Raised by `JobContext.raise_if_cancelled`; the worker ends the job CANCELLED."""


class LeaseLost(errors.Aborted):
    """This attempt's lease was taken over by another worker; stop and drop the result."""


@dataclass
class Job:
    id: str
    type: str
    state: JobState
    spec: dict[str, Any]
    idempotency_key: str = ""
    attempts: int = 0
    max_attempts: int = 3
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    result: dict[str, Any] | None = None
    error: str = ""
    cancel_requested: bool = False
    progress: dict[str, Any] = field(default_factory=dict)
    worker: str = ""
    artifacts: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Job:
        def opt_float(name: str) -> float | None:
            return float(h[name]) if h.get(name) else None

        return cls(
            id=h["id"],
            type=h["type"],
            state=JobState(h["state"]),
            spec=json.loads(h.get("spec") or "{}"),
            idempotency_key=h.get("idem", ""),
            attempts=int(h.get("attempts") or 0),
            max_attempts=int(h.get("max_attempts") or 1),
            created_at=float(h.get("created_at") or 0),
            started_at=opt_float("started_at"),
            finished_at=opt_float("finished_at"),
            result=json.loads(h["result"]) if h.get("result") else None,
            error=h.get("error", ""),
            cancel_requested=h.get("cancel") == "1",
            progress=json.loads(h.get("progress") or "{}"),
            worker=h.get("worker", ""),
            artifacts=json.loads(h.get("artifacts") or "[]"),
        )


@dataclass
class JobEvent:
    offset: str
    job_id: str
    time: float
    kind: str  # "state" | "progress" | "log"
    state: JobState
    data: dict[str, Any]
    message: str

    @property
    def terminal(self) -> bool:
        return self.kind == "state" and self.state.terminal


# --------------------------------------------------------------------------------------------
# Lua scripts. Each one is a single atomic state change; KEYS are declared for cluster safety.
# A script may be retried by the client after a lost reply, so each is idempotent for a retry.
# --------------------------------------------------------------------------------------------
_LUA_PRELUDE = """
local TERMINAL = {SUCCEEDED=true, FAILED=true, CANCELLED=true}
local function event(key, now, kind, state, data, message)
  return redis.call('XADD', key, 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'kind', kind, 'state', state,
                    'time', now, 'data', data, 'message', message)
end
""".replace("EVENTS_MAXLEN", str(EVENTS_MAXLEN))

# KEYS: job, stream, index, events, idem   ARGV: id, now, type, spec, idem, max_attempts, has_idem
_SUBMIT = (
    _LUA_PRELUDE
    + """
if ARGV[7] == '1' then
  local existing = redis.call('GET', KEYS[5])
  if existing then return {0, existing} end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, ARGV[1]} end
local entry = redis.call('XADD', KEYS[2], '*', 'job', ARGV[1])
-- sparse record: absent fields read as empty/default (Job.from_hash)
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'type', ARGV[3], 'state', 'PENDING', 'spec', ARGV[4],
  'idem', ARGV[5], 'attempts', 0, 'max_attempts', ARGV[6], 'created_at', ARGV[2], 'entry', entry)
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
event(KEYS[4], ARGV[2], 'state', 'PENDING', '{}', 'submitted')
if ARGV[7] == '1' then redis.call('SET', KEYS[5], ARGV[1]) end
return {1, ARGV[1]}
"""
)

# KEYS: stream, dead   ARGV: namespace, entry, consumer, group, now, claim_nonce, job id
# With entry == '' the script first reads the next new entry itself (XREADGROUP without BLOCK), so
# a busy worker takes and starts a job in one round trip. The job's own keys derive from the entry
# (the job system therefore needs a standalone Redis, not Redis Cluster).
# Returns {'empty'} | {'run', attempt, hash, entry} | {'skip', why, entry, id} | {'dead', error, entry, id}
_START_FN = """
local function start(K, A)
local entry, id = A[2], A[7]
if entry == '' then
  local r = redis.call('XREADGROUP', 'GROUP', A[4], A[3], 'COUNT', 1, 'STREAMS', K[1], '>')
  if not r then return {'empty'} end
  entry = r[1][2][1][1]
  local fields = r[1][2][1][2]
  id = ''
  for i = 1, #fields, 2 do if fields[i] == 'job' then id = fields[i + 1] end end
end
local job, events = A[1] .. ':job:' .. id, A[1] .. ':job:' .. id .. ':events'
local f = redis.call('HMGET', job, 'state', 'entry', 'attempts', 'max_attempts', 'claim', 'worker', 'error',
  'started_at')
local function drop()
  redis.call('XACK', K[1], A[4], entry)
  redis.call('XDEL', K[1], entry)
end
if not f[1] then drop() return {'skip', 'job record missing', entry, id} end
if f[5] == A[6] then return {'run', tonumber(f[3]), redis.call('HGETALL', job), entry} end
if f[2] ~= entry or TERMINAL[f[1]] then drop() return {'skip', f[1], entry, id} end
local attempts, max_attempts = tonumber(f[3]), tonumber(f[4])
if attempts >= max_attempts then
  local err = 'gave up after ' .. attempts .. ' attempt(s): the worker running attempt ' .. attempts ..
    ' (' .. (f[6] or '?') .. ') stopped heartbeating and its lease expired'
  if f[7] and f[7] ~= '' then err = err .. '; last error: ' .. f[7] end
  redis.call('XADD', K[2], '*', 'job', id, 'attempts', attempts, 'error', err, 'time', A[5])
  redis.call('HSET', job, 'state', 'FAILED', 'error', err, 'finished_at', A[5])
  event(events, A[5], 'state', 'FAILED', '{}', err)
  drop()
  return {'dead', err, entry, id}
end
attempts = attempts + 1
local previous = f[6]
redis.call('HSET', job, 'state', 'RUNNING', 'attempts', attempts, 'claim', A[6], 'worker', A[3],
  'started_at', f[8] or A[5])
local msg = 'attempt ' .. attempts .. ' started on ' .. A[3]
if f[1] == 'RUNNING' then msg = msg .. ' (lease of ' .. (previous or '?') .. ' expired)' end
event(events, A[5], 'state', 'RUNNING', '{"attempt":' .. attempts .. '}', msg)
return {'run', attempts, redis.call('HGETALL', job), entry}
end
"""
_START = _LUA_PRELUDE + _START_FN + "return start(KEYS, ARGV)\n"

# KEYS: job, stream, events   ARGV: attempt, entry, group, consumer, now, op, data, message
# op: 'hb' | 'progress' | 'log' | 'artifacts'. Returns {alive 0|1, cancel '0'|'1'}.
_UPDATE = (
    _LUA_PRELUDE
    + """
local f = redis.call('HMGET', KEYS[1], 'state', 'attempts', 'cancel')
if f[1] ~= 'RUNNING' or f[2] ~= ARGV[1] then return {0, f[3] or '0'} end
redis.call('XCLAIM', KEYS[2], ARGV[3], ARGV[4], 0, ARGV[2], 'JUSTID')  -- resets idle time: lease renewed
if ARGV[6] == 'progress' then
  redis.call('HSET', KEYS[1], 'progress', ARGV[7])
  event(KEYS[3], ARGV[5], 'progress', 'RUNNING', ARGV[7], ARGV[8])
elseif ARGV[6] == 'log' then
  event(KEYS[3], ARGV[5], 'log', 'RUNNING', '{}', ARGV[8])
elseif ARGV[6] == 'artifacts' then
  redis.call('HSET', KEYS[1], 'artifacts', ARGV[7])
end
return {1, f[3] or '0'}
"""
)

# KEYS: job, stream, events, dead
# ARGV: attempt, entry, group, now, outcome (SUCCEEDED|FAILED|CANCELLED|RETRY), result, error, id
# Returns {'fenced', state} | {final state}
_FINISH_FN = """
local function finish(K, A)
local f = redis.call('HMGET', K[1], 'state', 'attempts', 'max_attempts')
if not f[1] then return {'fenced', 'missing'} end
if f[2] ~= A[1] then return {'fenced', f[1]} end
if TERMINAL[f[1]] then
  redis.call('XACK', K[2], A[3], A[2])
  redis.call('XDEL', K[2], A[2])
  return {f[1]}
end
if f[1] ~= 'RUNNING' then return {'fenced', f[1]} end
local outcome, err = A[5], A[7]
if outcome == 'RETRY' then
  if tonumber(f[2]) >= tonumber(f[3]) then
    err = 'failed after ' .. f[2] .. ' attempt(s): ' .. err
    -- dead-letter first; XACK follows in the same script, so the entry is never lost
    redis.call('XADD', K[4], '*', 'job', A[8], 'attempts', f[2], 'error', err, 'time', A[4])
    outcome = 'FAILED'
  else
    local entry = redis.call('XADD', K[2], '*', 'job', A[8])
    redis.call('HSET', K[1], 'state', 'PENDING', 'entry', entry, 'error', err, 'claim', '')
    event(K[3], A[4], 'state', 'PENDING', '{}', 'attempt ' .. f[2] .. ' failed, retrying: ' .. err)
    redis.call('XACK', K[2], A[3], A[2])
    redis.call('XDEL', K[2], A[2])
    return {'PENDING'}
  end
end
redis.call('HSET', K[1], 'state', outcome, 'finished_at', A[4], 'result', A[6], 'error', err)
local data = '{}'
if outcome == 'SUCCEEDED' then data = A[6] end
local msg = string.lower(outcome)
if err ~= '' then msg = msg .. ': ' .. err end
event(K[3], A[4], 'state', outcome, data, msg)
redis.call('XACK', K[2], A[3], A[2])
redis.call('XDEL', K[2], A[2])
return {outcome}
end
"""
_FINISH = _LUA_PRELUDE + _FINISH_FN + "return finish(KEYS, ARGV)\n"

# FINISH one job and START (take) the next in one round trip: what a busy worker loop does.
# KEYS: job, stream, events, dead   ARGV: the 8 FINISH args, then START's 7 (entry '' = take)
# Returns {finish reply, start reply}.
_FINISH_TAKE = (
    _LUA_PRELUDE
    + _FINISH_FN
    + _START_FN
    + """
local done = finish(KEYS, {ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]})
return {done, start({KEYS[2], KEYS[4]}, {ARGV[9], ARGV[10], ARGV[11], ARGV[12], ARGV[13], ARGV[14], ARGV[15]})}
"""
)

# KEYS: job, stream, events   ARGV: now, reason, group. Returns {state after}.
_CANCEL = (
    _LUA_PRELUDE
    + """
local f = redis.call('HMGET', KEYS[1], 'state', 'entry')
if not f[1] then return {'missing'} end
if TERMINAL[f[1]] then return {f[1]} end
local reason = ARGV[2]
if f[1] == 'PENDING' then
  redis.call('HSET', KEYS[1], 'state', 'CANCELLED', 'finished_at', ARGV[1], 'error', reason, 'cancel', '1',
             'cancel_reason', reason)
  event(KEYS[3], ARGV[1], 'state', 'CANCELLED', '{}', 'cancelled: ' .. reason)
  redis.call('XACK', KEYS[2], ARGV[3], f[2])  -- it may sit, unstarted, in a worker's pending list
  redis.call('XDEL', KEYS[2], f[2])
  return {'CANCELLED'}
end
if redis.call('HGET', KEYS[1], 'cancel') ~= '1' then
  redis.call('HSET', KEYS[1], 'cancel', '1', 'cancel_reason', reason)
  event(KEYS[3], ARGV[1], 'log', 'RUNNING', '{}', 'cancel requested: ' .. reason)
end
return {'RUNNING'}
"""
)


# KEYS: stream   ARGV: group, consumer, min_idle_ms, cursor, count
# XAUTOCLAIM ... JUSTID, then fetch the claimed entries. Redis 6.2 keeps entries deleted while
# pending in the PEL forever (7.0 drops them); acknowledge those here so they stop coming back.
# Returns {next cursor, {id, {field, value, ...}}, ...}.
_RECLAIM = """
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5], 'JUSTID')
local out = {r[1]}
for _, id in ipairs(r[2]) do
  local e = redis.call('XRANGE', KEYS[1], id, id)
  if #e == 0 then redis.call('XACK', KEYS[1], ARGV[1], id) else table.insert(out, e[1]) end
end
return out
"""


def _pairs(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


class JobQueue:
    """Client side of the job system: submit, inspect, list, cancel, watch. Thread-safe."""

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
        self.ns = namespace
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self._groups_ready: set[str] = set()
        self._submit = redis_client.register_script(_SUBMIT)
        self._start = redis_client.register_script(_START)
        self._update = redis_client.register_script(_UPDATE)
        self._finish = redis_client.register_script(_FINISH)
        self._cancel = redis_client.register_script(_CANCEL)
        self._reclaim = redis_client.register_script(_RECLAIM)
        self._finish_take = redis_client.register_script(_FINISH_TAKE)

    @classmethod
    def from_config(cls, config: Any, redis_client: redis.Redis | None = None) -> JobQueue:
        """A queue with the config's lease and attempt settings (connects if no client is given)."""
        if redis_client is None:
            from tokenmill.common.redis_conn import connect

            redis_client = connect(config)
        return cls(
            redis_client, lease_seconds=config.jobs.lease_seconds, max_attempts=config.jobs.max_attempts
        )

    # -- keys -----------------------------------------------------------------------------
    def stream_key(self, job_type: str) -> str:
        return f"{self.ns}:jobs:{job_type}:stream"

    def dead_key(self, job_type: str) -> str:
        return f"{self.ns}:jobs:{job_type}:dead"

    def index_key(self, job_type: str) -> str:
        return f"{self.ns}:jobs:{job_type}:index"

    def job_key(self, job_id: str) -> str:
        return f"{self.ns}:job:{job_id}"

    def events_key(self, job_id: str) -> str:
        return f"{self.ns}:job:{job_id}:events"

    def idem_key(self, job_type: str, key: str) -> str:
        return f"{self.ns}:idem:{job_type}:{key}"

    @staticmethod
    def group(job_type: str) -> str:
        return f"{job_type}-workers"

    def ensure_group(self, job_type: str, *, force: bool = False) -> None:
        """Create the stream and its consumer group (from the start, so nothing is skipped)."""
        if job_type in self._groups_ready and not force:
            return
        try:
            self.redis.xgroup_create(self.stream_key(job_type), self.group(job_type), id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups_ready.add(job_type)

    # -- client API -----------------------------------------------------------------------
    def submit(
        self,
        job_type: str,
        spec: dict[str, Any],
        *,
        idempotency_key: str = "",
        max_attempts: int | None = None,
    ) -> Job:
        """Create a job (or return the one already created with this idempotency key)."""
        if not _TYPE_RE.match(job_type or ""):
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
        job_id = uuid.uuid4().hex
        keys = [
            self.job_key(job_id),
            self.stream_key(job_type),
            self.index_key(job_type),
            self.events_key(job_id),
            self.idem_key(job_type, idempotency_key),
        ]
        args = [
            job_id,
            repr(time.time()),
            job_type,
            spec_json,
            idempotency_key,
            attempts,
            int(bool(idempotency_key)),
        ]
        reply = self._submit(keys=keys, args=args)
        if reply[0] == 1:
            return Job(
                id=job_id,
                type=job_type,
                state=JobState.PENDING,
                spec=json.loads(spec_json),
                idempotency_key=idempotency_key,
                max_attempts=attempts,
                created_at=float(args[1]),
            )
        existing = self.get(reply[1])
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
        h = self.redis.hgetall(self.job_key(job_id))
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
        key = self.index_key(job_type)
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
                pipe.hgetall(self.job_key(member))
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
        keys = [self.job_key(job_id), self.stream_key(job.type), self.events_key(job_id)]
        (state,) = self._cancel(keys=keys, args=[repr(time.time()), reason, self.group(job.type)])
        if state == "missing":
            raise errors.NotFound(f"job {job_id!r} not found")
        if state in ("SUCCEEDED", "FAILED"):
            raise errors.FailedPrecondition(f"job {job_id} already {state}; there is nothing to cancel")
        return self.get(job_id)

    def events(
        self, job_id: str, *, after: str = "", count: int = 100, block_seconds: float = 0
    ) -> list[JobEvent]:
        """Events after offset `after` ("" = from the first); optionally block until one arrives."""
        after = _check_offset(after)
        if not self.redis.exists(self.job_key(job_id)):
            raise errors.NotFound(f"job {job_id!r} not found")
        key = self.events_key(job_id)
        if block_seconds > 0:
            block_ms = int(min(block_seconds, MAX_BLOCK_SECONDS) * 1000)
            reply = self.redis.xread({key: after or "0-0"}, count=count, block=block_ms)
            entries = reply[0][1] if reply else []
        else:
            entries = self.redis.xrange(key, min=f"({after}" if after else "-", count=count)
        return [_event(job_id, eid, f) for eid, f in entries]

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
        pipe.xlen(self.stream_key(job_type))
        pipe.xpending(self.stream_key(job_type), self.group(job_type))
        pipe.xlen(self.dead_key(job_type))
        total, pending, dead = pipe.execute()
        running = int(pending["pending"])
        return {"waiting": max(int(total) - running, 0), "running": running, "dead": int(dead)}

    def dead_letters(self, job_type: str, count: int = 100) -> list[dict[str, str]]:
        """The newest dead-lettered entries (job, attempts, error, time)."""
        return [dict(f, id=eid) for eid, f in self.redis.xrevrange(self.dead_key(job_type), count=count)]


def _event(job_id: str, offset: str, f: dict[str, str]) -> JobEvent:
    return JobEvent(
        offset=offset,
        job_id=job_id,
        time=float(f.get("time") or 0),
        kind=f.get("kind", "log"),
        state=JobState(f.get("state", "PENDING")),
        data=json.loads(f.get("data") or "{}"),
        message=f.get("message", ""),
    )


def _check_offset(offset: str) -> str:
    if offset and not _OFFSET_RE.match(offset):
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


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------
class JobContext:
    """What a handler gets: the job, its attempt number, and fenced ways to report back."""

    def __init__(self, queue: JobQueue, job: Job, attempt: int, entry: str, consumer: str):
        self.queue = queue
        self.job = job
        self.attempt = attempt
        self._entry = entry
        self._consumer = consumer
        self._lost = False
        self._cancel = job.cancel_requested
        self._lock = threading.Lock()

    def _call(self, op: str, data: str = "", message: str = "") -> None:
        q, job = self.queue, self.job
        keys = [q.job_key(job.id), q.stream_key(job.type), q.events_key(job.id)]
        args = [
            self.attempt,
            self._entry,
            q.group(job.type),
            self._consumer,
            repr(time.time()),
            op,
            data,
            message,
        ]
        with self._lock:  # the heartbeat thread and the handler share this context
            alive, cancel = q._update(keys=keys, args=args)
        if not alive and not self._lost:
            log.warning("job %s attempt %d: lease lost to another worker", job.id, self.attempt)
        self._lost = self._lost or not alive
        self._cancel = self._cancel or cancel == "1"

    def progress(self, message: str = "", **data: Any) -> None:
        """Publish a progress event (job.progress = data); also renews the lease."""
        payload = json.dumps(data, sort_keys=True, default=str)
        self._call("progress", payload, message)
        self.job.progress = json.loads(payload)

    def log(self, message: str) -> None:
        self._call("log", "", message)

    def heartbeat(self) -> None:
        """Renew the lease. The worker does this in the background; long steps may call it too."""
        self._call("hb")

    @property
    def lease_lost(self) -> bool:
        return self._lost

    @property
    def cancelled(self) -> bool:
        """True once a cancel was requested or the lease was lost; check between steps."""
        if not (self._cancel or self._lost):
            state, attempts, cancel = self.queue.redis.hmget(
                self.queue.job_key(self.job.id), "state", "attempts", "cancel"
            )
            self._cancel = cancel == "1"
            self._lost = state != JobState.RUNNING.value or attempts != str(self.attempt)
        return self._cancel or self._lost

    def raise_if_cancelled(self) -> None:
        if self.cancelled:
            if self._lost:
                raise LeaseLost(f"job {self.job.id} attempt {self.attempt} lost its lease")
            reason = self.queue.redis.hget(self.queue.job_key(self.job.id), "cancel_reason") or "cancelled"
            raise JobCancelled(reason)

    def add_artifact(self, kind: str, name: str, version: str = "", uri: str = "") -> None:
        self.job.artifacts.append({"kind": kind, "name": name, "version": version, "uri": uri})
        self._call("artifacts", json.dumps(self.job.artifacts))


Handler = Callable[[JobContext], dict[str, Any] | None]


class JobWorker:
    """Takes jobs of one type (new ones, or abandoned ones after their lease) and runs `handler`.

    Outcomes: a returned dict -> SUCCEEDED with that result; `JobCancelled` -> CANCELLED; a
    non-retryable `TokenmillError` -> FAILED at once; anything else -> retried until max_attempts,
    then dead-lettered and FAILED. A lost lease drops the outcome (the new attempt owns the job).
    """

    def __init__(
        self,
        queue: JobQueue,
        job_type: str,
        handler: Handler,
        *,
        consumer: str | None = None,
        heartbeat_seconds: float = 5.0,
        on_finish: Callable[[Job, str], None] | None = None,
    ):
        self.queue = queue
        self.on_finish = on_finish  # (job, "SUCCEEDED"|"FAILED"|"CANCELLED"|"PENDING"|"fenced"), e.g. metrics
        self.job_type = job_type
        self.handler = handler
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        # heartbeat well inside the lease, whatever the caller asked for
        self.heartbeat_seconds = min(heartbeat_seconds, queue.lease_seconds / 3)
        self._lease_ms = int(queue.lease_seconds * 1000)
        self._reclaim_every = min(queue.lease_seconds / 4, 1.0)
        self._next_reclaim = 0.0
        self._reclaim_cursor = "0-0"
        self._current: JobContext | None = None
        self._stop = threading.Event()
        self._hb_stop = threading.Event()
        self._heartbeats: threading.Thread | None = None
        self._thread: threading.Thread | None = None
        self._stream = queue.stream_key(job_type)
        self._group = queue.group(job_type)
        queue.ensure_group(job_type)

    # -- taking work ----------------------------------------------------------------------
    def _reclaim(self) -> tuple[str, dict[str, str]] | None:
        """One abandoned entry (pending and idle for longer than the lease), if any."""
        self._next_reclaim = time.monotonic() + self._reclaim_every
        reply = self.queue._reclaim(
            keys=[self._stream], args=[self._group, self.consumer, self._lease_ms, self._reclaim_cursor, 1]
        )
        self._reclaim_cursor = reply[0]
        if len(reply) < 2:
            return None
        self._next_reclaim = 0.0  # there may be more: look again on the next call
        entry_id, flat = reply[1]
        return entry_id, _pairs(flat)

    def _read(self, block_seconds: float) -> tuple[str, dict[str, str]] | None:
        block = min(block_seconds, MAX_BLOCK_SECONDS, max(self._next_reclaim - time.monotonic(), 0.0))
        try:
            reply = self.queue.redis.xreadgroup(
                self._group, self.consumer, {self._stream: ">"}, count=1, block=int(block * 1000) or None
            )
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("consumer group %s vanished (Redis lost its data?); recreating it", self._group)
            self.queue.ensure_group(self.job_type, force=True)
            return None
        return reply[0][1][0] if reply and reply[0][1] else None

    def run_once(self, block_seconds: float = 1.0) -> bool:
        """Take at most one entry (abandoned ones first) and process it; False if there was none.

        An entry whose job was cancelled, finished or superseded is acknowledged and dropped;
        that counts as processed (True)."""
        reply = self._acquire(block_seconds)
        if reply is None:
            return False
        self._process(reply)
        return True

    def _acquire(self, block_seconds: float, *, known_empty: bool = False) -> list[Any] | None:
        """A `_START` reply for an abandoned entry, else a new one (blocking up to
        `block_seconds` when the stream is empty); None when there was nothing."""
        self._ensure_heartbeats()
        if time.monotonic() >= self._next_reclaim:
            entry = self._reclaim()
            if entry is not None:
                return self._start(entry[0], entry[1].get("job", ""))
        # take + start in one round trip when work is waiting
        reply = ["empty"] if known_empty else self._start()
        if reply[0] == "empty":
            entry = self._read(block_seconds)  # idle: block until an entry arrives
            if entry is None:
                return None
            reply = self._start(entry[0], entry[1].get("job", ""))
        return reply

    def _start_args(self, entry_id: str = "", job_id: str = "") -> list[Any]:
        q = self.queue
        return [q.ns, entry_id, self.consumer, self._group, repr(time.time()), uuid.uuid4().hex, job_id]

    def _start(self, entry_id: str = "", job_id: str = "") -> list[Any]:
        """Start an attempt on `entry_id` (or on the next new entry when ""): see `_START`."""
        q = self.queue
        return q._start(
            keys=[self._stream, q.dead_key(self.job_type)], args=self._start_args(entry_id, job_id)
        )

    # -- running a job --------------------------------------------------------------------
    def _process(self, reply: list[Any], *, take_next: bool = False) -> list[Any] | None:
        """Run the handler for a `_start` reply and record the outcome (fenced by the attempt).

        With `take_next`, recording the outcome also takes and starts the next new job in the
        same round trip, and its `_start` reply is returned: the caller must process it."""
        if reply[0] != "run":
            log.info("job %s entry %s: %s (%s)", reply[3], reply[2], reply[0], reply[1])
            return None
        q = self.queue
        job = Job.from_hash(_pairs(reply[2]))
        entry_id = reply[3]
        ctx = JobContext(q, job, int(reply[1]), entry_id, self.consumer)
        self._current = ctx
        try:
            outcome, result, error = self._run_handler(ctx)
        finally:
            self._current = None
        if outcome is None:
            return None
        keys = [q.job_key(job.id), self._stream, q.events_key(job.id), q.dead_key(self.job_type)]
        finish_args = [ctx.attempt, entry_id, self._group, repr(time.time()), outcome, result, error, job.id]
        following = None
        if take_next:
            final, following = q._finish_take(keys=keys, args=finish_args + self._start_args())
        else:
            final = q._finish(keys=keys, args=finish_args)
        if final[0] == "fenced":
            log.warning(
                "job %s attempt %d: outcome %s dropped; job is %s", job.id, ctx.attempt, outcome, final[1]
            )
        if self.on_finish is not None:
            self.on_finish(job, final[0])
        return following

    def _run_handler(self, ctx: JobContext) -> tuple[str | None, str, str]:
        """(outcome, result JSON, error); outcome None when the lease was lost."""
        try:
            result = self.handler(ctx)
            if result is None:
                result = {}
            if not isinstance(result, dict):
                raise errors.InvalidArgument(f"handler returned {type(result).__name__}, not a dict")
            try:
                return "SUCCEEDED", json.dumps(result, sort_keys=True, allow_nan=False), ""
            except (TypeError, ValueError) as exc:
                raise errors.InvalidArgument(f"handler result is not JSON-serialisable: {exc}") from None
        except LeaseLost:
            return None, "", ""
        except JobCancelled as exc:
            return "CANCELLED", "", str(exc) or "cancelled"
        except errors.TokenmillError as exc:
            if ctx.lease_lost:
                return None, "", ""
            log.warning("job %s attempt %d failed: %s: %s", ctx.job.id, ctx.attempt, exc.code, exc.message)
            return ("RETRY" if exc.retryable else "FAILED"), "", f"{exc.code}: {exc.message}"
        except Exception as exc:  # any other error is treated as transient: retry up to max_attempts
            if ctx.lease_lost:
                return None, "", ""
            log.exception("job %s attempt %d raised", ctx.job.id, ctx.attempt)
            return "RETRY", "", f"{type(exc).__name__}: {exc}"

    # -- heartbeats -----------------------------------------------------------------------
    def _ensure_heartbeats(self) -> None:
        if self._heartbeats is None or not self._heartbeats.is_alive():
            self._hb_stop.clear()
            self._heartbeats = threading.Thread(
                target=self._heartbeat_loop, name=f"job-heartbeat-{self.job_type}", daemon=True
            )
            self._heartbeats.start()

    def _heartbeat_loop(self) -> None:
        while True:
            stopping = self._hb_stop.wait(self.heartbeat_seconds)
            ctx = self._current
            if stopping and ctx is None:  # after stop(), beat on until the job in hand is done
                return
            if ctx is None or ctx.lease_lost:
                continue
            try:
                ctx.heartbeat()
            except redis.RedisError as exc:  # Redis briefly away: the next beat tries again
                log.warning("heartbeat for job %s failed: %s", ctx.job.id, exc)

    # -- loop -----------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> None:
        """Process jobs until `stop` (or `self.stop()`); survives Redis outages with backoff.

        While work is waiting, each job's outcome is recorded together with taking the next job
        (one round trip per job). A job taken that way is ours: it is run even if a stop arrives
        meanwhile. The chain breaks every reclaim period so abandoned jobs are not starved."""
        stop = stop or self._stop
        backoff = 0.1
        following: list[Any] | None = None
        known_empty = False  # the last take found nothing: block straight away
        while following is not None or not (stop.is_set() or self._stop.is_set()):
            try:
                reply = following or self._acquire(1.0, known_empty=known_empty)
                following, known_empty = None, False
                if reply is not None:
                    chain = (
                        not (stop.is_set() or self._stop.is_set()) and time.monotonic() < self._next_reclaim
                    )
                    following = self._process(reply, take_next=chain)
                    if following is not None and following[0] == "empty":
                        following, known_empty = None, True
                backoff = 0.1
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                following = None  # a job taken but not run is reclaimed after its lease
                log.warning(
                    "worker %s: Redis unavailable (%s); retrying in %.1fs", self.consumer, exc, backoff
                )
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def start_in_thread(self) -> threading.Thread:
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name=f"job-worker-{self.job_type}", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking work; waits for the job in hand to finish (handlers should check cancel)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._hb_stop.set()
        with contextlib.suppress(redis.RedisError):
            pending = self.queue.redis.xpending_range(self._stream, self._group, "-", "+", 1, self.consumer)
            if not pending:  # forget this consumer name unless it still holds work
                self.queue.redis.xgroup_delconsumer(self._stream, self._group, self.consumer)
