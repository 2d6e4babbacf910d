"""The job system against a real redis-server (in-process workers; crash tests: test_jobs_processes.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from tokenmill.common import errors
from tokenmill.common.jobs import Job, JobContext, JobEvent, JobQueue, JobState, JobWorker
from tokenmill.common.jobs.scripts import Finished, FinishRequest, Started

STATE_RANK = {"PENDING": 0, "RUNNING": 1, "SUCCEEDED": 2, "FAILED": 2, "CANCELLED": 2}


def drain(worker: JobWorker, queue: JobQueue, job_id: str, timeout: float = 10.0) -> Job:
    """Run the worker until the job is terminal."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker.run_once(block_seconds=0.1)
        job = queue.get(job_id)
        if job.state.terminal:
            return job
    raise AssertionError(f"job {job_id} not terminal after {timeout}s: {queue.get(job_id)}")


def states(events: list[JobEvent]) -> list[str]:
    return [e.state.value for e in events if e.kind == "state"]


def assert_monotonic(events: list[JobEvent]) -> None:
    """Never leave a terminal state; only a re-queue (RUNNING -> PENDING) goes backwards."""
    seen = states(events)
    assert sum(1 for s in seen if STATE_RANK[s] == 2) == 1 and STATE_RANK[seen[-1]] == 2, seen
    for prev, cur in zip(seen, seen[1:], strict=False):
        assert STATE_RANK[cur] >= STATE_RANK[prev] or (prev, cur) == ("RUNNING", "PENDING"), seen


def run_in_thread(fn: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


# -- submit / get -------------------------------------------------------------------------------
def test_submit_creates_pending_job_with_event(job_queue: JobQueue) -> None:
    job = job_queue.submit("train", {"steps": 3})
    assert job.state is JobState.PENDING and job.spec == {"steps": 3}
    assert job.attempts == 0 and job.max_attempts == 3 and job.created_at > 0
    assert job_queue.get(job.id) == job
    assert states(job_queue.events(job.id)) == ["PENDING"]
    assert job_queue.depth("train") == {"waiting": 1, "running": 0, "dead": 0}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"job_type": "Bad Type", "spec": {}}, "job type"),
        ({"job_type": "", "spec": {}}, "job type"),
        ({"job_type": "train", "spec": [1]}, "JSON object"),
        ({"job_type": "train", "spec": {"x": object()}}, "not JSON"),
        ({"job_type": "train", "spec": {"x": float("nan")}}, "not JSON"),
        ({"job_type": "train", "spec": {}, "max_attempts": 0}, "max_attempts"),
        ({"job_type": "train", "spec": {}, "idempotency_key": "k" * 257}, "idempotency_key"),
    ],
)
def test_submit_rejects_bad_input(job_queue: JobQueue, kwargs: dict, match: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=match):
        job_queue.submit(**kwargs)


def test_get_unknown_and_empty_ids(job_queue: JobQueue) -> None:
    with pytest.raises(errors.NotFound, match="not found"):
        job_queue.get("nope")
    with pytest.raises(errors.InvalidArgument):
        job_queue.get("")


def test_idempotency_key_returns_the_same_job(job_queue: JobQueue) -> None:
    a = job_queue.submit("ingest", {"src": "x"}, idempotency_key="req-1")
    b = job_queue.submit("ingest", {"src": "x"}, idempotency_key="req-1")
    c = job_queue.submit("ingest", {"src": "x"}, idempotency_key="req-2")
    d = job_queue.submit("train", {"src": "x"}, idempotency_key="req-1")  # keys are per job type
    assert a.id == b.id and len({a.id, c.id, d.id}) == 3
    assert job_queue.depth("ingest")["waiting"] == 2
    with pytest.raises(errors.AlreadyExists, match="different spec"):
        job_queue.submit("ingest", {"src": "other"}, idempotency_key="req-1")


# -- running --------------------------------------------------------------------------------------
def test_worker_runs_job_to_success(job_queue: JobQueue) -> None:
    def handler(ctx: JobContext) -> dict:
        ctx.progress("half way", step=1, of=2)
        ctx.log("hello")
        ctx.add_artifact("checkpoint", "demo", "1", "file:///x")
        return {"loss": 1.5}

    job = job_queue.submit("train", {})
    worker = JobWorker(job_queue, "train", handler)
    assert worker.run_once(block_seconds=0.1) is True
    done = job_queue.get(job.id)
    assert done.state is JobState.SUCCEEDED and done.result == {"loss": 1.5}
    assert done.attempts == 1 and done.worker == worker.consumer
    assert done.progress == {"step": 1, "of": 2}
    assert done.artifacts == [{"kind": "checkpoint", "name": "demo", "version": "1", "uri": "file:///x"}]
    assert done.started_at and done.finished_at and done.finished_at >= done.started_at
    events = job_queue.events(job.id)
    assert [e.kind for e in events] == ["state", "state", "progress", "log", "state"]
    assert events[-1].data == {"loss": 1.5} and events[-1].terminal
    assert job_queue.depth("train") == {"waiting": 0, "running": 0, "dead": 0}
    assert job_queue.redis.xlen(job_queue.keys.stream("train")) == 0  # finished entries are deleted
    assert worker.run_once(block_seconds=0.05) is False


def test_non_retryable_error_fails_at_once(job_queue: JobQueue) -> None:
    calls = []

    def handler(ctx: JobContext) -> dict:
        calls.append(ctx.attempt)
        raise errors.InvalidArgument("dataset 'x' has no train split")

    job = job_queue.submit("train", {})
    done = drain(JobWorker(job_queue, "train", handler), job_queue, job.id)
    assert done.state is JobState.FAILED and calls == [1]
    assert done.error == "INVALID_ARGUMENT: dataset 'x' has no train split"
    assert job_queue.depth("train")["dead"] == 0


def test_handler_returning_non_dict_fails(job_queue: JobQueue) -> None:
    job = job_queue.submit("train", {})
    done = drain(JobWorker(job_queue, "train", lambda ctx: [1, 2]), job_queue, job.id)
    assert done.state is JobState.FAILED and "not a dict" in done.error


def test_poison_job_is_dead_lettered_after_max_attempts(job_queue: JobQueue) -> None:
    attempts = []

    def handler(ctx: JobContext) -> dict:
        attempts.append(ctx.attempt)
        raise RuntimeError("corrupt shard 7")

    job = job_queue.submit("ingest", {}, max_attempts=3)
    done = drain(JobWorker(job_queue, "ingest", handler), job_queue, job.id)
    assert attempts == [1, 2, 3]
    assert done.state is JobState.FAILED and done.attempts == 3
    assert done.error == "failed after 3 attempt(s): RuntimeError: corrupt shard 7"
    dead = job_queue.dead_letters("ingest")
    assert len(dead) == 1 and dead[0]["job"] == job.id and dead[0]["attempts"] == "3"
    assert "corrupt shard 7" in dead[0]["error"]
    events = job_queue.events(job.id)
    assert states(events) == ["PENDING", "RUNNING", "PENDING", "RUNNING", "PENDING", "RUNNING", "FAILED"]
    assert_monotonic(events)
    assert job_queue.depth("ingest") == {"waiting": 0, "running": 0, "dead": 1}


def test_retry_then_success(job_queue: JobQueue) -> None:
    def handler(ctx: JobContext) -> dict:
        if ctx.attempt == 1:
            raise errors.Unavailable("checkpoint store busy")  # retryable TokenmillError
        return {"attempt": ctx.attempt}

    job = job_queue.submit("train", {})
    done = drain(JobWorker(job_queue, "train", handler), job_queue, job.id)
    assert done.state is JobState.SUCCEEDED and done.result == {"attempt": 2}
    assert done.error == ""  # error is for FAILED/CANCELLED jobs; the retry is in the events
    requeued = [e for e in job_queue.events(job.id) if e.kind == "state" and e.state is JobState.PENDING][1]
    assert requeued.message == "attempt 1 failed, retrying: UNAVAILABLE: checkpoint store busy"


def test_heartbeats_keep_a_long_job_from_being_reclaimed(redis_client) -> None:
    """The job runs 2 leases; a second worker polling meanwhile must not take it over. (A 1.5 s
    lease, heartbeats every 0.5 s: only a stall of a whole second on this machine could break it.)"""
    queue = JobQueue(redis_client, lease_seconds=1.5)
    job = queue.submit("train", {})
    first = JobWorker(queue, "train", lambda ctx: time.sleep(2 * queue.lease_seconds) or {"ok": 1})
    other_ran = []
    second = JobWorker(queue, "train", lambda ctx: other_ran.append(1) or {})
    thread = run_in_thread(lambda: first.run_once(block_seconds=1))
    while queue.get(job.id).state is JobState.PENDING:
        time.sleep(0.01)
    deadline = time.monotonic() + 2 * queue.lease_seconds + 2
    while thread.is_alive() and time.monotonic() < deadline:
        second.run_once(block_seconds=0.1)
    thread.join(5)
    done = queue.get(job.id)
    assert done.state is JobState.SUCCEEDED and done.attempts == 1 and not other_ran


def test_run_loop_chains_jobs_and_stops_cleanly(job_queue: JobQueue) -> None:
    """run() records each outcome and takes the next job in one round trip; after stop() no job
    it took is left RUNNING."""
    finished: list[tuple[str, str]] = []
    ids = [job_queue.submit("ingest", {"i": i}).id for i in range(30)]
    worker = JobWorker(
        job_queue,
        "ingest",
        lambda ctx: time.sleep(0.01) or {"i": ctx.job.spec["i"]},
        on_finish=lambda job, outcome: finished.append((job.id, outcome)),
    )
    worker.start_in_thread()
    while len(finished) < 10:
        time.sleep(0.01)
    worker.stop(5)
    jobs = [job_queue.get(i) for i in ids]
    assert {j.state for j in jobs} <= {JobState.SUCCEEDED, JobState.PENDING}
    done = [j for j in jobs if j.state is JobState.SUCCEEDED]
    assert sorted(finished) == sorted((j.id, "SUCCEEDED") for j in done)
    assert all(j.result == {"i": j.spec["i"]} and j.attempts == 1 for j in done)
    worker = JobWorker(job_queue, "ingest", lambda ctx: {"i": ctx.job.spec["i"]}, on_finish=lambda j, o: None)
    worker.start_in_thread()
    try:
        assert all(job_queue.wait(i, timeout=10).state is JobState.SUCCEEDED for i in ids)
    finally:
        worker.stop(5)
    assert job_queue.depth("ingest") == {"waiting": 0, "running": 0, "dead": 0}


# -- cancel ---------------------------------------------------------------------------------------
def test_cancel_pending_job_is_immediate(job_queue: JobQueue) -> None:
    job = job_queue.submit("train", {})
    cancelled = job_queue.cancel(job.id, "wrong dataset")
    assert cancelled.state is JobState.CANCELLED and cancelled.error == "wrong dataset"
    assert job_queue.depth("train") == {"waiting": 0, "running": 0, "dead": 0}
    ran = []
    assert JobWorker(job_queue, "train", lambda ctx: ran.append(1) or {}).run_once(0.05) is False
    assert not ran
    assert job_queue.cancel(job.id).state is JobState.CANCELLED  # idempotent
    assert states(job_queue.events(job.id)) == ["PENDING", "CANCELLED"]


def test_cancel_pending_entry_already_read_by_a_worker(job_queue: JobQueue) -> None:
    """Cancelled between XREADGROUP and the start: the worker must drop it, not run it."""
    job = job_queue.submit("train", {})
    ran = []
    worker = JobWorker(job_queue, "train", lambda ctx: ran.append(1) or {})
    entry = worker._read(0.1)
    assert entry is not None and entry.job_id == job.id
    job_queue.cancel(job.id)
    worker._process(worker._start(entry))
    assert not ran and job_queue.get(job.id).state is JobState.CANCELLED
    assert job_queue.depth("train") == {"waiting": 0, "running": 0, "dead": 0}


def test_cancel_running_job_is_cooperative(job_queue: JobQueue) -> None:
    started = threading.Event()
    steps = []

    def handler(ctx: JobContext) -> dict:
        started.set()
        for step in range(1000):
            ctx.raise_if_cancelled()
            steps.append(step)
            time.sleep(0.01)
        return {"finished": True}

    job = job_queue.submit("train", {})
    worker = JobWorker(job_queue, "train", handler)
    thread = run_in_thread(lambda: worker.run_once(block_seconds=1))
    assert started.wait(5)
    flagged = job_queue.cancel(job.id, "user pressed ctrl-c")
    assert flagged.state is JobState.RUNNING and flagged.cancel_requested
    thread.join(5)
    done = job_queue.get(job.id)
    assert done.state is JobState.CANCELLED and done.error == "user pressed ctrl-c"
    assert 0 < len(steps) < 1000
    assert_monotonic(job_queue.events(job.id))


def test_cancel_finished_or_unknown_job(job_queue: JobQueue) -> None:
    job = job_queue.submit("train", {})
    drain(JobWorker(job_queue, "train", lambda ctx: {}), job_queue, job.id)
    with pytest.raises(errors.FailedPrecondition, match="already SUCCEEDED"):
        job_queue.cancel(job.id)
    with pytest.raises(errors.NotFound):
        job_queue.cancel("missing")


# -- list ------------------------------------------------------------------------------------------
def test_list_pages_newest_first_without_gaps(job_queue: JobQueue) -> None:
    ids = [job_queue.submit("compress", {"i": i}).id for i in range(7)]
    job_queue.submit("train", {})  # another type is not listed
    seen, token, pages = [], "", 0
    while True:
        jobs, token = job_queue.list("compress", page_size=3, page_token=token)
        seen += [j.id for j in jobs]
        pages += 1
        if not token:
            break
    assert seen == ids[::-1] and pages == 3


def test_list_filters_by_state(job_queue: JobQueue) -> None:
    ids = [job_queue.submit("train", {"i": i}).id for i in range(5)]
    for job_id in ids[:3]:
        job_queue.cancel(job_id)
    cancelled, token = job_queue.list("train", state=JobState.CANCELLED, page_size=2)
    more, token2 = job_queue.list("train", state=JobState.CANCELLED, page_size=2, page_token=token)
    assert [j.id for j in cancelled + more] == ids[:3][::-1] and token and not token2
    pending, _ = job_queue.list("train", state=JobState.PENDING)
    assert {j.id for j in pending} == set(ids[3:])
    assert job_queue.list("train", state=JobState.FAILED) == ([], "")


@pytest.mark.parametrize("token", ["%%%", "bm90IGpzb24", "WzEsMl0"])  # not base64, not JSON, wrong shape
def test_list_rejects_malformed_page_token(job_queue: JobQueue, token: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="page_token"):
        job_queue.list("train", page_token=token)


# -- events / watch -------------------------------------------------------------------------------
def test_watch_resumes_from_an_offset(job_queue: JobQueue) -> None:
    def handler(ctx: JobContext) -> dict:
        for i in range(3):
            ctx.progress(f"step {i}", step=i)
        return {"done": True}

    job = job_queue.submit("train", {})
    drain(JobWorker(job_queue, "train", handler), job_queue, job.id)
    everything = list(job_queue.watch(job.id))
    assert [e.kind for e in everything] == ["state", "state", "progress", "progress", "progress", "state"]
    resumed = list(job_queue.watch(job.id, after=everything[2].offset))
    assert resumed == everything[3:]
    assert list(job_queue.watch(job.id, after=everything[-1].offset)) == []  # ended: returns at once


def test_watch_follows_a_running_job_until_terminal(job_queue: JobQueue) -> None:
    release = threading.Event()

    def handler(ctx: JobContext) -> dict:
        ctx.progress("waiting")
        release.wait(5)
        return {"ok": True}

    job = job_queue.submit("train", {})
    worker = JobWorker(job_queue, "train", handler)
    worker.start_in_thread()
    try:
        seen: list[JobEvent] = []
        for event in job_queue.watch(job.id, follow=True):
            seen.append(event)
            if event.kind == "progress":
                release.set()
        assert states(seen) == ["PENDING", "RUNNING", "SUCCEEDED"] and seen[-1].terminal
    finally:
        worker.stop(5)


def test_watch_without_follow_and_with_inactive_client(job_queue: JobQueue) -> None:
    job = job_queue.submit("train", {})
    assert states(list(job_queue.watch(job.id, follow=False))) == ["PENDING"]
    t0 = time.monotonic()
    calls = iter([True, False])
    assert len(list(job_queue.watch(job.id, follow=True, is_active=lambda: next(calls)))) == 1
    assert time.monotonic() - t0 < 3  # stopped after one poll instead of waiting for the job


def test_events_bad_input(job_queue: JobQueue) -> None:
    job = job_queue.submit("train", {})
    with pytest.raises(errors.InvalidArgument, match="offset"):
        job_queue.events(job.id, after="yesterday")
    with pytest.raises(errors.InvalidArgument, match="offset"):
        list(job_queue.watch(job.id, after="12"))
    with pytest.raises(errors.NotFound):
        job_queue.events("missing")


def test_wait_returns_terminal_job(job_queue: JobQueue) -> None:
    job = job_queue.submit("train", {})
    worker = JobWorker(job_queue, "train", lambda ctx: {"x": 1})
    worker.start_in_thread()
    try:
        assert job_queue.wait(job.id, timeout=10).result == {"x": 1}
    finally:
        worker.stop(5)


# -- fencing ----------------------------------------------------------------------------------------
def test_stale_attempt_cannot_overwrite_the_outcome(job_queue: JobQueue) -> None:
    """A context from an attempt whose lease was taken is fenced off: no progress, no result."""
    job = job_queue.submit("train", {})
    first = JobWorker(job_queue, "train", lambda ctx: {}, consumer="stale")
    q = job_queue
    start = first._take()  # attempt 1 starts, then its worker stalls: no heartbeat, no result
    assert isinstance(start, Started) and start.attempt == 1
    stale = JobContext(q, q.get(job.id), 1, start.entry, "stale")
    time.sleep(q.lease_seconds + 0.2)  # no heartbeat: the lease expires
    second = JobWorker(q, "train", lambda ctx: {"by": "second"})
    assert second.run_once(0.1)
    assert q.get(job.id).result == {"by": "second"} and q.get(job.id).attempts == 2
    stale.progress("late", step=99)
    assert stale.lease_lost and stale.cancelled
    finish = FinishRequest(
        job_id=job.id,
        job_type="train",
        attempt=1,
        entry=start.entry,
        now=time.time(),
        outcome="SUCCEEDED",
        result='{"by": "stale"}',
    )
    assert q.scripts.finish(finish) == Finished(state="SUCCEEDED", fenced=True)
    done = q.get(job.id)
    assert done.result == {"by": "second"} and done.progress == {}
    events = q.events(job.id)
    assert_monotonic(events)
    assert not [e for e in events if e.kind == "progress"]


def test_job_state_values_match_proto_names() -> None:
    from tokenmill.v1 import common_pb2

    for state in JobState:
        assert common_pb2.JobState.Value(f"JOB_STATE_{state.value}") > 0
