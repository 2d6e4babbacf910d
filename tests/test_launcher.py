"""`tokenmill up/status/down` as a user runs them: real processes, real Redis, real health checks."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tokenmill.common.config import SERVICE_NAMES

TOKENMILL = str(Path(sys.executable).parent / "tokenmill")


def _free_ports(count: int) -> list[int]:
    """Ports free both at p and p+1000 (the metrics port)."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 1000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1000))
            except OSError:
                continue
        ports.append(port)
    return ports


def _plain_health_check(address: str) -> str:
    """The stock grpc.health.v1 stub, not tokenmill's client code."""
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture
def platform_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMILL_") and k != "REDIS_URL"}
    env["TOKENMILL_DATA_DIR"] = str(tmp_path / "data")
    for name, port in zip(SERVICE_NAMES, _free_ports(len(SERVICE_NAMES)), strict=True):
        env[f"TOKENMILL_SERVICES__{name.upper()}__PORT"] = str(port)
    return env


def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TOKENMILL, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # starts the whole platform
def test_up_status_down_leaves_nothing_behind(platform_env: dict[str, str], tmp_path: Path) -> None:
    start = time.monotonic()
    result = _cli(platform_env, "up", "--timeout", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - start < 45
    run_dir = tmp_path / "data" / "run"
    try:
        for name in SERVICE_NAMES:
            port = platform_env[f"TOKENMILL_SERVICES__{name.upper()}__PORT"]
            assert f"127.0.0.1:{port}" in result.stdout
            assert _plain_health_check(f"127.0.0.1:{port}") == "SERVING"
        assert (tmp_path / "data" / "auth_token").stat().st_mode & 0o077 == 0

        status = _cli(platform_env, "status")
        assert status.returncode == 0, status.stderr
        for name in SERVICE_NAMES:
            assert name in status.stdout
        assert "waiting" in status.stdout

        # A crashed service is restarted by the supervisor and comes back SERVING.
        checkpoint_pid = int((run_dir / "checkpoint.pid").read_text())
        os.kill(checkpoint_pid, signal.SIGKILL)
        port = platform_env["TOKENMILL_SERVICES__CHECKPOINT__PORT"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            new_pid = int((run_dir / "checkpoint.pid").read_text())
            if new_pid != checkpoint_pid:
                try:
                    if _plain_health_check(f"127.0.0.1:{port}") == "SERVING":
                        break
                except grpc.RpcError:
                    pass
            time.sleep(0.3)
        else:
            pytest.fail("checkpoint service was not restarted")
        pids = [int(p.read_text()) for p in run_dir.glob("*.pid")]
    finally:
        down = _cli(platform_env, "down")
    assert down.returncode == 0, down.stderr
    assert pids and not [pid for pid in pids if _alive(pid)]
    redis_pid_files = list((tmp_path / "data").rglob("redis*.pid"))
    assert not [p for p in redis_pid_files if p.exists() and _alive(int(p.read_text()))]


def test_up_refuses_malformed_config(platform_env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("jobs:\n  lease_seconds: soon\n")
    result = _cli(platform_env, "--config", str(bad), "up", "--timeout", "5")
    if result.returncode == 0:  # never leave a platform behind, even when the assertion fails
        _cli(platform_env, "--config", str(bad), "down")
    assert result.returncode != 0
    assert "jobs.lease_seconds" in result.stderr
    assert "Traceback" not in result.stderr


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


def _list_jobs_works(env: dict[str, str], tmp_path: Path) -> bool:
    """An RPC the ingest service answers from Redis."""
    from tokenmill.common import errors
    from tokenmill.common.clients.ingest import IngestClient

    token = (tmp_path / "data" / "auth_token").read_text().strip()
    address = f"127.0.0.1:{env['TOKENMILL_SERVICES__INGEST__PORT']}"
    with IngestClient(address, token=token, timeout=5) as client:
        try:
            client.list_jobs()
        except errors.TokenmillError:
            return False
    return True


@pytest.mark.slow  # starts the whole platform and waits out a failed Redis restart
def test_failed_redis_restart_leaves_the_services_up(platform_env: dict[str, str], tmp_path: Path) -> None:
    """Redis hangs holding its port (as a killed one does until its last thread exits): its restart
    fails, is reported and retried; the services stay up and serve again once Redis is back."""
    result = _cli(platform_env, "up", "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = tmp_path / "data" / "run"
    redis_pid = int((tmp_path / "data" / "redis" / "redis.pid").read_text())
    try:
        supervisor = int((run_dir / "supervisor.pid").read_text())
        services = {name: int((run_dir / f"{name}.pid").read_text()) for name in SERVICE_NAMES}
        assert _list_jobs_works(platform_env, tmp_path)
        os.kill(redis_pid, signal.SIGSTOP)  # alive, answering nothing, its port still bound
        _wait_for(
            lambda: "redis: last start failed" in _cli(platform_env, "status").stdout,
            90,
            "status to report the failed Redis restart",
        )
        status = _cli(platform_env, "status").stdout
        assert f"held by pid {redis_pid} (" in status and "DOWN" in status
        assert _alive(supervisor) and all(_alive(pid) for pid in services.values())
        os.kill(redis_pid, signal.SIGKILL)  # the port is released: the next retry succeeds
        _wait_for(lambda: _list_jobs_works(platform_env, tmp_path), 120, "ingest to serve from Redis again")
        status = _cli(platform_env, "status").stdout
        assert "last start failed" not in status
        assert _alive(supervisor)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(redis_pid, signal.SIGKILL)
        down = _cli(platform_env, "down")
    assert down.returncode == 0, down.stderr


def test_up_names_a_port_already_in_use(platform_env: dict[str, str], tmp_path: Path) -> None:
    port = int(platform_env["TOKENMILL_SERVICES__CHECKPOINT__PORT"])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        start = time.monotonic()
        result = _cli(platform_env, "up", "--timeout", "60")
        if result.returncode == 0:  # never leave a platform behind, even when the assertion fails
            _cli(platform_env, "down")
    assert result.returncode != 0
    assert f"checkpoint gRPC port 127.0.0.1:{port}" in result.stderr and "already in use" in result.stderr
    assert time.monotonic() - start < 30  # at once, not after the health timeout
    assert not (tmp_path / "data" / "run" / "supervisor.pid").exists()


def test_supervisor_restarts_a_live_child_whose_spec_changed(tmp_path: Path) -> None:
    """`tokenmill serve B` over A rewrites a replica's spec: the running child must be replaced."""
    from tokenmill.common.config import Config
    from tokenmill.common.platform.launcher import ProcessSpec, RunDir, Supervisor

    config = Config(data_dir=tmp_path, redis_url="redis://127.0.0.1:1/0", auth={"disabled": True})
    run_dir = RunDir(tmp_path)
    run_dir.ensure()
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    run_dir.write_processes([ProcessSpec("child", [*sleeper, "model-a"])])
    supervisor = Supervisor(config, run_dir)
    env = supervisor._base_env()
    try:
        supervisor._converge(env)
        first = supervisor.children["child"]
        supervisor._converge(env)
        assert supervisor.children["child"] is first  # unchanged spec: left alone
        run_dir.write_processes([ProcessSpec("child", [*sleeper, "model-b"])])
        supervisor._converge(env)
        second = supervisor.children["child"]
        assert first.poll() is not None and second.poll() is None
        assert second.args[-1] == "model-b"
    finally:
        supervisor._stop_all()
