"""ServiceApp over real loopback servers: health, reflection, auth, TLS/mTLS, limits, deadlines,
error mapping, metrics and access logs."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client import Counter

from tests.fixtures.grpc import (
    CHECKPOINT_SERVICE,
    INFERENCE_SERVICE,
    OTHER_TOKEN,
    TEST_TOKEN,
    EchoClient,
    echo_servicers,
    make_test_config,
)
from tokenmill.common import errors
from tokenmill.common.clients.base import ClientTls
from tokenmill.common.runtime import ServiceApp
from tokenmill.common.runtime.codec import RawCodec
from tokenmill.common.runtime.logs import JsonFormatter
from tokenmill.v1 import inference_pb2, inference_pb2_grpc


@pytest.fixture
def servicers():
    return echo_servicers()


@pytest.fixture
def app(grpc_config, start_service_app, servicers) -> ServiceApp:
    return start_service_app("inference", grpc_config, servicers)


@pytest.fixture
def client(app):
    with EchoClient(f"127.0.0.1:{app.port}", token=TEST_TOKEN, timeout=10) as c:
        yield c


def _health(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            .status
        )


# -- health and reflection -----------------------------------------------------------------------


def test_health_not_serving_until_set_serving(grpc_config, start_service_app):
    app = start_service_app("inference", grpc_config, echo_servicers(), serving=False)
    for service in ("", INFERENCE_SERVICE, CHECKPOINT_SERVICE):
        assert _health(app.port, service) == health_pb2.HealthCheckResponse.NOT_SERVING
    app.set_serving()
    for service in ("", INFERENCE_SERVICE, CHECKPOINT_SERVICE):
        assert _health(app.port, service) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        _health(app.port, "tokenmill.v1.NoSuchService")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_serve_becomes_serving_after_ready_passes_then_drains(grpc_config):
    app = ServiceApp("inference", grpc_config, port=0)
    for adder, servicer, name in echo_servicers():
        app.add(adder, servicer, name)
    attempts = []
    allowed = threading.Event()
    hook_ran = threading.Event()
    app.on_shutdown(hook_ran.set)

    def ready() -> bool:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise ConnectionError("redis not up yet")
        return allowed.is_set()

    thread = threading.Thread(target=app.serve, args=(ready,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not app.port or len(attempts) < 3:
        assert time.monotonic() < deadline, "serve() did not start polling ready()"
        time.sleep(0.02)
    assert _health(app.port) == health_pb2.HealthCheckResponse.NOT_SERVING
    allowed.set()
    while _health(app.port) != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "never became SERVING"
        time.sleep(0.02)
    app.request_shutdown()
    thread.join(10)
    assert not thread.is_alive()
    assert hook_ran.is_set()


def test_reflection_lists_services_without_token(app):
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {INFERENCE_SERVICE, CHECKPOINT_SERVICE, "grpc.health.v1.Health"} <= services
        # grpcurl describes a method from the file descriptors reflection serves
        assert db.FindFileContainingSymbol(INFERENCE_SERVICE).name == "tokenmill/v1/inference.proto"


# -- auth ----------------------------------------------------------------------------------------


def test_auth_rejects_missing_wrong_and_malformed_tokens(app, servicers):
    target = f"127.0.0.1:{app.port}"
    with EchoClient(target, retry=False) as anonymous:
        with pytest.raises(errors.Unauthenticated, match="missing credentials"):
            anonymous.generate("echo:hi")
        # health stays open for probes
        assert anonymous.health() == "SERVING"
    with EchoClient(target, token="wrong-token-0123456789abc", retry=False) as wrong:
        with pytest.raises(errors.Unauthenticated, match="invalid bearer token"):
            wrong.generate("echo:hi")
        with pytest.raises(errors.Unauthenticated):  # streams are guarded too
            list(wrong.stream("count:3"))
    with (
        EchoClient(target, retry=False) as malformed,
        pytest.raises(errors.Unauthenticated, match="malformed"),
    ):
        malformed.generate("echo:hi", metadata=[("authorization", f"Basic {TEST_TOKEN}")])
    assert servicers[0][1].calls == 0  # the handler never ran


def test_auth_accepts_every_configured_token(app):
    for token in (TEST_TOKEN, OTHER_TOKEN):
        with EchoClient(f"127.0.0.1:{app.port}", token=token) as c:
            assert c.generate("echo:hello") == "hello"
            assert list(c.stream("count:3")) == ["0", "1", "2"]


def test_auth_disabled_needs_no_token(tmp_path, start_service_app):
    config = make_test_config(tmp_path, auth={"disabled": True})
    app = start_service_app("inference", config, echo_servicers())
    with EchoClient(f"127.0.0.1:{app.port}") as c:
        assert c.generate("echo:open") == "open"


# -- TLS -----------------------------------------------------------------------------------------


def test_tls_serves_trusted_clients_and_refuses_plaintext(tmp_path, tls_files, start_service_app):
    config = make_test_config(
        tmp_path, tls={"cert_file": tls_files.server_cert, "key_file": tls_files.server_key}
    )
    app = start_service_app("inference", config, echo_servicers())
    with EchoClient(f"localhost:{app.port}", token=TEST_TOKEN, tls=ClientTls(ca_file=tls_files.ca)) as c:
        assert c.generate("echo:secure") == "secure"
    with (
        EchoClient(f"127.0.0.1:{app.port}", token=TEST_TOKEN, retry=False, timeout=3) as plain,
        pytest.raises(errors.Unavailable),
    ):
        plain.generate("echo:plain")


def test_mutual_tls_requires_a_client_certificate_from_the_trusted_ca(tmp_path, tls_files, start_service_app):
    config = make_test_config(
        tmp_path,
        tls={
            "cert_file": tls_files.server_cert,
            "key_file": tls_files.server_key,
            "client_ca_file": tls_files.ca,
        },
    )
    app = start_service_app("inference", config, echo_servicers())
    target = f"localhost:{app.port}"
    good = ClientTls(ca_file=tls_files.ca, cert_file=tls_files.client_cert, key_file=tls_files.client_key)
    with EchoClient(target, token=TEST_TOKEN, tls=good) as c:
        assert c.generate("echo:mutual") == "mutual"
    for tls in (
        ClientTls(ca_file=tls_files.ca),  # no client certificate
        ClientTls(ca_file=tls_files.ca, cert_file=tls_files.rogue_cert, key_file=tls_files.rogue_key),
    ):
        with (
            EchoClient(target, token=TEST_TOKEN, tls=tls, retry=False, timeout=3) as c,
            pytest.raises(errors.Unavailable),
        ):
            c.generate("echo:refused")


def test_client_from_config_uses_token_tls_and_limits(tmp_path, tls_files, start_service_app):
    config = make_test_config(
        tmp_path,
        tls={
            "cert_file": tls_files.server_cert,
            "key_file": tls_files.server_key,
            "client_ca_file": tls_files.ca,
            "server_ca_file": tls_files.ca,
        },
    )
    app = start_service_app("inference", config, echo_servicers())
    client_config = config.model_copy(
        update={
            "services": {
                **config.services,
                "inference": config.services["inference"].model_copy(update={"port": app.port}),
            }
        }
    )
    with EchoClient.from_config(client_config) as c:
        assert c.target == f"127.0.0.1:{app.port}"
        assert c.generate("echo:configured") == "configured"


# -- limits and deadlines ------------------------------------------------------------------------


def test_oversized_request_is_resource_exhausted_and_server_keeps_serving(tmp_path, start_service_app):
    config = make_test_config(tmp_path, max_message_bytes=64 * 1024)
    app = start_service_app("inference", config, echo_servicers())
    with EchoClient(
        f"127.0.0.1:{app.port}", token=TEST_TOKEN, max_message_bytes=4 * 1024 * 1024, retry=False
    ) as c:
        with pytest.raises(errors.ResourceExhausted):
            c.tokenize("x" * (100 * 1024))
        assert c.tokenize("ab") == [97, 98]
        assert c.generate("echo:still serving") == "still serving"


def test_deadline_expires_as_deadline_exceeded_and_is_visible_to_handlers(app, client):
    started = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded):
        client.generate("sleep:1.0", timeout=0.3)
    assert time.monotonic() - started < 0.9
    remaining = float(client.generate("remaining", timeout=5))
    assert 0 < remaining <= 5.1  # the deadline travels as an absolute time; allow clock rounding
    assert client.generate("remaining", timeout=None) != "None"  # the client default deadline applies


# -- error mapping -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls",
    [
        errors.InvalidArgument,
        errors.NotFound,
        errors.AlreadyExists,
        errors.FailedPrecondition,
        errors.OutOfRange,
        errors.ResourceExhausted,
        errors.Aborted,
        errors.DataLoss,
        errors.PermissionDenied,
        errors.Cancelled,
    ],
)
def test_domain_errors_map_to_exact_codes(client, cls):
    message = f"{cls.__name__} happened; do the documented thing"
    with grpc.insecure_channel(client.target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(
                inference_pb2.GenerateRequest(prompt=f"raise:{cls.__name__}:{message}"),
                metadata=[("authorization", f"Bearer {TEST_TOKEN}")],
                timeout=5,
            )
    assert info.value.code().name == cls.code
    assert info.value.details() == message
    with pytest.raises(cls, match=message):  # and the client turns it back into the class
        client.generate(f"raise:{cls.__name__}:{message}")


def test_unknown_exception_is_internal_with_request_id_and_no_traceback(client, caplog):
    with (
        caplog.at_level(logging.ERROR, logger="tokenmill.runtime"),
        pytest.raises(errors.TokenmillError) as info,
    ):
        client.generate("boom")
    assert info.value.code == "INTERNAL"
    assert "internal error (see server log, request id " in info.value.message
    assert "secret" not in info.value.message and "Traceback" not in info.value.message
    request_id = info.value.message.rsplit(" ", 1)[-1].rstrip(")")
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and logged[0].exc_info and "secret internal detail" in str(logged[0].exc_info[1])


def test_handler_abort_keeps_its_own_status(client):
    with pytest.raises(errors.FailedPrecondition, match="handler aborted itself"):
        client.generate("abort")


def test_unimplemented_method_keeps_its_code(client):
    with pytest.raises(errors.TokenmillError) as info:
        client.model_info()
    assert info.value.code == "UNIMPLEMENTED"


def test_server_streaming_errors_after_some_messages(client):
    received = []
    with pytest.raises(errors.NotFound, match="stream failed after 2 chunks"):
        for text in client.stream("fail_after:2"):
            received.append(text)
    assert received == ["0", "1"]
    received.clear()
    with pytest.raises(errors.TokenmillError, match="internal error") as info:
        for text in client.stream("boom_after:1"):
            received.append(text)
    assert received == ["0"] and info.value.code == "INTERNAL"
    assert "secret" not in info.value.message


def test_client_streaming_handler_maps_errors(client):
    response = client.upload([b"a" * 10, b"b" * 20])
    assert (response.chunks_received, response.bytes_received) == (2, 30)
    with pytest.raises(errors.InvalidArgument, match="chunk 1: digest does not match"):
        client.upload([b"a", b"b", b"c"], corrupt=1)


# -- metrics and logs ----------------------------------------------------------------------------


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_metrics_endpoint_counts_rpcs_by_method_and_code(app, client):
    custom = Counter("tokenmill_test_widgets", "Widgets made by the test.", registry=app.registry)
    custom.inc(3)
    client.generate("echo:a")
    client.generate("echo:b")
    with pytest.raises(errors.NotFound):
        client.generate("raise:NotFound:nope")
    list(client.stream("count:2"))
    text = _scrape(app.metrics_port)
    assert (
        'grpc_server_handled_total{grpc_code="OK",grpc_method="Generate",'
        'grpc_service="tokenmill.v1.InferenceService",grpc_type="unary"} 2.0'
    ) in text
    assert 'grpc_code="NOT_FOUND",grpc_method="Generate"' in text
    assert 'grpc_server_handled_total{grpc_code="OK",grpc_method="GenerateStream"' in text
    assert (
        'grpc_server_handling_seconds_count{grpc_method="Generate",'
        'grpc_service="tokenmill.v1.InferenceService",grpc_type="unary"} 3.0'
    ) in text
    assert 'tokenmill_service_serving{service="inference"} 1.0' in text
    assert "tokenmill_test_widgets_total 3.0" in text
    assert "process_cpu_seconds_total" in text


def test_one_access_log_line_per_rpc_with_method_code_duration_peer(client, caplog):
    with caplog.at_level(logging.INFO, logger="tokenmill.rpc"):
        client.generate("echo:x")
        with pytest.raises(errors.InvalidArgument):
            client.generate("what")
    lines = [r for r in caplog.records if r.name == "tokenmill.rpc"]
    assert [r.grpc_code for r in lines] == ["OK", "INVALID_ARGUMENT"]
    for record in lines:
        assert record.grpc_method == "Generate" and record.grpc_service == INFERENCE_SERVICE
        assert record.duration_ms >= 0 and record.peer.startswith("ipv4:127.0.0.1:")
        assert len(record.request_id) == 16
    assert "unknown test prompt" in lines[1].details
    line = json.loads(JsonFormatter("inference").format(lines[0]))
    assert line["msg"] == "rpc" and line["grpc_code"] == "OK" and line["service"] == "inference"
    assert {"ts", "level", "grpc_method", "duration_ms", "peer", "request_id"} <= set(line)


def test_client_supplied_request_id_is_used(client, caplog):
    with caplog.at_level(logging.INFO, logger="tokenmill.rpc"):
        client.generate("echo:x", metadata=[("x-request-id", "req-abc.123")])
    assert [r.request_id for r in caplog.records if r.name == "tokenmill.rpc"] == ["req-abc.123"]


def test_setup_logging_is_idempotent_and_formats_extras(capsys):
    from tokenmill.common.runtime import setup_logging
    from tokenmill.common.runtime.logs import _RuntimeHandler

    root = logging.getLogger()
    level = root.level
    try:
        setup_logging("INFO", "text", service="inference")
        setup_logging("INFO", "json", service="inference")
        assert sum(isinstance(h, _RuntimeHandler) for h in root.handlers) == 1
        logging.getLogger("tokenmill.test").info("hello", extra={"job_id": "j1"})
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert (line["msg"], line["job_id"], line["service"], line["level"]) == (
            "hello",
            "j1",
            "inference",
            "INFO",
        )
        setup_logging("WARNING", "text")
        logging.getLogger("tokenmill.test").warning("careful", extra={"job_id": "j2"})
        assert capsys.readouterr().err.strip().endswith("careful job_id=j2")
    finally:
        for handler in [h for h in root.handlers if isinstance(h, _RuntimeHandler)]:
            root.removeHandler(handler)
        root.setLevel(level)


# -- servicer_adder: handler tables generated from the proto's service descriptor ----------------


class _RecordingServer:
    """Takes what an adder registers, as grpc.Server does."""

    def __init__(self) -> None:
        self.generic: list[grpc.GenericRpcHandler] = []
        self.registered: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers) -> None:
        self.registered[service] = handlers


class _CallDetails(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def _custom_codec_services():
    from tokenmill.services.checkpoint.server import add_checkpoint_servicer
    from tokenmill.services.inference.convert import add_inference_servicer
    from tokenmill.v1 import checkpoint_pb2, checkpoint_pb2_grpc

    return [
        (
            checkpoint_pb2.DESCRIPTOR.services_by_name["CheckpointService"],
            add_checkpoint_servicer,
            checkpoint_pb2_grpc.CheckpointServiceServicer(),
        ),
        (
            inference_pb2.DESCRIPTOR.services_by_name["InferenceService"],
            add_inference_servicer,
            inference_pb2_grpc.InferenceServiceServicer(),
        ),
    ]


@pytest.mark.parametrize(
    "service, adder, servicer", _custom_codec_services(), ids=["checkpoint", "inference"]
)
def test_custom_codec_adders_serve_every_rpc_of_the_proto(service, adder, servicer):
    server = _RecordingServer()
    adder(servicer, server)
    (generic,) = server.generic
    assert set(server.registered[service.full_name]) == {m.name for m in service.methods}
    for method in service.methods:
        handler = generic.service(_CallDetails(f"/{service.full_name}/{method.name}"))
        assert handler is not None, method.full_name
        assert (handler.request_streaming, handler.response_streaming) == (
            method.client_streaming,
            method.server_streaming,
        ), method.full_name
        assert handler is server.registered[service.full_name][method.name]


def test_custom_codecs_replace_only_the_named_rpcs():
    from tokenmill.common.config import RequestLimitsConfig
    from tokenmill.common.runtime.codec import method_handlers
    from tokenmill.common.runtime.requests import Rejected, checked_deserializer
    from tokenmill.services.checkpoint import server as checkpoint_server
    from tokenmill.v1 import checkpoint_pb2, checkpoint_pb2_grpc

    server = _RecordingServer()
    checkpoint_server.add_checkpoint_servicer(checkpoint_pb2_grpc.CheckpointServiceServicer(), server)
    handlers = server.registered["tokenmill.v1.CheckpointService"]
    assert handlers["UploadChunks"].request_deserializer is checkpoint_server.decode_upload_chunk
    assert handlers["Download"].response_serializer is checkpoint_server.encode_download_chunk
    begin = handlers["BeginUpload"]
    assert begin.request_deserializer == checkpoint_pb2.BeginUploadRequest.FromString
    assert begin.response_serializer == checkpoint_pb2.UploadSession.SerializeToString

    # Every other service's requests (inference's included) go through the runtime's decoding layer:
    # undecodable bytes become a refusal that names the problem, never an exception in gRPC.
    parse = checked_deserializer(inference_pb2.TokenizeRequest.FromString, RequestLimitsConfig())
    assert parse(inference_pb2.TokenizeRequest(text="hi").SerializeToString()).text == "hi"
    rejected = parse(b"\x0a\x02\xff\xfe")  # field 1 (text) holding invalid UTF-8
    assert isinstance(rejected, Rejected) and "valid UTF-8" in rejected.reason

    service = checkpoint_pb2.DESCRIPTOR.services_by_name["CheckpointService"]
    with pytest.raises(ValueError, match="does not declare"):
        method_handlers(service, object(), codecs={"Downlaod": RawCodec()})
