"""Crash drill for ingestion: the ingest service killed with SIGKILL mid-job (in the middle of a run,
and after the dataset is published but before the job's result is recorded) — the restarted service
finishes the job once, and exactly one dataset is published."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.grpc import TEST_TOKEN, free_port
from tests.fixtures.ingest import good_web_text, write_jsonl
from tests.fixtures.processes import SpawnService
from tokenmill.common.clients.ingest import IngestClient
from tokenmill.v1 import common_pb2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def ingest_process(
    tmp_path: Path, redis_server, service_process: SpawnService
) -> tuple[Path, Callable[..., subprocess.Popen]]:
    """(config path, `spawn(failpoints=None)`): `python -m tokenmill.services.ingest` as a real
    process, serving; `failpoints` arm that process's failpoints only (a restart runs without)."""
    config = tmp_path / "ingest.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path / "data"),
                "redis_url": redis_server.url,
                "auth": {"tokens": [TEST_TOKEN]},
                "log_format": "text",
                "shutdown_grace_seconds": 2,
                "services": {"ingest": {"port": free_port(), "metrics_port": free_port()}},
                "jobs": {"lease_seconds": 3.0, "heartbeat_seconds": 1.0, "max_attempts": 3},
            }
        )
    )

    def spawn(failpoints: dict[str, Any] | None = None) -> subprocess.Popen:
        return service_process("ingest", config, failpoints)

    return config, spawn


def _address(config: Path) -> str:
    return f"127.0.0.1:{yaml.safe_load(config.read_text())['services']['ingest']['port']}"


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.1)


@pytest.mark.parametrize("phase", ["dedup", "publish"])
def test_killed_ingest_service_finishes_the_job_once(ingest_process, tmp_path, phase):
    config, spawn = ingest_process
    docs = [{"text": good_web_text(12, seed=i) + f"\nThis is note number {i}."} for i in range(12)]
    source = write_jsonl(tmp_path / "web.jsonl", docs)
    reached = tmp_path / "reached"
    service = spawn(
        {"ingest.phase_done": {"action": "pause", "marker": str(reached), "when": {"phase": phase}}}
    )
    client = IngestClient(_address(config), token=TEST_TOKEN)
    job = client.submit("drill", [str(source)], vocab_size=400, num_workers=1)
    _wait_for(reached, service)

    os.kill(service.pid, signal.SIGKILL)
    service.wait(timeout=10)
    spawn()
    done = client.wait(job.id, timeout=180)
    datasets = [d.name for d in client.list_datasets().datasets]
    client.close()

    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    assert done.attempts == 2
    assert datasets == ["drill"]
    leftovers = sorted(p.name for p in (tmp_path / "data" / "datasets").iterdir())
    assert leftovers == ["drill"], "the killed attempt's temp directory must be gone"
