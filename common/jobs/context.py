"""What a job handler gets: the job, its attempt number, and fenced ways to report back."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from tokenmill.common.jobs.model import Job, JobCancelled, JobState, LeaseLost
from tokenmill.common.jobs.queue import JobQueue
from tokenmill.common.jobs.scripts import UpdateOp

log = logging.getLogger(__name__)


class JobContext:
    """One attempt of one job, as its handler sees it. Every report names the attempt, so once
    another worker has taken the job over (lease expired), this one's reports are refused."""

    def __init__(self, queue: JobQueue, job: Job, attempt: int, entry: str, consumer: str):
        self.queue = queue
        self.job = job
        self.attempt = attempt
        self.entry = entry
        self.consumer = consumer
        self._lost = False
        self._cancel = job.cancel_requested
        self._lock = threading.Lock()

    def _report(self, op: UpdateOp, data: str = "", message: str = "") -> None:
        with self._lock:  # the heartbeat thread and the handler share this context
            status = self.queue.scripts.update(
                job_id=self.job.id,
                job_type=self.job.type,
                attempt=self.attempt,
                entry=self.entry,
                consumer=self.consumer,
                now=time.time(),
                op=op,
                data=data,
                message=message,
            )
        if not status.alive and not self._lost:
            log.warning("job %s attempt %d: lease lost to another worker", self.job.id, self.attempt)
        self._lost = self._lost or not status.alive
        self._cancel = self._cancel or status.cancel_requested

    def progress(self, message: str = "", **data: Any) -> None:
        """Publish a progress event (job.progress = data); also renews the lease."""
        payload = json.dumps(data, sort_keys=True, default=str)
        self._report("progress", payload, message)
        self.job.progress = json.loads(payload)

    def log(self, message: str) -> None:
        self._report("log", "", message)

    def heartbeat(self) -> None:
        """Renew the lease. The worker does this in the background; long steps may call it too."""
        self._report("heartbeat")

    @property
    def lease_lost(self) -> bool:
        return self._lost

    @property
    def cancelled(self) -> bool:
        """True once a cancel was requested or the lease was lost; check between steps."""
        if not (self._cancel or self._lost):
            state, attempts, cancel = self.queue.redis.hmget(
                self.queue.keys.job(self.job.id), "state", "attempts", "cancel"
            )
            self._cancel = cancel == "1"
            self._lost = state != JobState.RUNNING.value or attempts != str(self.attempt)
        return self._cancel or self._lost

    def raise_if_cancelled(self) -> None:
        if self.cancelled:
            if self._lost:
                raise LeaseLost(f"job {self.job.id} attempt {self.attempt} lost its lease")
            reason = self.queue.redis.hget(self.queue.keys.job(self.job.id), "cancel_reason") or "cancelled"
            raise JobCancelled(reason)

    def add_artifact(self, kind: str, name: str, version: str = "", uri: str = "") -> None:
        self.job.artifacts.append({"kind": kind, "name": name, "version": version, "uri": uri})
        self._report("artifacts", json.dumps(self.job.artifacts))
