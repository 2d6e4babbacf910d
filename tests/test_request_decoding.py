"""The request-decoding layer (common/runtime/requests.py) and the checks it relies on: undecodable
bytes, non-finite floats, deep or big Structs and long strings answer INVALID_ARGUMENT naming the RPC
and the field (issue 10 items 7 and 8); names are matched in full (item 9); client-named paths are
bounded before any filesystem call."""

from __future__ import annotations

import math

import grpc
import pytest
from google.protobuf import struct_pb2

from tests.fixtures.grpc import TEST_TOKEN, make_test_config
from tokenmill.common.config import RequestLimitsConfig
from tokenmill.common.errors import InvalidArgument
from tokenmill.common.inputs import check_input_allowed
from tokenmill.common.names import validate_file_name, validate_name, validate_tag
from tokenmill.common.runtime.proto_struct import dict_to_struct, struct_to_dict
from tokenmill.common.runtime.requests import Rejected, check_message, checked_deserializer
from tokenmill.services.trainer.planner import Planner
from tokenmill.v1 import checkpoint_pb2, trainer_pb2

AUTH = (("authorization", f"Bearer {TEST_TOKEN}"),)
LIMITS = RequestLimitsConfig()
BAD_UTF8_REF = b"\x0a\x02\xff\xfe"  # field 1 (a string), two bytes that are not UTF-8
CORRUPT = b"\xff\xff\xff\xff"  # a field tag whose varint never ends


def nested_struct(depth: int) -> struct_pb2.Struct:
    inner = struct_pb2.Struct()
    inner["leaf"] = 1
    for _ in range(depth - 1):
        outer = struct_pb2.Struct()
        outer.fields["x"].struct_value.CopyFrom(inner)
        inner = outer
    return inner


def raw_call(port: int, method: str, payload: bytes, *, streaming_request: bool = False) -> grpc.RpcError:
    """Send `payload` as the request bytes of `method`; return the error (the call must fail)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        if streaming_request:
            call = channel.stream_unary(method)
            args: object = iter([payload])
        else:
            call = channel.unary_unary(method)
            args = payload
        with pytest.raises(grpc.RpcError) as info:
            call(args, timeout=10, metadata=AUTH)
    return info.value


# -- the generic checks --------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["lr", "min_lr", "weight_decay", "grad_clip"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_named(field, value):
    problem = check_message(trainer_pb2.SubmitTrainRequest(**{field: value}), LIMITS)
    assert problem and problem.startswith(f"{field}={value!r} is not a finite number")


def test_non_finite_inside_nested_messages_and_structs_is_named():
    request = trainer_pb2.SubmitTrainRequest(lora=trainer_pb2.LoraConfig(alpha=math.nan))
    assert check_message(request, LIMITS).startswith("lora.alpha=nan is not a finite number")
    request = trainer_pb2.SubmitTrainRequest()
    request.model_overrides.update({"layers": [1, {"width": math.inf}]})
    assert check_message(request, LIMITS).startswith("model_overrides.layers[1].width=inf is not")


def test_struct_depth_size_and_strings_are_bounded():
    limits = RequestLimitsConfig(max_struct_depth=5, max_struct_values=50, max_string_chars=1024)
    deep = trainer_pb2.SubmitTrainRequest(model_overrides=nested_struct(6))
    assert "nested more than 5 levels" in check_message(deep, limits)
    assert check_message(trainer_pb2.SubmitTrainRequest(model_overrides=nested_struct(5)), limits) is None
    big = trainer_pb2.SubmitTrainRequest()
    big.model_overrides.update({f"k{i}": i for i in range(51)})
    assert "more than 50 values" in check_message(big, limits)
    long = trainer_pb2.SubmitTrainRequest(sft_data="a" * 1025)
    assert check_message(long, limits).startswith("sft_data is 1,025 characters")
    assert check_message(trainer_pb2.SubmitTrainRequest(sft_data="a" * 1024, lr=3e-4), limits) is None


def test_deserializer_never_raises():
    parse = checked_deserializer(checkpoint_pb2.GetCheckpointRequest.FromString, LIMITS)
    for payload in (BAD_UTF8_REF, CORRUPT):
        assert isinstance(parse(payload), Rejected)
    assert parse(checkpoint_pb2.GetCheckpointRequest(ref="m").SerializeToString()).ref == "m"
    raw = checked_deserializer(lambda data: memoryview(data), LIMITS)  # custom codecs pass through
    assert isinstance(raw(b"abc"), memoryview)


# -- names and paths -----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["\n", "\r\n", "\n\n"])
def test_names_tags_and_files_are_matched_in_full(suffix):
    with pytest.raises(InvalidArgument):
        validate_name("ok-name" + suffix, what="dataset")
    with pytest.raises(InvalidArgument):
        validate_tag("best" + suffix)
    with pytest.raises(InvalidArgument):
        validate_file_name("dir/config.json" + suffix)
    assert validate_name("ok-name") == "ok-name"


def test_oversized_paths_are_invalid_before_the_filesystem(tmp_path):
    with pytest.raises(InvalidArgument, match="the limit is 4096"):
        check_input_allowed(str(tmp_path / ("a" * 100_000)), [], what="sft_data")
    with pytest.raises(InvalidArgument, match="longer than 255 bytes"):
        check_input_allowed(str(tmp_path / ("é" * 200) / "x"), [], what="tokenizer")
    assert check_input_allowed(str(tmp_path / "ok.jsonl"), []) == str(tmp_path / "ok.jsonl")


# -- over the wire -------------------------------------------------------------------------------


def test_undecodable_requests_are_invalid_argument_on_plain_and_custom_codecs(ckpt):
    for method, streaming in (
        ("/tokenmill.v1.CheckpointService/GetCheckpoint", False),
        ("/tokenmill.v1.CheckpointService/UploadChunks", True),  # the raw zero-copy codec
    ):
        for payload in (BAD_UTF8_REF, CORRUPT):
            err = raw_call(ckpt.app.port, method, payload, streaming_request=streaming)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, payload, err.details())
            assert method in err.details()


def test_struct_nested_too_deep_and_nan_in_struct_are_invalid_argument(ckpt):
    manifest = checkpoint_pb2.CheckpointManifest(config=nested_struct(LIMITS.max_struct_depth + 1))
    request = checkpoint_pb2.BeginUploadRequest(name="m", manifest=manifest)
    method = "/tokenmill.v1.CheckpointService/BeginUpload"
    err = raw_call(ckpt.app.port, method, request.SerializeToString())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "manifest.config" in err.details()
    request.manifest.config.Clear()
    request.manifest.metrics.update({"loss": math.nan})
    err = raw_call(ckpt.app.port, method, request.SerializeToString())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "manifest.metrics.loss=nan is not a finite number" in err.details()
    deeper = b"".join(_struct_levels(60))  # past protobuf's own recursion limit: not decodable
    err = raw_call(ckpt.app.port, method, b"\x12" + _varint(len(deeper)) + deeper)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "could not be decoded" in err.details()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _struct_levels(depth: int) -> list[bytes]:
    """CheckpointManifest.config (field 3) holding a Struct nested `depth` deep, as raw bytes."""
    body = b""
    for _ in range(depth):  # Struct{fields: {"x": Value{struct_value: body}}}
        value = b"\x2a" + _varint(len(body)) + body
        entry = b"\x0a\x01x" + b"\x12" + _varint(len(value)) + value
        body = b"\x0a" + _varint(len(entry)) + entry
    return [b"\x1a", _varint(len(body)), body]


@pytest.mark.slow
@pytest.mark.parametrize("field", ["lr", "min_lr", "weight_decay", "grad_clip"])
def test_trainer_rejects_non_finite_hyperparameters(trainer_service, field):
    request = trainer_pb2.SubmitTrainRequest(
        mode="pretrain", dataset="stories", output_name="out", **{field: math.nan}
    )
    for rpc in ("SubmitTrain", "ValidateTrain"):
        err = raw_call(
            trainer_service.app.port, f"/tokenmill.v1.TrainerService/{rpc}", request.SerializeToString()
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert f"{field}=nan is not a finite number" in err.details()


@pytest.mark.slow
def test_trainer_rejects_an_oversized_sft_path(trainer_service):
    request = trainer_pb2.SubmitTrainRequest(
        mode="sft", dataset="stories", output_name="out", sft_data="/tmp/" + "a" * 100_000
    )
    err = raw_call(
        trainer_service.app.port, "/tokenmill.v1.TrainerService/ValidateTrain", request.SerializeToString()
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "sft_data" in err.details()


def test_struct_to_dict_keeps_non_finite_numbers_instead_of_raising():
    struct = dict_to_struct({"loss": math.nan, "steps": [1, math.inf], "lr": 3e-4, "deep": {"n": 2}})
    plain = struct_to_dict(struct)
    assert math.isnan(plain["loss"]) and plain["steps"] == [1, math.inf]
    assert plain["lr"] == 3e-4 and plain["deep"] == {"n": 2} and isinstance(plain["deep"]["n"], int)


@pytest.mark.parametrize("field", ["lr", "min_lr", "weight_decay", "grad_clip"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", math.nan, math.inf])
def test_planner_rejects_non_finite_json_spec_values(tmp_path, field, value):
    """The spec is the request as JSON (NaN became the string "NaN"); the planner names the field."""
    planner = Planner(tmp_path, None)
    with pytest.raises(InvalidArgument, match=f"^{field} must be a finite number"):
        planner.to_config({"mode": "sft", "output_name": "out", field: value})


def test_unauthenticated_garbage_is_unauthenticated_not_decoded(ckpt):
    with grpc.insecure_channel(f"127.0.0.1:{ckpt.app.port}") as channel:
        call = channel.unary_unary("/tokenmill.v1.CheckpointService/GetCheckpoint")
        with pytest.raises(grpc.RpcError) as info:
            call(CORRUPT, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_request_limits_are_configurable_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENMILL_REQUEST_LIMITS__MAX_STRUCT_DEPTH", "4")
    monkeypatch.setenv("TOKENMILL_REQUEST_LIMITS__MAX_STRING_CHARS", "4096")
    limits = make_test_config(tmp_path).request_limits
    assert (limits.max_struct_depth, limits.max_string_chars, limits.max_struct_values) == (4, 4096, 10_000)
