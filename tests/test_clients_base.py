"""BaseClient against real loopback servers: retries, wait-for-ready, auth, error conversion."""

from __future__ import annotations

import json
import threading
import time

import pytest

import tokenmill.common.clients as clients
from tests.fixtures.grpc import TEST_TOKEN, EchoClient, echo_servicers, free_port
from tokenmill.common import errors
from tokenmill.common.clients.base import (
    NO_DEADLINE,
    BaseClient,
    ClientTls,
    JobsClientMixin,
    job_state_value,
    service_config_json,
)
from tokenmill.common.runtime import ServiceApp
from tokenmill.v1 import common_pb2


def _start_later(config, port: int, delay: float, started: list[ServiceApp]) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        app = ServiceApp("inference", config, port=port, metrics=False)
        for adder, servicer, name in echo_servicers():
            app.add(adder, servicer, name)
        app.start()
        app.set_serving()
        started.append(app)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_retry_policy_is_unavailable_only_with_backoff():
    config = json.loads(service_config_json())
    policy = config["methodConfig"][0]["retryPolicy"]
    assert policy == {
        "maxAttempts": 5,
        "initialBackoff": "0.1s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    assert config["methodConfig"][0]["name"] == [{}]  # every method


def test_client_retries_unavailable_answers_until_the_server_recovers(grpc_config, start_service_app):
    servicers = echo_servicers()
    app = start_service_app("inference", grpc_config, servicers)
    with EchoClient(f"127.0.0.1:{app.port}", token=TEST_TOKEN) as client:
        assert client.generate("unavailable:2") == "ok after 3 attempts"
    assert servicers[0][1].calls == 3
    with (
        EchoClient(f"127.0.0.1:{app.port}", token=TEST_TOKEN, retry=False) as no_retry,
        pytest.raises(errors.Unavailable, match="warming up"),
    ):
        no_retry.generate("unavailable:5")


def test_client_retries_until_a_late_server_starts(grpc_config):
    port = free_port()
    started: list[ServiceApp] = []
    with (
        EchoClient(f"127.0.0.1:{port}", token=TEST_TOKEN, retry=False, timeout=5) as no_retry,
        pytest.raises(errors.Unavailable),  # nothing listens yet: fails on the first attempt
    ):
        no_retry.generate("echo:early")
    thread = _start_later(grpc_config, port, 0.15, started)
    try:
        begin = time.monotonic()
        with EchoClient(f"127.0.0.1:{port}", token=TEST_TOKEN, timeout=10) as client:
            assert client.generate("echo:late") == "late"
        assert time.monotonic() - begin >= 0.1  # it really waited for the server
    finally:
        thread.join(5)
        for app in started:
            app.stop(0)


def test_wait_for_ready_waits_for_a_server_that_starts_later(grpc_config):
    port = free_port()
    started: list[ServiceApp] = []
    thread = _start_later(grpc_config, port, 1.5, started)  # longer than the retry budget
    try:
        with EchoClient(f"127.0.0.1:{port}", token=TEST_TOKEN, wait_for_ready=True, timeout=10) as client:
            assert client.generate("echo:patient") == "patient"
    finally:
        thread.join(5)
        for app in started:
            app.stop(0)


def test_wait_until_serving_times_out_with_the_last_status(grpc_config, start_service_app):
    app = start_service_app("inference", grpc_config, echo_servicers(), serving=False)
    with EchoClient(f"127.0.0.1:{app.port}") as client:
        with pytest.raises(errors.DeadlineExceeded, match="NOT_SERVING"):
            client.wait_until_serving(timeout=0.3)
        app.set_serving()
        client.wait_until_serving(timeout=5)


def test_stream_stopped_early_cancels_the_call(grpc_config, start_service_app):
    app = start_service_app("inference", grpc_config, echo_servicers())
    with EchoClient(f"127.0.0.1:{app.port}", token=TEST_TOKEN) as client:
        stream = client.stream("count:1000")
        assert next(stream) == "0"
        stream.close()
        assert client.generate("echo:after") == "after"


def test_job_state_names_and_values():
    assert job_state_value(None) == common_pb2.JOB_STATE_UNSPECIFIED
    assert job_state_value("running") == common_pb2.JOB_STATE_RUNNING
    assert job_state_value("JOB_STATE_FAILED") == common_pb2.JOB_STATE_FAILED
    assert job_state_value(common_pb2.JOB_STATE_SUCCEEDED) == common_pb2.JOB_STATE_SUCCEEDED
    with pytest.raises(errors.InvalidArgument, match="unknown job state 'done'"):
        job_state_value("done")


def test_package_reexports_clients_lazily(monkeypatch):
    assert clients.BaseClient is BaseClient and clients.JobsClientMixin is JobsClientMixin
    monkeypatch.setitem(clients._LAZY, "MissingClient", "tokenmill.common.clients.does_not_exist")
    with pytest.raises(ModuleNotFoundError):
        clients.MissingClient  # noqa: B018 - the failure happens on use, not on import
    with pytest.raises(AttributeError):
        clients.NoSuchThing  # noqa: B018
    assert "CheckpointClient" in dir(clients)


def test_from_config_dials_loopback_for_a_wildcard_host(grpc_config):
    config = grpc_config.model_copy(
        update={
            "services": {
                **grpc_config.services,
                "inference": grpc_config.services["inference"].model_copy(update={"host": "0.0.0.0"}),
            }
        }
    )
    with EchoClient.from_config(config) as client:
        assert client.target == f"127.0.0.1:{config.services['inference'].port}"


def test_client_tls_reports_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match="cannot read .*missing.pem"):
        BaseClient("localhost:1", tls=ClientTls(ca_file=tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="must be given together"):
        BaseClient("localhost:1", tls={"cert_file": tmp_path / "c.pem"})


def test_default_deadline_and_no_deadline(grpc_config, start_service_app):
    app = start_service_app("inference", grpc_config, echo_servicers())
    with EchoClient(f"127.0.0.1:{app.port}", token=TEST_TOKEN, timeout=7) as client:
        assert 0 < float(client.generate("remaining")) <= 7.1  # None = the client default
        assert float(client.generate("remaining", timeout=NO_DEADLINE)) > 1e6  # gRPC's "no deadline"
