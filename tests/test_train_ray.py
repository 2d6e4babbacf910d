"""The trainer service brings up Ray itself: a local instance, or the cluster named by RAY_ADDRESS,
bounded and retried, with FAILED_PRECONDITION naming the address and the timeout when it cannot.

The service runs as its own process (`python -m tokenmill.services.trainer`), so the Ray it trains
on is the one *it* started or joined, never one this test process set up for it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.fixtures.grpc import TEST_TOKEN, free_port
from tokenmill.common import errors
from tokenmill.common.clients.trainer import TrainerClient
from tokenmill.common.trainer.backends.ray_start import bounded_start, gcs_endpoint
from tokenmill.v1 import common_pb2

REPO = Path(__file__).resolve().parents[1]
JOB = dict(dataset="stories", backend="ray", workers=1, steps=3, micro_batch_size=4, seq_len=32, lr=3e-3)


@pytest.fixture
def trainer_process(tmp_path, redis_url, redis_client, train_data_root, start_checkpoint_service) -> Iterator[Callable[..., TrainerClient]]:  # fmt: skip
    """`start(**env)` -> a client of a trainer service process (its own Ray), stopped at teardown."""
    ckpt = start_checkpoint_service()
    procs: list[subprocess.Popen] = []
    clients: list[TrainerClient] = []

    def start(**env: str) -> TrainerClient:
        port = free_port()
        config = {
            "data_dir": str(train_data_root),
            "redis_url": redis_url,
            "auth": {"tokens": [TEST_TOKEN]},
            "log_format": "text",
            "shutdown_grace_seconds": 5,
            "services": {
                "trainer": {"host": "127.0.0.1", "port": port, "metrics_port": free_port()},
                "checkpoint": {"host": "127.0.0.1", "port": ckpt.app.port},
            },
        }
        path = tmp_path / f"trainer-{port}.yaml"
        path.write_text(yaml.safe_dump(config))
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENMILL_", "RAY_ADDRESS"))}
        proc = subprocess.Popen(
            [sys.executable, "-m", "tokenmill.services.trainer", "--config", str(path)],
            cwd=REPO,
            env={**clean, "PYTHONPATH": str(REPO), **env},
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / f"trainer-{port}.log", "w"),  # noqa: SIM115 (closed with the process)
        )
        procs.append(proc)
        client = TrainerClient(f"127.0.0.1:{port}", token=TEST_TOKEN)
        clients.append(client)
        client.wait_until_serving(timeout=120)
        return client

    yield start
    for client in clients:
        client.close()
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_gcs_endpoint_reads_cluster_addresses():
    assert gcs_endpoint("") is None and gcs_endpoint("auto") is None
    assert gcs_endpoint("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert gcs_endpoint("ray://head.svc:10001") == ("head.svc", 10001)
    with pytest.raises(errors.FailedPrecondition, match="RAY_ADDRESS='head' is not host:port"):
        gcs_endpoint("head")


def test_a_failing_start_is_retried_then_succeeds():
    calls: list[str] = []
    cleanups: list[int] = []

    def flaky(address: str) -> None:
        calls.append(address)
        if len(calls) < 3:
            raise RuntimeError("Timed out waiting for the GCS")

    bounded_start(
        "", timeout_s=30, attempts=3, init=flaky, cleanup=lambda: cleanups.append(1), backoff_s=0.01
    )
    assert calls == ["", "", ""] and len(cleanups) == 2


def test_a_start_that_hangs_is_cut_at_the_timeout():
    started = time.monotonic()
    with pytest.raises(errors.FailedPrecondition) as info:
        bounded_start(
            "", timeout_s=0.5, attempts=3, init=lambda a: threading.Event().wait(), cleanup=lambda: None
        )
    assert time.monotonic() - started < 5
    assert "could not start a local Ray instance" in str(info.value) and "0.5s start timeout" in str(
        info.value
    )
    assert "did not return within" in str(info.value)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_service_starts_its_own_local_ray_and_trains(trainer_process):
    client = trainer_process()
    done = client.wait(client.submit("own-ray", **JOB).id, timeout=500)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    assert done.result["steps"] == 3 and done.result["workers"] == 1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_service_joins_the_cluster_at_ray_address(trainer_process, ray_local):
    """The session's shared Ray (tests/fixtures/train.py) is the cluster; the service joins it."""
    address = ray_local.get_runtime_context().gcs_address
    client = trainer_process(RAY_ADDRESS=address)
    done = client.wait(client.submit("joined-ray", **JOB).id, timeout=500)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_unreachable_ray_address_fails_the_job_naming_it(trainer_process):
    closed = free_port()  # nothing listens there
    client = trainer_process(
        RAY_ADDRESS=f"127.0.0.1:{closed}", TOKENMILL_TRAINER__RAY_START_TIMEOUT_SECONDS="3"
    )
    started = time.monotonic()
    done = client.wait(client.submit("no-ray", **JOB).id, timeout=120)
    assert done.state == common_pb2.JOB_STATE_FAILED and done.attempts == 1
    assert done.error.startswith("FAILED_PRECONDITION: could not connect to the Ray cluster at ")
    assert f"RAY_ADDRESS=127.0.0.1:{closed} within the 3s start timeout" in done.error
    assert "unreachable" in done.error and time.monotonic() - started < 60
