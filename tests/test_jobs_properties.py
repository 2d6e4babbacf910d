"""The job state machine, property-based: any order of submit / take / read / start / heartbeat /
progress / lease expiry / reclaim / cancel / finish (succeed, fail, cancel, retry) by several
workers against a real redis-server, checked step by step against a small Python model of the
protocol, plus invariants that hold whatever the model says:

* no job is lost: every submitted job is PENDING with its entry in the stream, RUNNING with its
  entry in the group's pending list, or terminal with its entry gone; the stream holds nothing else;
* none finishes twice: a terminal job has exactly one terminal event, its last state event, and at
  most one worker is told it finished it;
* a stale (fenced) attempt cannot write: its heartbeats, progress and outcome are refused;
* terminal records never change;
* at the end every job can still be driven to a terminal state by a fresh worker.

Lease expiry is injected, not waited for: the queue's lease is long (nothing expires by itself)
and the `expire_lease` rule ages an entry in the pending list past it (XCLAIM ... IDLE), as if its
worker had stalled.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tokenmill.common import errors
from tokenmill.common.jobs import JobCancelled, JobContext, JobQueue, JobWorker
from tokenmill.common.jobs.scripts import Dropped, Empty, Started
from tokenmill.common.jobs.worker import Entry

JOB_TYPE = "train"
LEASE_SECONDS = 60.0  # never expires by itself during a run; `expire_lease` ages entries instead
WORKERS = 3
MAX_JOBS = 5
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
OUTCOMES = ("SUCCEEDED", "FAILED", "CANCELLED", "RETRY")


def entry_order(entry: str) -> tuple[int, int]:
    ms, seq = entry.split("-")
    return int(ms), int(seq)


@dataclass
class ModelJob:
    """What the protocol says a job's record and stream entry must be."""

    id: str
    max_attempts: int
    entry: str
    state: str = "PENDING"
    attempts: int = 0
    cancel: bool = False
    delivered: bool = False  # its entry was read by a consumer (it is in the pending list)
    stalled: bool = False  # its entry has been idle for longer than the lease
    result: dict[str, Any] | None = None
    finished_by: list[str] = field(default_factory=list)  # workers whose outcome call said it ended


@dataclass
class SimWorker:
    worker: JobWorker
    read: list[Entry] = field(default_factory=list)  # read with XREADGROUP, not started yet
    held: dict[tuple[str, int], Started] = field(default_factory=dict)  # (job id, attempt) -> start
    contexts: dict[tuple[str, int], JobContext] = field(default_factory=dict)


class JobProtocol(RuleBasedStateMachine):
    def __init__(self, client: redis.Redis):
        super().__init__()
        client.flushdb()
        self.redis = client
        self.queue = JobQueue(client, lease_seconds=LEASE_SECONDS, max_attempts=3)
        self.keys = self.queue.keys
        self.jobs: dict[str, ModelJob] = {}
        self.dead_letters = 0
        self.terminal_records: dict[str, dict[str, str]] = {}
        self.next_outcome = "SUCCEEDED"
        self.reported: list[tuple[str, str]] = []  # on_finish calls of the worker being driven
        self.workers = [
            SimWorker(
                JobWorker(
                    self.queue,
                    JOB_TYPE,
                    self._handler,
                    consumer=f"w{i}",
                    on_finish=lambda job, final: self.reported.append((job.id, final)),
                )
            )
            for i in range(WORKERS)
        ]

    def _handler(self, ctx: JobContext) -> dict[str, Any]:
        if self.next_outcome == "FAILED":
            raise errors.InvalidArgument("bad spec")  # not retryable: FAILED at once
        if self.next_outcome == "CANCELLED":
            raise JobCancelled("stopped by the handler")
        if self.next_outcome == "RETRY":
            raise RuntimeError("flaky")  # transient: retried until max_attempts
        return {"by": ctx.consumer, "attempt": ctx.attempt}

    # -- the model ------------------------------------------------------------------------------
    def _undelivered(self) -> list[ModelJob]:
        live = [j for j in self.jobs.values() if j.state not in TERMINAL and not j.delivered]
        return sorted(live, key=lambda j: entry_order(j.entry))

    def _expect_start(self, job: ModelJob, entry: str, reply: Started | Dropped, w: int) -> None:
        """Apply the start of an attempt on `entry` to the model and check the reply against it."""
        if job.entry != entry or job.state in TERMINAL:
            assert isinstance(reply, Dropped) and reply.kind == "skip", reply
            return
        if job.attempts >= job.max_attempts:
            assert isinstance(reply, Dropped) and reply.kind == "dead", reply
            job.state = "FAILED"
            self.dead_letters += 1
            return
        job.attempts += 1
        job.state = "RUNNING"
        assert isinstance(reply, Started) and reply.attempt == job.attempts, (reply, job)
        sim = self.workers[w]
        assert reply.record["worker"] == sim.worker.consumer
        key = (job.id, reply.attempt)
        sim.held[key] = reply
        sim.contexts[key] = JobContext(
            self.queue, self.queue.get(job.id), reply.attempt, reply.entry, sim.worker.consumer
        )

    def _current(self, job_id: str, attempt: int) -> bool:
        job = self.jobs[job_id]
        return job.state == "RUNNING" and job.attempts == attempt

    def _requeued(self, job: ModelJob) -> None:
        job.state, job.delivered, job.stalled = "PENDING", False, False
        job.entry = self.redis.hget(self.keys.job(job.id), "entry")

    def _expect_finish(self, job: ModelJob, attempt: int, outcome: str, consumer: str) -> str:
        """The model's answer to a finish by `attempt`: "fenced" or the job's state after it."""
        if job.attempts != attempt:
            return "fenced"
        if job.state in TERMINAL:
            return job.state
        if job.state != "RUNNING":
            return "fenced"
        if outcome == "RETRY":
            if job.attempts < job.max_attempts:
                return "PENDING"
            self.dead_letters += 1
            outcome = "FAILED"
        job.state = outcome
        if outcome == "SUCCEEDED":
            job.result = {"by": consumer, "attempt": attempt}
        return outcome

    def _workers_holding(self) -> list[tuple[int, tuple[str, int]]]:
        return [(i, key) for i, sim in enumerate(self.workers) for key in sim.held]

    # -- rules ----------------------------------------------------------------------------------
    @precondition(lambda self: len(self.jobs) < MAX_JOBS)
    @rule(max_attempts=st.integers(1, 3))
    def submit(self, max_attempts: int) -> None:
        job = self.queue.submit(JOB_TYPE, {"n": len(self.jobs)}, max_attempts=max_attempts)
        self.jobs[job.id] = ModelJob(job.id, max_attempts, self.redis.hget(self.keys.job(job.id), "entry"))

    @rule(w=st.integers(0, WORKERS - 1))
    def take(self, w: int) -> None:
        """XREADGROUP and start in one round trip: the oldest new entry, or nothing."""
        waiting = self._undelivered()
        reply = self.workers[w].worker._take()
        if not waiting:
            assert isinstance(reply, Empty), reply
            return
        job = waiting[0]
        assert not isinstance(reply, Empty) and reply.entry == job.entry, (reply, job)
        job.delivered, job.stalled = True, False
        self._expect_start(job, job.entry, reply, w)

    @rule(w=st.integers(0, WORKERS - 1))
    def read(self, w: int) -> None:
        """XREADGROUP only; the start comes later (a worker paused in between)."""
        waiting = self._undelivered()
        entry = self.workers[w].worker._read(0)
        if not waiting:
            assert entry is None
            return
        assert entry == Entry(waiting[0].entry, waiting[0].id), (entry, waiting[0])
        waiting[0].delivered, waiting[0].stalled = True, False
        self.workers[w].read.append(entry)

    @precondition(lambda self: any(sim.read for sim in self.workers))
    @rule(data=st.data())
    def start_read(self, data: st.DataObject) -> None:
        w = data.draw(st.sampled_from([i for i, sim in enumerate(self.workers) if sim.read]))
        entry = self.workers[w].read.pop(data.draw(st.integers(0, len(self.workers[w].read) - 1)))
        reply = self.workers[w].worker._start(entry)
        self._expect_start(self.jobs[entry.job_id], entry.id, reply, w)

    @precondition(lambda self: any(j.delivered and j.state not in TERMINAL for j in self.jobs.values()))
    @rule(data=st.data())
    def expire_lease(self, data: st.DataObject) -> None:
        """The entry's holder stalls past the lease: age its entry in the pending list."""
        candidates = [
            j.id for j in self.jobs.values() if j.delivered and j.state not in TERMINAL
        ]  # in submit order
        job = self.jobs[data.draw(st.sampled_from(candidates))]
        stream, group = self.keys.stream(JOB_TYPE), self.keys.group(JOB_TYPE)
        (pending,) = self.redis.xpending_range(stream, group, job.entry, job.entry, 1)
        idle_ms = int(LEASE_SECONDS * 2000)
        self.redis.xclaim(stream, group, pending["consumer"], 0, [job.entry], idle=idle_ms, justid=True)
        job.stalled = True

    @rule(w=st.integers(0, WORKERS - 1))
    def reclaim(self, w: int) -> None:
        """XAUTOCLAIM: the first entry idle past the lease from the worker's cursor on, then start it."""
        worker = self.workers[w].worker
        cursor = entry_order(worker._reclaim_cursor)
        stalled = sorted(
            (j for j in self.jobs.values() if j.stalled and j.state not in TERMINAL and j.delivered),
            key=lambda j: entry_order(j.entry),
        )
        expected = next((j for j in stalled if entry_order(j.entry) >= cursor), None)
        entry = worker._reclaim()
        if expected is None:
            assert entry is None, entry
            return
        assert entry == Entry(expected.entry, expected.id), (entry, expected)
        expected.stalled = False
        self._expect_start(expected, entry.id, worker._start(entry), w)

    @precondition(lambda self: any(sim.held for sim in self.workers))
    @rule(data=st.data(), beat=st.booleans())
    def heartbeat_or_progress(self, data: st.DataObject, beat: bool) -> None:
        w, key = data.draw(st.sampled_from(self._workers_holding()))
        ctx = self.workers[w].contexts[key]
        job = self.jobs[key[0]]
        before = self.redis.hget(self.keys.job(job.id), "progress")
        alive = self._current(*key)
        if beat:
            ctx.heartbeat()
        else:
            ctx.progress("step", step=data.draw(st.integers(0, 9)), by=f"w{w}")
        assert ctx.lease_lost is not alive, (key, job)
        if alive:
            job.stalled = False
        else:
            assert self.redis.hget(self.keys.job(job.id), "progress") == before  # fenced: no write

    @precondition(lambda self: any(sim.held for sim in self.workers))
    @rule(data=st.data(), outcome=st.sampled_from(OUTCOMES), and_take=st.booleans())
    def finish(self, data: st.DataObject, outcome: str, and_take: bool) -> None:
        """The worker runs its handler for one attempt it holds and records the outcome."""
        w, key = data.draw(st.sampled_from(self._workers_holding()))
        sim = self.workers[w]
        started = sim.held.pop(key)
        del sim.contexts[key]
        job = self.jobs[key[0]]
        expected = self._expect_finish(job, key[1], outcome, f"w{w}")
        self.next_outcome, self.reported = outcome, []
        following = sim.worker._process(started, take_next=and_take)
        assert self.reported == [(job.id, expected)], (self.reported, expected, job)
        if expected in TERMINAL:
            job.finished_by.append(f"w{w}")
        if expected == "PENDING":
            self._requeued(job)
        if not and_take:
            assert following is None
            return
        waiting = self._undelivered()  # with and_take, the oldest of these was taken after the finish
        if not waiting:
            assert isinstance(following, Empty), following
            return
        assert (
            not isinstance(following, Empty) and following is not None and following.entry == waiting[0].entry
        )
        waiting[0].delivered, waiting[0].stalled = True, False
        self._expect_start(waiting[0], waiting[0].entry, following, w)

    @precondition(lambda self: bool(self.jobs))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        job = self.jobs[data.draw(st.sampled_from(list(self.jobs)))]
        if job.state in ("SUCCEEDED", "FAILED"):
            try:
                self.queue.cancel(job.id)
            except errors.FailedPrecondition:
                return
            raise AssertionError(f"cancel of a {job.state} job did not fail")
        after = self.queue.cancel(job.id, "changed my mind")
        if job.state != "CANCELLED":  # PENDING ends at once; RUNNING is flagged for its worker
            job.state = "CANCELLED" if job.state == "PENDING" else job.state
            job.cancel = True
        assert after.state.value == job.state and after.cancel_requested == job.cancel

    # -- invariants -----------------------------------------------------------------------------
    @invariant()
    def records_match_the_model(self) -> None:
        for job in self.jobs.values():
            h = self.redis.hgetall(self.keys.job(job.id))
            assert h["state"] == job.state and int(h["attempts"]) == job.attempts, (h, job)
            assert job.attempts <= job.max_attempts
            assert (h.get("cancel") == "1") == job.cancel
            if job.state == "SUCCEEDED":
                assert job.result is not None and h["result"] and json.loads(h["result"]) == job.result

    @invariant()
    def no_job_is_lost(self) -> None:
        stream, group = self.keys.stream(JOB_TYPE), self.keys.group(JOB_TYPE)
        in_stream = {entry for entry, _ in self.redis.xrange(stream)}
        pending = {p["message_id"] for p in self.redis.xpending_range(stream, group, "-", "+", 100)}
        live = {j.entry for j in self.jobs.values() if j.state not in TERMINAL}
        assert in_stream == live, (in_stream, live)  # every live job has its entry, nothing else is there
        assert pending == {j.entry for j in self.jobs.values() if j.state not in TERMINAL and j.delivered}
        for job in self.jobs.values():
            if job.state == "RUNNING":
                assert job.entry in pending
        assert self.redis.xlen(self.keys.dead(JOB_TYPE)) == self.dead_letters

    @invariant()
    def finished_once_and_for_good(self) -> None:
        for job in self.jobs.values():
            events = self.queue.events(job.id, count=10_000)
            state_events = [e.state.value for e in events if e.kind == "state"]
            terminal = [s for s in state_events if s in TERMINAL]
            assert len(terminal) == (1 if job.state in TERMINAL else 0), (state_events, job)
            assert state_events[-1] == job.state, (state_events, job)
            assert len(job.finished_by) <= 1, job
            if job.state in TERMINAL:
                record = self.redis.hgetall(self.keys.job(job.id))
                assert self.terminal_records.setdefault(job.id, record) == record, job

    def teardown(self) -> None:
        """Liveness: a fresh worker, once every lease has expired, drives every job to an end."""
        if not self.jobs:
            return
        stream, group = self.keys.stream(JOB_TYPE), self.keys.group(JOB_TYPE)
        for pending in self.redis.xpending_range(stream, group, "-", "+", 100):
            self.redis.xclaim(
                stream, group, pending["consumer"], 0, [pending["message_id"]], idle=10**8, justid=True
            )
        rescuer = JobWorker(
            JobQueue(self.redis, lease_seconds=0.5), JOB_TYPE, lambda ctx: {}, consumer="rescuer"
        )
        try:
            for _ in itertools.repeat(None, 20 * MAX_JOBS):
                if all(self.queue.get(job_id).state.terminal for job_id in self.jobs):
                    break
                if not rescuer.run_once(block_seconds=0):
                    time.sleep(0.01)
        finally:
            rescuer.stop()
        assert all(self.queue.get(job_id).state.terminal for job_id in self.jobs)
        assert self.redis.xlen(stream) == 0 and not self.redis.xpending_range(stream, group, "-", "+", 1)


def test_job_state_machine(redis_client: redis.Redis) -> None:
    """~7 s under the default ("ci") profile: 100 runs of up to 50 steps."""
    run_state_machine_as_test(lambda: JobProtocol(redis_client), settings=settings(stateful_step_count=50))
