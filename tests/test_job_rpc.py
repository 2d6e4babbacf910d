"""JobRpcMixin over a real loopback gRPC server (ServiceApp: auth, error mapping) and real Redis."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from tests.fixtures.grpc import TEST_TOKEN, make_test_config
from tokenmill.common.jobs import JobContext, JobQueue, JobWorker
from tokenmill.common.runtime.job_rpc import JobRpcMixin, event_to_proto, job_to_proto
from tokenmill.v1 import common_pb2, trainer_pb2_grpc

AUTH = [("authorization", f"Bearer {TEST_TOKEN}")]
SERVICE = "tokenmill.v1.TrainerService"


class TrainerJobs(JobRpcMixin, trainer_pb2_grpc.TrainerServiceServicer):
    """Only the job RPCs; records when a WatchJob stream has ended on the server side."""

    def __init__(self, queue: JobQueue):
        JobRpcMixin.__init__(self, queue, "train")
        self.watch_ended = threading.Event()

    def WatchJob(self, request, context) -> Iterator[common_pb2.JobEvent]:
        try:
            yield from super().WatchJob(request, context)
        finally:
            self.watch_ended.set()


@pytest.fixture
def service(job_queue: JobQueue, tmp_path, start_service_app):
    servicer = TrainerJobs(job_queue)
    app = start_service_app(
        "trainer",
        make_test_config(tmp_path),
        [(trainer_pb2_grpc.add_TrainerServiceServicer_to_server, servicer, SERVICE)],
        metrics=False,
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{app.port}")
    yield trainer_pb2_grpc.TrainerServiceStub(channel), servicer
    channel.close()


def run_job(queue: JobQueue, job_id: str, handler) -> None:
    worker = JobWorker(queue, "train", handler)
    deadline = time.monotonic() + 10
    while not queue.get(job_id).state.terminal and time.monotonic() < deadline:
        worker.run_once(0.1)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_get_job_maps_every_field(service, job_queue: JobQueue) -> None:
    stub, _ = service
    job = job_queue.submit("train", {"steps": 4, "name": "demo"}, idempotency_key="k1")
    pending = stub.GetJob(common_pb2.GetJobRequest(job_id=job.id), metadata=AUTH)
    assert pending.state == common_pb2.JOB_STATE_PENDING and pending.type == "train"
    assert dict(pending.spec) == {"steps": 4.0, "name": "demo"} and pending.idempotency_key == "k1"
    assert pending.max_attempts == 3 and pending.created_at.seconds > 0
    assert not pending.HasField("started_at") and not pending.HasField("result")

    def handler(ctx: JobContext) -> dict:
        ctx.progress("step", step=4)
        ctx.add_artifact("checkpoint", "demo", "2", "file:///store/demo/2")
        return {"final_loss": 2.5}

    run_job(job_queue, job.id, handler)
    done = stub.GetJob(common_pb2.GetJobRequest(job_id=job.id), metadata=AUTH)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED and done.attempts == 1
    assert dict(done.result) == {"final_loss": 2.5} and dict(done.progress) == {"step": 4.0}
    assert done.artifacts[0] == common_pb2.ArtifactRef(
        kind="checkpoint", name="demo", version="2", uri="file:///store/demo/2"
    )
    assert done.finished_at.ToNanoseconds() >= done.started_at.ToNanoseconds() > 0
    assert done.worker and done == job_to_proto(job_queue.get(job.id))


def test_get_and_cancel_bad_ids(service, job_queue: JobQueue) -> None:
    stub, _ = service
    other = job_queue.submit("ingest", {})
    for rpc, make in (
        (stub.GetJob, common_pb2.GetJobRequest),
        (stub.CancelJob, common_pb2.CancelJobRequest),
    ):
        assert (
            code_of(lambda r=rpc, m=make: r(m(job_id=""), metadata=AUTH)) == grpc.StatusCode.INVALID_ARGUMENT
        )
        assert code_of(lambda r=rpc, m=make: r(m(job_id="nope"), metadata=AUTH)) == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as info:
            rpc(make(job_id=other.id), metadata=AUTH)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "'ingest' job, not a 'train' job" in info.value.details()
    assert (
        code_of(lambda: stub.GetJob(common_pb2.GetJobRequest(job_id="x"))) == grpc.StatusCode.UNAUTHENTICATED
    )


def test_list_jobs_pages_and_filters(service, job_queue: JobQueue) -> None:
    stub, _ = service
    ids = [job_queue.submit("train", {"i": i}).id for i in range(5)]
    job_queue.submit("ingest", {})
    job_queue.cancel(ids[0])
    seen, token = [], ""
    while True:
        page = stub.ListJobs(common_pb2.ListJobsRequest(page_size=2, page_token=token), metadata=AUTH)
        seen += [j.id for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert seen == ids[::-1]
    cancelled = stub.ListJobs(common_pb2.ListJobsRequest(state=common_pb2.JOB_STATE_CANCELLED), metadata=AUTH)
    assert [j.id for j in cancelled.jobs] == [ids[0]] and not cancelled.next_page_token
    huge = stub.ListJobs(common_pb2.ListJobsRequest(page_size=100_000), metadata=AUTH)
    assert len(huge.jobs) == 5


def test_list_jobs_bad_input(service) -> None:
    stub, _ = service
    with pytest.raises(grpc.RpcError) as info:
        stub.ListJobs(common_pb2.ListJobsRequest(page_token="garbage!"), metadata=AUTH)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.ListJobs(common_pb2.ListJobsRequest(state=42), metadata=AUTH)
    assert (
        info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown job state" in info.value.details()
    )


def test_cancel_job(service, job_queue: JobQueue) -> None:
    stub, _ = service
    job = job_queue.submit("train", {})
    cancelled = stub.CancelJob(
        common_pb2.CancelJobRequest(job_id=job.id, reason="typo in spec"), metadata=AUTH
    )
    assert cancelled.state == common_pb2.JOB_STATE_CANCELLED and cancelled.error == "typo in spec"
    done = job_queue.submit("train", {"x": 1})
    run_job(job_queue, done.id, lambda ctx: {})
    with pytest.raises(grpc.RpcError) as info:
        stub.CancelJob(common_pb2.CancelJobRequest(job_id=done.id), metadata=AUTH)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_watch_job_follows_and_resumes(service, job_queue: JobQueue) -> None:
    stub, _ = service
    release = threading.Event()

    def handler(ctx: JobContext) -> dict:
        ctx.progress("loaded", step=0)
        release.wait(5)
        return {"ok": True}

    job = job_queue.submit("train", {})
    worker = JobWorker(job_queue, "train", handler)
    worker.start_in_thread()
    try:
        events = []
        for event in stub.WatchJob(common_pb2.WatchJobRequest(job_id=job.id, follow=True), metadata=AUTH):
            events.append(event)
            if event.kind == "progress":
                release.set()
    finally:
        worker.stop(5)
    kinds = [(e.kind, common_pb2.JobState.Name(e.state)) for e in events]
    assert kinds == [
        ("state", "JOB_STATE_PENDING"),
        ("state", "JOB_STATE_RUNNING"),
        ("progress", "JOB_STATE_RUNNING"),
        ("state", "JOB_STATE_SUCCEEDED"),
    ]
    assert events == [event_to_proto(e) for e in job_queue.events(job.id)]
    resumed = list(
        stub.WatchJob(common_pb2.WatchJobRequest(job_id=job.id, after_offset=events[1].offset), metadata=AUTH)
    )
    assert resumed == events[2:]


def test_watch_job_without_follow_returns_what_exists(service, job_queue: JobQueue) -> None:
    stub, _ = service
    job = job_queue.submit("train", {})
    t0 = time.monotonic()
    events = list(stub.WatchJob(common_pb2.WatchJobRequest(job_id=job.id, follow=False), metadata=AUTH))
    assert [e.state for e in events] == [common_pb2.JOB_STATE_PENDING] and time.monotonic() - t0 < 3


def test_watch_job_bad_input(service, job_queue: JobQueue) -> None:
    stub, _ = service
    job = job_queue.submit("train", {})
    for request, code in (
        (
            common_pb2.WatchJobRequest(job_id=job.id, after_offset="last-tuesday"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (common_pb2.WatchJobRequest(job_id=""), grpc.StatusCode.INVALID_ARGUMENT),
        (common_pb2.WatchJobRequest(job_id="missing"), grpc.StatusCode.NOT_FOUND),
    ):
        assert code_of(lambda r=request: list(stub.WatchJob(r, metadata=AUTH))) == code


def test_watch_job_stops_when_client_goes_away(service, job_queue: JobQueue) -> None:
    stub, servicer = service
    job = job_queue.submit("train", {})  # never runs: the watch would follow forever
    call = stub.WatchJob(common_pb2.WatchJobRequest(job_id=job.id, follow=True), metadata=AUTH)
    assert next(call).state == common_pb2.JOB_STATE_PENDING
    call.cancel()
    assert servicer.watch_ended.wait(5), "server kept following after the client cancelled"


def test_watch_job_ends_when_server_drains(service, job_queue: JobQueue) -> None:
    stub, servicer = service
    job = job_queue.submit("train", {})
    call = stub.WatchJob(common_pb2.WatchJobRequest(job_id=job.id, follow=True), metadata=AUTH)
    assert next(call).state == common_pb2.JOB_STATE_PENDING
    servicer._stopping.set()
    assert list(call) == []  # the stream ends cleanly (OK); the client resumes elsewhere
    assert servicer.watch_ended.wait(5)
