"""The runtime as a real process: SIGTERM drains in-flight RPCs; bad configs exit 2 naming the field."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.fixtures.grpc import TEST_TOKEN, EchoClient, free_port
from tokenmill.common import errors
from tokenmill.common.runtime import EXIT_CONFIG, EXIT_STARTUP

REPO = Path(__file__).resolve().parents[1]
LAUNCH = (
    "import sys; from tokenmill.common.runtime import run_service; "
    "from tests.fixtures.grpc import build_echo_service; "
    "sys.exit(run_service('inference', build_echo_service, sys.argv[1:]))"
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMILL_") and k != "REDIS_URL"}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def _write_config(tmp_path: Path, **values) -> Path:
    config = {
        "data_dir": str(tmp_path / "data"),
        "auth": {"tokens": [TEST_TOKEN]},
        "shutdown_grace_seconds": 10,
        "log_format": "json",
    }
    config.update(values)
    path = tmp_path / "tokenmill.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _launch(config: Path | None, **env: str) -> subprocess.Popen:
    args = [sys.executable, "-c", LAUNCH] + (["--config", str(config)] if config else [])
    return subprocess.Popen(
        args, cwd=REPO, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _in_flight(metrics_port: int, method: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    match = re.search(rf'grpc_server_in_flight_rpcs\{{grpc_method="{method}"[^}}]*\}} ([0-9.]+)', text)
    return float(match.group(1)) if match else 0.0


@pytest.mark.slow
def test_sigterm_drains_the_in_flight_rpc_then_exits_cleanly(tmp_path):
    port, metrics_port = free_port(), free_port()
    config = _write_config(tmp_path, services={"inference": {"port": port, "metrics_port": metrics_port}})
    proc = _launch(config)
    try:
        with EchoClient(f"127.0.0.1:{port}", token=TEST_TOKEN, timeout=15) as client:
            client.wait_until_serving(timeout=30)
            outcome: dict[str, object] = {}

            def slow_call() -> None:
                try:
                    outcome["text"] = client.generate("sleep:1.5")
                except errors.TokenmillError as exc:  # pragma: no cover - reported by the assert
                    outcome["error"] = exc

            worker = threading.Thread(target=slow_call)
            worker.start()
            deadline = time.monotonic() + 10
            while _in_flight(metrics_port, "Generate") < 1:
                assert time.monotonic() < deadline, "the slow RPC never started"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)  # a repeated SIGTERM keeps draining
            time.sleep(0.1)
            # readiness fails and new work is refused while the old RPC drains
            with EchoClient(f"127.0.0.1:{port}", token=TEST_TOKEN, retry=False, timeout=2) as late:
                with contextlib.suppress(errors.Unavailable):  # or the listener is already closed
                    assert late.health() == "NOT_SERVING"
                with pytest.raises(errors.Unavailable):
                    late.generate("echo:too late")
            worker.join(15)
            assert outcome == {"text": "slept"}
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    assert "Traceback" not in stderr
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    generate = [line for line in lines if line.get("grpc_method") == "Generate"]
    assert [line["grpc_code"] for line in generate] == ["OK"]  # the drained RPC completed
    assert any(line["msg"] == "inference stopped" for line in lines)
    assert stderr.index('"grpc_method": "Generate"') < stderr.index("SHUTDOWN-HOOK-RAN")


@pytest.mark.slow
def test_sigint_during_the_drain_cancels_in_flight_rpcs(tmp_path):
    port, metrics_port = free_port(), free_port()
    config = _write_config(tmp_path, services={"inference": {"port": port, "metrics_port": metrics_port}})
    proc = _launch(config)
    try:
        with EchoClient(f"127.0.0.1:{port}", token=TEST_TOKEN, timeout=30) as client:
            client.wait_until_serving(timeout=30)
            outcome: dict[str, object] = {}

            def slow_call() -> None:
                try:
                    outcome["text"] = client.generate("sleep:20")
                except errors.TokenmillError as exc:
                    outcome["error"] = exc

            worker = threading.Thread(target=slow_call)
            worker.start()
            deadline = time.monotonic() + 10
            while _in_flight(metrics_port, "Generate") < 1:
                assert time.monotonic() < deadline, "the slow RPC never started"
                time.sleep(0.02)
            began = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            worker.join(10)
            assert isinstance(outcome.get("error"), errors.TokenmillError)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - began < 8  # not the 10 s grace, not the 20 s handler
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("yaml_text", "env", "field"),
    [
        ("services:\n  inference:\n    port: notaport\n", {}, "services.inference.port"),
        ("auth:\n  tokens: [short]\n", {}, "auth"),
        ("services: [\n  x: : :\n", {}, "YAML"),
        ("log_format: json\n", {"TOKENMILL_MAX_MESSAGE_BYTES": "lots"}, "max_message_bytes"),
        ("log_format: json\n", {"TOKENMILL_AUTH__TOKENS": "not-json"}, '"auth"'),
        ("log_format: json\n", {"TOKENMILL_LOG_LEVEL": "LOUD"}, "log_level"),
        ("nonsense_field: 1\n", {}, "nonsense_field"),
    ],
    ids=["yaml-type", "yaml-validator", "yaml-syntax", "env-int", "env-json", "env-enum", "yaml-unknown"],
)
def test_bad_config_refuses_to_start_naming_the_field(tmp_path, yaml_text, env, field):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    proc = _launch(path, **env)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_CONFIG, err
    assert field in err
    assert "Traceback" not in err and err.startswith("tokenmill-inference: ")


@pytest.mark.slow
def test_missing_config_file_exits_2(tmp_path):
    proc = _launch(tmp_path / "nope.yaml")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_CONFIG and "does not exist" in err and "Traceback" not in err


@pytest.mark.slow
def test_port_in_use_exits_1_with_a_message(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = _write_config(tmp_path, services={"inference": {"port": port, "metrics_port": free_port()}})
        proc = _launch(config)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_STARTUP, err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err
