"""Crash drills for compress jobs: `python -m tokenmill.services.compress` as real processes, SIGKILLed
between layers by the `compress.after_layer` failpoint; the job is reclaimed and finishes once (one
stored version), and a cancel requested while a worker is stuck mid-compression ends the job
CANCELLED with nothing stored."""

from __future__ import annotations

import functools
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.fixtures.grpc import TEST_TOKEN, free_port
from tests.fixtures.processes import SpawnService
from tests.test_compress_job import CONFIG, model_tensors, write_dataset
from tokenmill.common import errors
from tokenmill.common.clients import CompressClient
from tokenmill.v1 import common_pb2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def setup(tmp_path: Path, ckpt, redis_url, redis_client) -> tuple[Path, int]:
    ckpt.client.save("base", model_tensors(), config=CONFIG.to_dict())
    write_dataset(tmp_path, "calib")
    port = free_port()
    config = {
        "data_dir": str(tmp_path),
        "redis_url": redis_url,
        "auth": {"tokens": [TEST_TOKEN]},
        "log_format": "text",
        "services": {
            "compress": {"port": port, "metrics_port": free_port()},
            "checkpoint": {"port": ckpt.app.port},
        },
        "jobs": {"lease_seconds": 2.0, "heartbeat_seconds": 0.5, "max_attempts": 3},
    }
    path = tmp_path / "compress.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, port


@pytest.fixture
def spawn(service_process: SpawnService) -> Callable[..., subprocess.Popen]:
    """`spawn(config, failpoints)` -> the compress service as a real process, serving."""
    return functools.partial(service_process, "compress")


def test_worker_killed_mid_compression_is_reclaimed_and_the_job_finishes_once(setup, spawn, ckpt):
    config, port = setup
    kill_at_5 = {"compress.after_layer": {"action": "kill", "when": {"layer": 5, "attempt": 1}}}
    first = spawn(config, kill_at_5)
    with CompressClient(f"127.0.0.1:{port}", token=TEST_TOKEN, timeout=30) as client:
        job = client.submit("base", "base-int8", "int8", idempotency_key="drill")
        assert first.wait(timeout=120) == -9
    with pytest.raises(errors.NotFound):  # nothing half-written is visible
        ckpt.client.get("base-int8")
    spawn(config, kill_at_5)  # same failpoints: they fire on attempt 1 only
    with CompressClient(f"127.0.0.1:{port}", token=TEST_TOKEN, timeout=30) as client:
        done = client.wait(job.id, timeout=120)
        assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
        assert done.attempts == 2 and done.result["checkpoint"] == "base-int8:1"
        again = client.submit("base", "base-int8", "int8", idempotency_key="drill")
        assert again.id == job.id
    assert [v.ref for v in ckpt.client.list("base-int8")] == ["base-int8:1"]


def test_cancel_while_the_worker_is_stuck_mid_compression_then_killed_ends_cancelled_with_nothing_stored(
    setup, spawn, ckpt, tmp_path
):
    config, port = setup
    marker = tmp_path / "paused"
    pause = {"compress.after_layer": {"action": "pause", "marker": str(marker), "when": {"layer": 2}}}
    stuck = spawn(config, pause)
    with CompressClient(f"127.0.0.1:{port}", token=TEST_TOKEN, timeout=30) as client:
        job = client.submit("base", "base-int8", "int8")
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert time.monotonic() < deadline and stuck.poll() is None
            time.sleep(0.1)
        client.cancel_job(job.id, reason="too slow")
        stuck.kill()
        stuck.wait(timeout=10)
    spawn(config, {})
    with CompressClient(f"127.0.0.1:{port}", token=TEST_TOKEN, timeout=30) as client:
        done = client.wait(job.id, timeout=120)
    assert done.state == common_pb2.JOB_STATE_CANCELLED
    with pytest.raises(errors.NotFound):
        ckpt.client.get("base-int8")
