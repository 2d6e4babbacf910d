"""The compress service shell: job RPCs against the real job system, SubmitCompress validation,
and `python -m tokenmill.services.compress` as a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.fixtures.grpc import TEST_TOKEN, free_port, make_test_config
from tokenmill.common import errors
from tokenmill.common.clients import CompressClient
from tokenmill.common.jobs import JobQueue, JobWorker
from tokenmill.common.runtime import ServiceApp
from tokenmill.services.compress.server import JOB_TYPE, SERVICE_NAME, build
from tokenmill.v1 import common_pb2

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def compress_app(tmp_path, redis_url, redis_client):  # redis_client: a flushed database
    config = make_test_config(tmp_path, redis_url=redis_url)
    app = ServiceApp("compress", config, port=0, metrics=False)
    ready = build(config, app, run_worker=False)  # the tests drive the queue themselves
    app.start()
    assert ready()
    app.set_serving()
    yield app
    app.stop(0)


@pytest.fixture
def client(compress_app):
    with CompressClient(f"127.0.0.1:{compress_app.port}", token=TEST_TOKEN, timeout=10) as c:
        yield c


@pytest.fixture
def queue(redis_client) -> JobQueue:
    return JobQueue(redis_client, lease_seconds=2.0, max_attempts=2)


# -- SubmitCompress ------------------------------------------------------------------------------

VALID = {"source": "demo-model:3", "output_name": "demo-int8", "method": "int8"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"source": ""}, "source is required"),
        ({"source": "../etc"}, "not a valid checkpoint name"),
        ({"source": "demo:"}, "after ':' give a version"),
        ({"source": "demo:1:2"}, "after ':' give a version"),
        ({"output_name": ""}, "output_name is required"),
        ({"output_name": "a/b"}, "output_name 'a/b' is not a valid"),
        ({"output_name": "x" * 101}, "the limit is 100"),
        ({"method": "int3"}, "method 'int3' is not supported"),
        ({"method": "int4_rtn", "group_size": 100}, "group_size=100"),
        ({"group_size": 64}, "group_size does not apply to method 'int8'"),
        ({"method": "prune_magnitude"}, "sparsity=0.0"),
        ({"method": "prune_magnitude", "sparsity": 1.0}, "strictly between 0 and 1"),
        ({"method": "prune_magnitude", "sparsity": float("nan")}, "sparsity=nan"),
        ({"method": "prune_2_4", "sparsity": 0.7}, "always 0.5 sparse"),
        ({"method": "svd"}, "exactly one of rank_fraction .* or energy"),
        ({"method": "svd", "rank_fraction": 0.5, "energy": 0.9}, "got \\['energy', 'rank_fraction'\\]"),
        ({"method": "svd", "energy": 1.5}, "energy=1.5"),
        ({"method": "int8", "energy": 0.9}, "energy does not apply to method 'int8'"),
        ({"method": "int4_gptq"}, "needs calibration_dataset"),
        (
            {
                "method": "prune_wanda",
                "sparsity": 0.5,
                "calibration_dataset": "web",
                "calibration_samples": 10**6,
            },
            "calibration_samples=1000000",
        ),
        ({"calibration_dataset": "web"}, "calibration_dataset does not apply"),
        ({"eval_batches": 4}, "eval_dataset is not"),
        ({"eval_dataset": "bad name"}, "not a valid dataset name"),
        ({"method": "distill", "distill_steps": 10}, "needs student_preset"),
        (
            {"method": "distill", "student_preset": "gpt5", "distill_steps": 10},
            "student_preset 'gpt5' is unknown",
        ),
        ({"method": "distill", "student_preset": "test-1m"}, "needs distill_steps"),
        ({"method": "distill", "student_preset": "test-1m", "distill_steps": 10}, "needs train_dataset"),
        ({"train_dataset": "web"}, "train_dataset does not apply to method 'int8'"),
        ({"distill_temperature": 1.0}, "distill_temperature does not apply to method 'int8'"),
        ({"distill_alpha": 0.0}, "distill_alpha does not apply to method 'int8'"),
        ({"idempotency_key": "k" * 300}, "idempotency_key is longer"),
    ],
)
def test_submit_rejects_bad_fields_with_invalid_argument(client, changes, message):
    fields = {**VALID, **changes}
    with pytest.raises(errors.InvalidArgument, match=message.replace("(", r"\(")):
        client.submit(fields.pop("source"), fields.pop("output_name"), fields.pop("method"), **fields)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"act_order": True}, "act_order does not apply to method 'int8'"),
        ({"eval_seq_len": 128}, "eval_seq_len is set but eval_dataset is not"),
        ({"eval_dataset": "v", "eval_seq_len": 10**6}, "eval_seq_len=1000000 is above"),
        ({"keep_dense": [""]}, "keep_dense patterns must be 1 to 200"),
    ],
)
def test_submit_rejects_new_fields_out_of_range(client, changes, message):
    with pytest.raises(errors.InvalidArgument, match=message):
        client.submit("demo", "demo-q", "int8", **changes)


@pytest.mark.parametrize(
    ("method", "changes", "message"),
    [
        ("prune_2_4", {"score": "random"}, "score='random' for method 'prune_2_4': use one of"),
        ("int8", {"score": "wanda"}, "score does not apply to method 'int8'"),
        (
            "prune_wanda",
            {"score": "wanda", "sparsity": 0.5, "calibration_dataset": "c"},
            "score does not apply",
        ),
        ("prune_2_4", {"score": "wanda"}, "'prune_2_4' with score 'wanda' needs calibration_dataset"),
        ("prune_2_4", {"score": "sparsegpt"}, "with score 'sparsegpt' needs calibration_dataset"),
        (
            "prune_2_4",
            {"calibration_dataset": "c"},
            "calibration_dataset does not apply to method 'prune_2_4'",
        ),
    ],
)
def test_submit_checks_the_2_4_score_and_the_calibration_it_needs(client, method, changes, message):
    with pytest.raises(errors.InvalidArgument, match=message):
        client.submit("demo", "demo-24", method, **changes)


def test_client_rejects_unknown_options_locally(client):
    with pytest.raises(errors.InvalidArgument, match="SubmitCompressRequest"):
        client.submit("demo", "demo-q", "int8", bits=3)


# -- job RPCs ------------------------------------------------------------------------------------


def test_job_rpcs_read_list_watch_and_cancel_compress_jobs(client, queue):
    job = queue.submit(JOB_TYPE, {"source": "demo", "method": "int8"}, idempotency_key="same")
    got = client.get_job(job.id)
    assert (got.id, got.type, got.state) == (job.id, JOB_TYPE, common_pb2.JOB_STATE_PENDING)
    assert got.spec["method"] == "int8"
    assert [j.id for j in client.list_jobs("PENDING").jobs] == [job.id]
    assert client.list_jobs("RUNNING").jobs == []
    assert [j.id for j in client.iter_jobs()] == [job.id]
    events = list(client.watch_job(job.id, follow=False))
    assert events and events[0].kind == "state" and events[0].state == common_pb2.JOB_STATE_PENDING
    cancelled = client.cancel_job(job.id, reason="changed my mind")
    assert cancelled.state == common_pb2.JOB_STATE_CANCELLED
    assert client.wait(job.id, timeout=5).state == common_pb2.JOB_STATE_CANCELLED
    resumed = list(client.watch_job(job.id, after=events[0].offset, follow=False))
    assert resumed[-1].state == common_pb2.JOB_STATE_CANCELLED


def test_job_rpcs_refuse_other_types_and_bad_ids(client, queue):
    train_job = queue.submit("train", {"steps": 1})
    with pytest.raises(errors.NotFound, match="'train' job"):
        client.get_job(train_job.id)
    with pytest.raises(errors.NotFound):
        client.get_job("0" * 32)
    with pytest.raises(errors.InvalidArgument, match="job_id is required"):
        client.cancel_job("")
    own = queue.submit(JOB_TYPE, {"source": "demo"})
    with pytest.raises(errors.InvalidArgument):
        list(client.watch_job(own.id, after="not-an-offset"))
    with pytest.raises(errors.InvalidArgument, match="unknown job state"):
        client.list_jobs(99)


def test_wait_follows_a_real_worker_to_success(client, queue):
    def handler(ctx):
        ctx.progress("quantizing", layer=1)
        return {"bytes_after": 123}

    job = queue.submit(JOB_TYPE, {"source": "demo", "method": "int8"})
    worker = JobWorker(queue, JOB_TYPE, handler, heartbeat_seconds=0.5)
    done = threading.Event()
    thread = threading.Thread(target=worker.run, args=(done,), daemon=True)
    thread.start()
    try:
        finished = client.wait(job.id, timeout=20)
    finally:
        done.set()
        thread.join(10)
    assert finished.state == common_pb2.JOB_STATE_SUCCEEDED
    assert finished.result["bytes_after"] == 123


def test_wait_times_out_on_a_job_nobody_runs(client, queue):
    job = queue.submit(JOB_TYPE, {"source": "demo"})
    with pytest.raises(errors.DeadlineExceeded, match=f"job {job.id} is still PENDING after 0.5s"):
        client.wait(job.id, timeout=0.5)


# -- the real process ----------------------------------------------------------------------------


@pytest.mark.slow
def test_python_m_services_compress_serves_and_stops_on_sigterm(tmp_path, redis_url, redis_client):
    port = free_port()
    config_path = tmp_path / "tokenmill.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path),
                "redis_url": redis_url,
                "auth": {"tokens": [TEST_TOKEN]},
                "services": {"compress": {"port": port, "metrics_port": free_port()}},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMILL_")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenmill.services.compress", "--config", str(config_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        config = make_test_config(tmp_path, redis_url=redis_url, services={"compress": {"port": port}})
        with CompressClient.from_config(config) as client:
            client.wait_until_serving(timeout=30)
            assert client.health("tokenmill.v1.CompressService") == "SERVING"
            with pytest.raises(errors.NotFound):
                client.get_job("f" * 32)
            with pytest.raises(errors.InvalidArgument, match="needs train_dataset"):
                client.submit("demo", "demo-tiny", "distill", student_preset="test-1m", distill_steps=1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert "Traceback" not in err and "compress stopped" in err


def test_draining_server_ends_follow_streams_and_wait_resumes_on_the_restarted_server(
    tmp_path, redis_url, redis_client, queue
):
    config = make_test_config(tmp_path, redis_url=redis_url)
    port = free_port()

    def start_app() -> ServiceApp:
        app = ServiceApp("compress", config, port=port, metrics=False)
        build(config, app, run_worker=False)
        app.start()
        app.set_serving()
        return app

    first = start_app()
    job = queue.submit(JOB_TYPE, {"source": "demo"})
    outcome: dict[str, object] = {}
    with CompressClient(f"127.0.0.1:{port}", token=TEST_TOKEN, timeout=5) as client:

        def waiter() -> None:
            try:
                outcome["job"] = client.wait(job.id, timeout=30)
            except errors.TokenmillError as exc:  # pragma: no cover - reported by the assert
                outcome["error"] = exc

        thread = threading.Thread(target=waiter)
        thread.start()
        deadline = time.monotonic() + 10
        watching = {"grpc_service": SERVICE_NAME, "grpc_method": "WatchJob"}
        while not first.registry.get_sample_value("grpc_server_in_flight_rpcs", watching):
            assert time.monotonic() < deadline, "wait() never started watching"
            time.sleep(0.02)
        began = time.monotonic()
        first.stop(grace=10)
        assert time.monotonic() - began < 5  # the follow stream ended at the drain, not the grace
        second = start_app()
        try:
            worker = JobWorker(queue, JOB_TYPE, lambda ctx: {"ok": True}, heartbeat_seconds=0.5)
            assert worker.run_once(block_seconds=2)
            thread.join(20)
            assert outcome["job"].state == common_pb2.JOB_STATE_SUCCEEDED
        finally:
            second.stop(0)
