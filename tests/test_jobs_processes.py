"""Crash, stall and Redis-restart behaviour of the job system with real worker processes.

Worker processes run `_worker_main` (below) through `python -c`, with their own Redis client.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.redis import TEST_LEASE_SECONDS
from tests.test_jobs import assert_monotonic, states
from tokenmill.common.jobs import Job, JobQueue, JobState, JobWorker
from tokenmill.common.platform.redis_embedded import EmbeddedRedis
from tokenmill.common.redis_conn import connect_url

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _worker_main(url: str, job_type: str, mode: str, report: str) -> None:
    """Entry point of a worker process. Modes:
    hang  - report progress, then sleep until killed;
    slow  - report progress, sleep 3 lease periods (the test SIGSTOPs us meanwhile), return a result;
    serve - process jobs forever (each doubles spec["n"])."""
    queue = JobQueue(connect_url(url), lease_seconds=TEST_LEASE_SECONDS)
    seen = {}

    def handler(ctx):
        seen["ctx"] = ctx
        if mode == "serve":
            time.sleep(0.02)
            return {"n": ctx.job.spec["n"] * 2, "pid": os.getpid()}
        ctx.progress("started", pid=os.getpid())
        if mode == "hang":
            time.sleep(600)
        time.sleep(3 * TEST_LEASE_SECONDS)
        return {"by": "stale", "pid": os.getpid()}

    worker = JobWorker(queue, job_type, handler, consumer=f"proc-{os.getpid()}")
    if mode == "serve":
        worker.run()
        return
    while not worker.run_once(block_seconds=1.0):
        pass
    ctx = seen["ctx"]
    Path(report).write_text(json.dumps({"attempt": ctx.attempt, "lease_lost": ctx.lease_lost}))


def spawn_worker(url: str, job_type: str, mode: str, report: Path) -> subprocess.Popen:
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO);"
        "from tests.test_jobs_processes import _worker_main; _worker_main(*sys.argv[1:])"
    )
    return subprocess.Popen([sys.executable, "-c", code, url, job_type, mode, str(report)], cwd=REPO)


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_running_with_progress(queue: JobQueue, job_id: str) -> Job:
    return wait_for(
        lambda: any(e.kind == "progress" for e in queue.events(job_id)) and queue.get(job_id),
        what="the worker process to start the job",
    )


def test_sigkilled_worker_job_is_reclaimed_and_completed_once(
    job_queue: JobQueue, redis_url: str, tmp_path
) -> None:
    job = job_queue.submit("train", {"steps": 10})
    proc = spawn_worker(redis_url, "train", "hang", tmp_path / "r.json")
    try:
        running = wait_running_with_progress(job_queue, job.id)
        assert running.state is JobState.RUNNING and running.worker == f"proc-{proc.pid}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    t_killed = time.monotonic()
    rescuer = JobWorker(job_queue, "train", lambda ctx: {"by": "rescuer", "attempt": ctx.attempt})
    while not job_queue.get(job.id).state.terminal and time.monotonic() - t_killed < 10:
        rescuer.run_once(block_seconds=0.1)
    reclaimed_after = time.monotonic() - t_killed
    done = job_queue.get(job.id)
    assert done.state is JobState.SUCCEEDED and done.result == {"by": "rescuer", "attempt": 2}
    assert done.attempts == 2 and done.worker == rescuer.consumer
    assert reclaimed_after < TEST_LEASE_SECONDS + 3  # the lease, plus one reclaim poll
    events = list(job_queue.watch(job.id))
    assert states(events) == ["PENDING", "RUNNING", "RUNNING", "SUCCEEDED"]
    assert "lease of proc-" in events[-2].message
    assert_monotonic(events)
    assert job_queue.depth("train") == {"waiting": 0, "running": 0, "dead": 0}


def test_worker_that_keeps_dying_dead_letters_the_job(job_queue: JobQueue, redis_url: str, tmp_path) -> None:
    job = job_queue.submit("train", {}, max_attempts=1)
    proc = spawn_worker(redis_url, "train", "hang", tmp_path / "r.json")
    try:
        wait_running_with_progress(job_queue, job.id)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    ran = []
    rescuer = JobWorker(job_queue, "train", lambda ctx: ran.append(1) or {})
    wait_for(lambda: rescuer.run_once(0.1) and job_queue.get(job.id).state.terminal, what="dead-letter")
    done = job_queue.get(job.id)
    assert done.state is JobState.FAILED and not ran
    assert "stopped heartbeating" in done.error and f"proc-{proc.pid}" in done.error
    assert [d["job"] for d in job_queue.dead_letters("train")] == [job.id]
    assert_monotonic(job_queue.events(job.id))


def test_stalled_worker_cannot_overwrite_the_result(job_queue: JobQueue, redis_url: str, tmp_path) -> None:
    """SIGSTOP (a GC pause, a frozen VM) past the lease: another worker completes the job; when the
    stalled one wakes up, its result is refused because its attempt number is stale."""
    job = job_queue.submit("train", {})
    report = tmp_path / "stale.json"
    proc = spawn_worker(redis_url, "train", "slow", report)
    try:
        wait_running_with_progress(job_queue, job.id)
        os.kill(proc.pid, signal.SIGSTOP)
        rescuer = JobWorker(job_queue, "train", lambda ctx: {"by": "rescuer"})
        wait_for(lambda: rescuer.run_once(0.1) and job_queue.get(job.id).state.terminal, what="takeover")
        os.kill(proc.pid, signal.SIGCONT)
        assert proc.wait(20) == 0
    finally:
        os.kill(proc.pid, signal.SIGCONT) if proc.poll() is None else None
        proc.kill()
    assert json.loads(report.read_text()) == {"attempt": 1, "lease_lost": True}
    done = job_queue.get(job.id)
    assert done.state is JobState.SUCCEEDED and done.result == {"by": "rescuer"} and done.attempts == 2
    events = job_queue.events(job.id)
    assert sum(e.terminal for e in events) == 1
    assert_monotonic(events)


def test_redis_restart_loses_no_submitted_job(tmp_path: Path) -> None:
    """A worker process and this client keep going across a clean restart and a SIGKILL of
    redis-server on the same port; AOF brings every submitted job back."""
    server = EmbeddedRedis(tmp_path / "data")
    url = server.start()
    queue = JobQueue(connect_url(url), lease_seconds=TEST_LEASE_SECONDS)
    proc = spawn_worker(url, "generate", "serve", tmp_path / "unused.json")
    try:
        ids = [queue.submit("generate", {"n": i}).id for i in range(5)]
        server.stop()  # clean: SHUTDOWN fsyncs the AOF
        server.start()
        ids += [queue.submit("generate", {"n": i}).id for i in range(5, 10)]  # client reconnects by itself
        wait_for(lambda: all(queue.get(i).state.terminal for i in ids[:7]), what="jobs after restart")
        ids += [queue.submit("generate", {"n": i}).id for i in range(10, 15)]
        os.kill(int((server.dir / "redis.pid").read_text()), signal.SIGKILL)  # unclean
        server.start()
        ids += [queue.submit("generate", {"n": i}).id for i in range(15, 20)]
        wait_for(lambda: all(queue.get(i).state.terminal for i in ids), timeout=40, what="all jobs")
        for n, job_id in enumerate(ids):
            job = queue.get(job_id)
            assert job.state is JobState.SUCCEEDED and job.result["n"] == 2 * n, job
        assert queue.depth("generate") == {"waiting": 0, "running": 0, "dead": 0}
        assert proc.poll() is None  # the worker process rode out both restarts
    finally:
        proc.kill()
        proc.wait(10)
        server.stop()
