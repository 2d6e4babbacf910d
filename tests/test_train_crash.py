"""Crash drills for training: the trainer service killed with SIGKILL mid-job takes its worker processes
with it, and the restarted service finishes the job once; a run resumes from whatever its last
checkpoint holds (weights only or full state)."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import yaml

from tests.fixtures.grpc import TEST_TOKEN, free_port
from tests.fixtures.processes import SpawnService
from tokenmill.common.clients.trainer import TrainerClient
from tokenmill.common.trainer.backends.local import run_local
from tokenmill.common.trainer.config import TrainConfig
from tokenmill.common.trainer.local_io import LocalCheckpointIO
from tokenmill.v1 import common_pb2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SMALL = dict(workers=2, micro_batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2)


def _write_config(tmp_path: Path, data_dir: Path, redis_url: str, ckpt_port: int) -> Path:
    config = {
        "data_dir": str(data_dir),
        "redis_url": redis_url,
        "auth": {"tokens": [TEST_TOKEN]},
        "log_format": "text",
        "shutdown_grace_seconds": 5,
        "services": {
            "trainer": {"port": free_port(), "metrics_port": free_port()},
            "checkpoint": {"port": ckpt_port},
        },
        "jobs": {"lease_seconds": 3.0, "heartbeat_seconds": 1.0, "max_attempts": 3},
    }
    path = tmp_path / "trainer.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def trainer_process(service_process: SpawnService) -> Callable[..., subprocess.Popen]:
    """`spawn(config, failpoints=None)` -> `python -m tokenmill.services.trainer` as a real process,
    serving; `failpoints` arm the service's (and so its workers') failpoints."""
    return functools.partial(service_process, "trainer")


def _running_after(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of ``procs`` still running after up to ``timeout`` s (an exited process that its new
    parent has not reaped yet, a zombie, counts as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if _running(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.2)


def test_killed_trainer_takes_its_workers_along_and_the_job_finishes_once(
    train_data_root, redis_server, redis_client, start_checkpoint_service, trainer_process, tmp_path
):
    ckpt = start_checkpoint_service()
    config = _write_config(tmp_path, train_data_root, redis_server.url, ckpt.app.port)
    port = yaml.safe_load(config.read_text())["services"]["trainer"]["port"]
    # Both workers of attempt 1 hold still after step 5 (past the step-4 checkpoint): a worker that
    # outlives the service would stay there for ever, so the drill does not depend on timing.
    paused = tmp_path / "paused"
    hold = {"action": "pause", "marker": str(paused), "when": {"step": 5, "attempt": 1}}
    service = trainer_process(config, failpoints={"trainer.after_step": hold})
    client = TrainerClient(f"127.0.0.1:{port}", token=TEST_TOKEN)
    job = client.submit("crash", dataset="stories", steps=12, checkpoint_every=4, **SMALL)
    _wait_for(paused, service)
    workers = [p for p in psutil.Process(service.pid).children() if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == 2, [p.cmdline() for p in workers]

    os.kill(service.pid, signal.SIGKILL)
    service.wait(timeout=10)
    alive = _running_after(workers, timeout=10)
    for orphan in alive:
        orphan.kill()
    assert not alive, f"worker processes outlived the killed trainer service: {[p.pid for p in alive]}"

    trainer_process(config)
    done = client.wait(job.id, timeout=400)
    client.close()
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    assert done.attempts == 2 and done.result["steps"] == 12
    assert [h["step"] for h in done.result["history"]] == list(range(1, 13))
    finals = [v.ref for v in ckpt.store.list("crash") if v.manifest.metrics.get("reason") == "final"]
    assert finals == [done.result["checkpoint"]], "the job must commit exactly one final checkpoint"


def _cfg(ds: Path, **kw) -> TrainConfig:
    base = dict(dataset_path=str(ds), micro_batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2)
    return TrainConfig(**{**base, "output_name": "m", "workers": 1, "run_id": "r", **kw})


def test_a_run_resumes_from_its_weights_only_final_checkpoint(train_dataset, tmp_path):
    io_spec = {"kind": "local", "root": str(tmp_path / "ckpt")}
    first = run_local(_cfg(train_dataset, steps=4), io_spec)
    io = LocalCheckpointIO(tmp_path / "ckpt")
    assert first["status"] == "completed" and io.resolve("m:run-r") == first["checkpoint"]

    # A retry of the finished run finishes with the committed result: no training, no new version.
    events: list[tuple[str, dict]] = []
    again = run_local(
        _cfg(train_dataset, steps=4, attempt=2), io_spec, on_event=lambda k, d: events.append((k, d))
    )
    assert again["checkpoint"] == first["checkpoint"] and again["history"] == first["history"]
    assert not [d for k, d in events if k in ("progress", "checkpoint")]
    assert io.resolve("m:run-r") == first["checkpoint"]

    # Resumed past it (the last checkpoint holds weights only): fresh optimizer moments, said in the log.
    events.clear()
    longer = run_local(
        _cfg(train_dataset, steps=6, attempt=3), io_spec, on_event=lambda k, d: events.append((k, d))
    )
    assert longer["status"] == "completed" and [h["step"] for h in longer["history"]] == list(range(1, 7))
    logs = [d["message"] for k, d in events if k == "log"]
    assert any("no optimizer state" in m for m in logs), logs
