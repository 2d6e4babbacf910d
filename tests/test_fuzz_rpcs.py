"""Every RPC of every service, fuzzed against real servers: no UNKNOWN or INTERNAL, no hang, still SERVING.

The services and their methods are enumerated from the tokenmill.v1 descriptors, so a new RPC is
fuzzed without touching this file (a new *service* fails `test_every_service_has_a_fuzz_target`
until it gets a server here). Two properties per service: (a) well-formed requests of the RPC's own
message type carrying hostile values (huge and non-finite numbers, deep and NaN-filled Structs, long
strings, path traversal and trailing-newline names), (b) raw bytes that do not decode (bad UTF-8 in
each string field, corrupt bytes, a Struct nested past protobuf's recursion limit). Each call has a
deadline; a unary call that reaches it counts as a hang.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.grpc import TEST_TOKEN, make_test_config
from tokenmill.common.runtime import ServiceApp
from tokenmill.v1 import checkpoint_pb2, compress_pb2, inference_pb2, ingest_pb2, trainer_pb2

pytestmark = pytest.mark.slow  # real servers, Redis, a few seconds per service

AUTH = (("authorization", f"Bearer {TEST_TOKEN}"),)
CALL_TIMEOUT = 20.0  # generous for a loaded CI machine; a unary call that reaches it is a hang
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
SERVICES: dict[str, ServiceDescriptor] = {
    service.full_name: service
    for module in (ingest_pb2, trainer_pb2, checkpoint_pb2, compress_pb2, inference_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
}
_STRUCT_NAMES = {m.DESCRIPTOR.full_name for m in (struct_pb2.Struct, struct_pb2.Value, struct_pb2.ListValue)}


# -- servers -------------------------------------------------------------------------------------


def _started(app: ServiceApp, ready: Callable[[], Any] | None = None) -> ServiceApp:
    app.start()
    assert ready is None or ready()
    app.set_serving()
    return app


@pytest.fixture
def compress_target(tmp_path, redis_url, redis_client) -> Iterator[ServiceApp]:
    from tokenmill.services.compress.server import build

    config = make_test_config(tmp_path, redis_url=redis_url)
    app = ServiceApp("compress", config, port=0, metrics=False)
    yield _started(app, build(config, app))
    app.stop(0)


@pytest.fixture
def router_target(tmp_path, redis_url, redis_client) -> Iterator[ServiceApp]:
    from tokenmill.common.redis_conn import connect_url
    from tokenmill.services.inference.convert import SERVICE_NAME, add_inference_servicer
    from tokenmill.services.inference.dispatch.failover import RouterDispatcher
    from tokenmill.services.inference.router import RouterServicer

    dispatcher = RouterDispatcher(
        connect_url(redis_url), dead_after_s=1.0, no_replica_timeout_s=0.3, poll_s=0.05
    )
    app = ServiceApp("inference", make_test_config(tmp_path), port=0, metrics=False)
    servicer = RouterServicer(dispatcher, client_kwargs={"token": TEST_TOKEN})
    app.add(add_inference_servicer, servicer, SERVICE_NAME)
    yield _started(app)
    app.stop(0)


TARGETS: dict[str, Callable[[pytest.FixtureRequest], ServiceApp]] = {
    "tokenmill.v1.IngestService": lambda request: request.getfixturevalue("ingest_service")["app"],
    "tokenmill.v1.TrainerService": lambda request: request.getfixturevalue("trainer_service").app,
    "tokenmill.v1.CheckpointService": lambda request: request.getfixturevalue("ckpt").app,
    "tokenmill.v1.CompressService": lambda request: request.getfixturevalue("compress_target"),
    "tokenmill.v1.InferenceService": lambda request: request.getfixturevalue("router_target"),
}


# -- hostile values ------------------------------------------------------------------------------

HOSTILE_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 0.5])
HOSTILE_STRINGS = st.one_of(
    st.sampled_from(
        [
            "",
            "../../../../etc/passwd",
            "/etc/passwd",
            "ok-name\n",
            "demo:../../x",
            "dataset:../../x",
            "dataset:" + "a" * 5000,
            "a/" * 3000,
            "s3://bucket/../../x",
            "a\x00b",
            "name:latest",
            "x" * 300,
            "/tmp/" + "a" * 100_000,
            "\u202e\ud7ff\U0010ffff",
        ]
    ),
    st.text(max_size=40),
)
_INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}


def _ints(cpp_type: int) -> st.SearchStrategy[int]:
    low, high = _INT_RANGES[cpp_type]
    return st.sampled_from([low, high, 0, 1, -1 if low else 2, 2**31 - 1]) | st.integers(low, high)


def _json_values() -> st.SearchStrategy[Any]:
    leaves = st.none() | st.booleans() | HOSTILE_FLOATS | HOSTILE_STRINGS
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
        max_leaves=12,
    )


def _deep_dict(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": math.nan}
    for _ in range(depth):
        value = {"x": value}
    return value


def structs() -> st.SearchStrategy[struct_pb2.Struct]:
    def build(mapping: dict[str, Any]) -> struct_pb2.Struct:
        s = struct_pb2.Struct()
        s.update(mapping)
        return s

    shapes = st.one_of(
        st.dictionaries(st.text(max_size=6), _json_values(), max_size=4),
        st.integers(1, 31).map(_deep_dict),
        st.integers(1, 12_000).map(lambda n: {f"k{i}": i for i in range(n)}),
    )
    return shapes.map(build)


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.cpp_type in (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE):
        return HOSTILE_FLOATS
    if field.cpp_type in _INT_RANGES:
        return _ints(field.cpp_type)
    if field.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
        return st.booleans()
    if field.cpp_type == FieldDescriptor.CPPTYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values] + [999, -1])
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    return HOSTILE_STRINGS


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    return _scalar(field)


def _set(msg: Message, field: FieldDescriptor, value: Any) -> None:
    """Set one field; values the Python API itself refuses (a float32 overflow) are skipped."""
    target = getattr(msg, field.name)
    try:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for key, item in value.items():
                if value_field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
                    target[key].CopyFrom(item)
                else:
                    target[key] = item
        elif field.is_repeated:
            if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
                for item in value:
                    target.add().CopyFrom(item)
            else:
                target.extend(value)
        elif field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(msg, field.name, value)
    except (ValueError, TypeError, OverflowError):
        pass


def _field(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key = _scalar(field.message_type.fields_by_name["key"])
        return st.dictionaries(key, _value(field.message_type.fields_by_name["value"], depth), max_size=2)
    if field.is_repeated:
        return st.lists(_value(field, depth), max_size=3)
    return _value(field, depth)


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of this type with any subset of fields set to hostile values."""
    cls = GetMessageClass(descriptor)
    if descriptor.full_name in _STRUCT_NAMES:
        if descriptor.full_name == struct_pb2.Struct.DESCRIPTOR.full_name:
            return structs()
        return st.just(cls())  # a bare Value / ListValue field: Structs cover their contents
    if depth > 3:
        return st.just(cls())
    fields = {f.name: _field(f, depth) for f in descriptor.fields}

    def build(values: dict[str, Any]) -> Message:
        msg = cls()
        for name, value in values.items():
            _set(msg, descriptor.fields_by_name[name], value)
        return msg

    return st.fixed_dictionaries({}, optional=fields).map(build)


# -- undecodable bytes ---------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _deep_struct_bytes(depth: int) -> bytes:
    body = b""
    for _ in range(depth):  # Struct{fields: {"x": Value{struct_value: body}}}
        entry = _length_delimited(1, b"x") + _length_delimited(2, _length_delimited(5, body))
        body = _length_delimited(1, entry)
    return body


def undecodable(descriptor: Descriptor) -> st.SearchStrategy[bytes]:
    """Bytes that are not a valid message of this type."""
    strings = [f.number for f in descriptor.fields if f.type == FieldDescriptor.TYPE_STRING]
    nestable = [f.number for f in descriptor.fields if f.type == FieldDescriptor.TYPE_MESSAGE]
    options = [
        st.binary(min_size=1, max_size=64),
        st.just(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"),  # a varint that never ends
        st.just(b"\x0a\xff\xff\xff\xff\x0f"),  # a length far past the end
    ]
    if strings:
        bad = st.sampled_from([b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"ok\x80"])
        options.append(st.tuples(st.sampled_from(strings), bad).map(lambda t: _length_delimited(*t)))
    if nestable:
        deep = st.tuples(st.sampled_from(nestable), st.integers(34, 70))
        options.append(deep.map(lambda t: _length_delimited(t[0], _deep_struct_bytes(t[1]))))
    return st.one_of(options)


# -- calling -------------------------------------------------------------------------------------


def call(channel: grpc.Channel, service: ServiceDescriptor, method: MethodDescriptor, payload: bytes):
    """The status of one call with `payload` as the request bytes (raw: no (de)serializers)."""
    kind = (
        ("stream" if method.client_streaming else "unary")
        + "_"
        + ("stream" if method.server_streaming else "unary")
    )
    stub = getattr(channel, kind)(f"/{service.full_name}/{method.name}")
    request: Any = iter([payload]) if method.client_streaming else payload
    try:
        response = stub(request, timeout=CALL_TIMEOUT, metadata=AUTH)
        if method.server_streaming:
            for _ in response:
                pass
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def check(
    channel: grpc.Channel, service: ServiceDescriptor, method: MethodDescriptor, payload: bytes
) -> None:
    code, details = call(channel, service, method, payload)
    where = f"{service.name}/{method.name} with {payload[:200]!r}"
    assert code not in FORBIDDEN, f"{where} -> {code.name}: {details}"
    hang = code == grpc.StatusCode.DEADLINE_EXCEEDED and not method.server_streaming
    assert not hang, f"{where} did not answer within {CALL_TIMEOUT} s"


def _serving(port: int, service: str) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        status = health_pb2_grpc.HealthStub(channel).Check(request, timeout=CALL_TIMEOUT).status
    return status == health_pb2.HealthCheckResponse.SERVING


def _examples() -> int:
    """Examples per property and RPC: a tenth of the profile's (10 in `ci`, 50 under `explore`)."""
    return max(5, settings.default.max_examples // 10)


def fuzz_method(channel: grpc.Channel, service: ServiceDescriptor, method: MethodDescriptor) -> None:
    """Both properties for one RPC."""
    fuzz = settings(max_examples=_examples(), suppress_health_check=list(HealthCheck))

    @fuzz
    @given(messages(method.input_type))
    def hostile_values(msg: Message) -> None:
        check(channel, service, method, msg.SerializeToString())

    @fuzz
    @given(undecodable(method.input_type))
    def undecodable_bytes(payload: bytes) -> None:
        check(channel, service, method, payload)

    hostile_values()
    undecodable_bytes()


# -- the properties ------------------------------------------------------------------------------


def test_every_service_has_a_fuzz_target():
    assert set(SERVICES) == set(TARGETS), "add a server for each new service to TARGETS"


@pytest.mark.parametrize("service_name", sorted(SERVICES))
def test_fuzzed_requests_never_fail_internally(service_name: str, request: pytest.FixtureRequest):
    service = SERVICES[service_name]
    app = TARGETS[service_name](request)
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        for method in service.methods:
            fuzz_method(channel, service, method)
    assert _serving(app.port, service_name), f"{service_name} is no longer SERVING after the fuzz"
