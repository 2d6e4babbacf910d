"""Worker side of the job system: take entries, run the handler, record the outcome.

Taking work: new entries come through the consumer group (XREADGROUP, inside the start script
when work is waiting); entries whose holder stopped heartbeating for a lease are taken over with
XAUTOCLAIM. Starting an attempt increments the job's attempt number, the fencing token every
later write of that attempt must name. Heartbeats (a background thread) renew the lease while
the handler runs. The outcome is recorded fenced, and in a busy loop together with taking the
next job in one round trip.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import redis

from tokenmill.common import errors
from tokenmill.common.jobs.context import JobContext
from tokenmill.common.jobs.model import Job, JobCancelled, LeaseLost
from tokenmill.common.jobs.queue import MAX_BLOCK_SECONDS, JobQueue
from tokenmill.common.jobs.scripts import (
    Dropped,
    Empty,
    FinishRequest,
    Outcome,
    Started,
    StartReply,
    StartRequest,
)
from tokenmill.common.redis_conn import InterruptibleReads

log = logging.getLogger(__name__)

Handler = Callable[[JobContext], dict[str, Any] | None]


class Entry(NamedTuple):
    """A stream entry and the job it names."""

    id: str
    job_id: str


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
        self._reads = InterruptibleReads(queue.redis)  # stop() ends an idle wait at once
        self._stream = queue.keys.stream(job_type)
        self._group = queue.keys.group(job_type)
        queue.ensure_group(job_type)

    # -- taking work ----------------------------------------------------------------------
    def _reclaim(self) -> Entry | None:
        """One abandoned entry (pending and idle for longer than the lease), if any."""
        self._next_reclaim = time.monotonic() + self._reclaim_every
        reply = self.queue.scripts.reclaim(
            job_type=self.job_type,
            consumer=self.consumer,
            min_idle_ms=self._lease_ms,
            cursor=self._reclaim_cursor,
            count=1,
        )
        self._reclaim_cursor = reply.cursor
        if not reply.entries:
            return None
        self._next_reclaim = 0.0  # there may be more: look again on the next call
        entry_id, fields = reply.entries[0]
        return Entry(entry_id, fields.get("job", ""))

    def _read(self, block_seconds: float) -> Entry | None:
        """The next new entry, blocking up to `block_seconds` (less when a reclaim is due)."""
        block = min(block_seconds, MAX_BLOCK_SECONDS, max(self._next_reclaim - time.monotonic(), 0.0))
        try:
            reply = self._reads.run(
                lambda r: r.xreadgroup(
                    self._group, self.consumer, {self._stream: ">"}, count=1, block=int(block * 1000) or None
                )
            )
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("consumer group %s vanished (Redis lost its data?); recreating it", self._group)
            self.queue.ensure_group(self.job_type, force=True)
            return None
        if not reply or not reply[0][1]:
            return None
        entry_id, fields = reply[0][1][0]
        return Entry(entry_id, fields.get("job", ""))

    def _start_request(self) -> StartRequest:
        return StartRequest(
            job_type=self.job_type, consumer=self.consumer, now=time.time(), claim_nonce=uuid.uuid4().hex
        )

    def _start(self, entry: Entry) -> Started | Dropped:
        """Start an attempt on an entry this worker has read or reclaimed."""
        return self.queue.scripts.start(self._start_request(), entry=entry.id, job_id=entry.job_id)

    def _take(self) -> StartReply:
        """Read the next new entry and start an attempt on it, in one round trip."""
        return self.queue.scripts.take(self._start_request())

    def _acquire(self, block_seconds: float, *, known_empty: bool = False) -> Started | Dropped | None:
        """An attempt on an abandoned entry, else on a new one (blocking up to `block_seconds`
        when the stream is empty); None when there was nothing."""
        self._ensure_heartbeats()
        if time.monotonic() >= self._next_reclaim:
            abandoned = self._reclaim()
            if abandoned is not None:
                return self._start(abandoned)
        reply = Empty() if known_empty else self._take()
        if isinstance(reply, Empty):
            entry = self._read(block_seconds)  # idle: block until an entry arrives
            return None if entry is None else self._start(entry)
        return reply

    def run_once(self, block_seconds: float = 1.0) -> bool:
        """Take at most one entry (abandoned ones first) and process it; False if there was none.

        An entry whose job was cancelled, finished or superseded is acknowledged and dropped;
        that counts as processed (True)."""
        reply = self._acquire(block_seconds)
        if reply is None:
            return False
        self._process(reply)
        return True

    # -- running a job --------------------------------------------------------------------
    def _process(self, reply: Started | Dropped, *, take_next: bool = False) -> StartReply | None:
        """Run the handler for a started attempt and record its outcome (fenced by the attempt).

        With `take_next`, recording the outcome also takes and starts the next new job in the
        same round trip, and that reply is returned: the caller must process it."""
        if isinstance(reply, Dropped):
            log.info("job %s entry %s: %s (%s)", reply.job_id, reply.entry, reply.kind, reply.detail)
            return None
        job = Job.from_hash(reply.record)
        ctx = JobContext(self.queue, job, reply.attempt, reply.entry, self.consumer)
        self._current = ctx
        try:
            outcome, result, error = self._run_handler(ctx)
        finally:
            self._current = None
        if outcome is None:
            return None
        request = FinishRequest(
            job_id=job.id,
            job_type=self.job_type,
            attempt=ctx.attempt,
            entry=reply.entry,
            now=time.time(),
            outcome=outcome,
            result=result,
            error=error,
        )
        following: StartReply | None = None
        if take_next:
            final, following = self.queue.scripts.finish_and_take(request, self._start_request())
        else:
            final = self.queue.scripts.finish(request)
        if final.fenced:
            log.warning(
                "job %s attempt %d: outcome %s dropped; job is %s", job.id, ctx.attempt, outcome, final.state
            )
        if self.on_finish is not None:
            self.on_finish(job, "fenced" if final.fenced else final.state)
        return following

    def _run_handler(self, ctx: JobContext) -> tuple[Outcome | None, str, str]:
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
        following: Started | Dropped | None = None
        known_empty = False  # the last take found nothing: block straight away
        while following is not None or not (stop.is_set() or self._stop.is_set()):
            try:
                reply = following or self._acquire(1.0, known_empty=known_empty)
                following, known_empty = None, False
                if reply is not None:
                    chain = (
                        not (stop.is_set() or self._stop.is_set()) and time.monotonic() < self._next_reclaim
                    )
                    taken = self._process(reply, take_next=chain)
                    if isinstance(taken, Empty):
                        known_empty = True
                    else:
                        following = taken
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
        self._reads.interrupt()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._reads.close()
        self._hb_stop.set()
        with contextlib.suppress(redis.RedisError):
            pending = self.queue.redis.xpending_range(self._stream, self._group, "-", "+", 1, self.consumer)
            if not pending:  # forget this consumer name unless it still holds work
                self.queue.redis.xgroup_delconsumer(self._stream, self._group, self.consumer)
