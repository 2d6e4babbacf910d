"""GetJob / ListJobs / CancelJob / WatchJob for any job service, as a servicer mixin.

Every job service (ingest, trainer, compress, inference batch generation) exposes the same four
RPCs over its own job type, so they live here once:

    class TrainerServicer(JobRpcMixin, trainer_pb2_grpc.TrainerServiceServicer):
        def __init__(self, queue, ...):
            JobRpcMixin.__init__(self, queue, "train", stopping=app.stopping)

Bad input raises `tokenmill.common.errors.*`; the service runtime turns those into status codes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf import struct_pb2

from tokenmill.common import errors
from tokenmill.common.jobs import Job, JobEvent, JobQueue, JobState
from tokenmill.common.runtime.proto_struct import dict_to_struct, timestamp_from_seconds
from tokenmill.v1 import common_pb2

MAX_PAGE_SIZE = 1000
# JobState values are the proto names without the prefix (tests/test_jobs.py checks it)
_STATE_TO_PROTO: dict[JobState, common_pb2.JobState] = {
    state: getattr(common_pb2, f"JOB_STATE_{state.value}") for state in JobState
}


def state_to_proto(state: JobState) -> common_pb2.JobState:
    return _STATE_TO_PROTO[state]


def state_from_proto(value: int) -> JobState | None:
    """Proto enum value -> JobState; UNSPECIFIED -> None (any). Unknown numbers are InvalidArgument."""
    if value == common_pb2.JOB_STATE_UNSPECIFIED:
        return None
    try:
        return JobState(common_pb2.JobState.Name(value).removeprefix("JOB_STATE_"))
    except ValueError:
        known = [n.removeprefix("JOB_STATE_") for n in common_pb2.JobState.keys()[1:]]
        raise errors.InvalidArgument(
            f"unknown job state {value}; use one of {known} or leave it unset"
        ) from None


def _struct(data: dict[str, Any] | None) -> struct_pb2.Struct | None:
    """None stays unset (the field is absent), anything else becomes a Struct."""
    return None if data is None else dict_to_struct(data)


def job_to_proto(job: Job) -> common_pb2.Job:
    msg = common_pb2.Job(
        id=job.id,
        type=job.type,
        state=state_to_proto(job.state),
        spec=_struct(job.spec),
        idempotency_key=job.idempotency_key,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        created_at=timestamp_from_seconds(job.created_at),
        started_at=timestamp_from_seconds(job.started_at),
        finished_at=timestamp_from_seconds(job.finished_at),
        result=_struct(job.result),
        error=job.error,
        cancel_requested=job.cancel_requested,
        progress=_struct(job.progress),
        worker=job.worker,
    )
    for art in job.artifacts:
        msg.artifacts.add(
            kind=art.get("kind", ""),
            name=art.get("name", ""),
            version=art.get("version", ""),
            uri=art.get("uri", ""),
        )
    return msg


def event_to_proto(event: JobEvent) -> common_pb2.JobEvent:
    return common_pb2.JobEvent(
        job_id=event.job_id,
        offset=event.offset,
        time=timestamp_from_seconds(event.time),
        kind=event.kind,
        state=state_to_proto(event.state),
        data=_struct(event.data),
        message=event.message,
    )


class JobRpcMixin:
    """The four job RPCs over `queue`, restricted to jobs of `job_type`.

    `stopping` (e.g. `ServiceApp.stopping`) ends WatchJob streams when the server starts
    draining, so a SIGTERM is not held up by clients following long jobs."""

    def __init__(self, queue: JobQueue, job_type: str, *, stopping: threading.Event | None = None):
        self.job_queue = queue
        self.job_type = job_type
        self._stopping = stopping or threading.Event()

    def _own_job(self, job_id: str) -> Job:
        if not job_id:
            raise errors.InvalidArgument("job_id is required")
        job = self.job_queue.get(job_id)
        if job.type != self.job_type:
            # Not ours: answer as if absent (the id is valid, just for another service).
            raise errors.NotFound(
                f"job {job_id} is a '{job.type}' job, not a '{self.job_type}' job; ask the service that runs it"
            )
        return job

    def GetJob(self, request: common_pb2.GetJobRequest, context: grpc.ServicerContext) -> common_pb2.Job:
        return job_to_proto(self._own_job(request.job_id))

    def ListJobs(
        self, request: common_pb2.ListJobsRequest, context: grpc.ServicerContext
    ) -> common_pb2.ListJobsResponse:
        state = state_from_proto(request.state)
        page_size = min(request.page_size or 50, MAX_PAGE_SIZE)  # AIP-158: cap, do not reject
        jobs, token = self.job_queue.list(
            self.job_type, state=state, page_size=page_size, page_token=request.page_token
        )
        return common_pb2.ListJobsResponse(jobs=[job_to_proto(j) for j in jobs], next_page_token=token)

    def CancelJob(
        self, request: common_pb2.CancelJobRequest, context: grpc.ServicerContext
    ) -> common_pb2.Job:
        self._own_job(request.job_id)
        return job_to_proto(self.job_queue.cancel(request.job_id, request.reason))

    def WatchJob(
        self, request: common_pb2.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[common_pb2.JobEvent]:
        self._own_job(request.job_id)
        events = self.job_queue.watch(
            request.job_id,
            after=request.after_offset,
            follow=request.follow,
            is_active=lambda: context.is_active() and not self._stopping.is_set(),
        )
        for event in events:
            yield event_to_proto(event)
