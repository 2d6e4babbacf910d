"""The one request-decoding layer every RPC of every service passes through.

gRPC Python answers a request whose bytes do not parse (bad UTF-8 in a string, corrupt bytes, a
message nested past protobuf's recursion limit) with an opaque INTERNAL, and a decoded message can
still carry values no handler should see: NaN or infinity in a float field (a later comparison or
JSON round trip raises), a Struct nested or sized to cost more to walk than to send, a string long
enough to reach the filesystem ("File name too long"). `DecodeInterceptor` wraps every handler's
request deserializer (the generated ones and the custom raw codecs alike, so zero-copy chunks stay
zero-copy), checks the decoded message against the config's `request_limits` once, generically by
field type rather than a per-field list (a new field is covered), and turns any problem into
INVALID_ARGUMENT naming the RPC and the field.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import struct_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from tokenmill.common.config import RequestLimitsConfig as RequestLimits
from tokenmill.common.errors import InvalidArgument
from tokenmill.common.runtime.interceptors import Behavior, wrap_handler

_FLOATS = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE)
_STRUCT_TYPES = (struct_pb2.Struct.DESCRIPTOR.full_name, struct_pb2.ListValue.DESCRIPTOR.full_name)
_VALUE_TYPE = struct_pb2.Value.DESCRIPTOR.full_name


class Rejected:
    """Stands in for a request that failed decoding or its checks; the handler never sees it."""

    def __init__(self, reason: str):
        self.reason = reason


class _Walk:
    """One pass over a decoded message; each step returns the first violation found (None: clean)."""

    def __init__(self, limits: RequestLimits):
        self.limits = limits
        self.struct_values = 0

    def message(self, msg: Message, path: str) -> str | None:
        for field, value in msg.ListFields():
            where = f"{path}{field.name}"
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                problem = self._map(field, value, where)
            elif field.is_repeated:
                problem = self._first(self._one(field, v, f"{where}[{i}]") for i, v in enumerate(value))
            else:
                problem = self._one(field, value, where)
            if problem:
                return problem
        return None

    def _map(self, field: FieldDescriptor, mapping: Any, where: str) -> str | None:
        value_field = field.message_type.fields_by_name["value"]
        for key, value in mapping.items():
            problem = self._string(key, f"{where} key") if isinstance(key, str) else None
            problem = problem or self._one(value_field, value, f"{where}[{key!r}]")
            if problem:
                return problem
        return None

    def _one(self, field: FieldDescriptor, value: Any, where: str) -> str | None:
        if field.type in _FLOATS:
            return _finite(value, where)
        if field.type == FieldDescriptor.TYPE_STRING:
            return self._string(value, where)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.full_name in (*_STRUCT_TYPES, _VALUE_TYPE):
                return self.struct(value, where, 1)
            return self.message(value, f"{where}.")
        return None

    def _string(self, value: str, where: str) -> str | None:
        if len(value) > self.limits.max_string_chars:
            return (
                f"{where} is {len(value):,} characters; the limit is {self.limits.max_string_chars:,} "
                "(request_limits.max_string_chars)"
            )
        return None

    def struct(self, value: Message, where: str, depth: int) -> str | None:
        """A Struct, ListValue or Value: bounded in depth and total values, every number finite."""
        if depth > self.limits.max_struct_depth:
            return (
                f"{where} is nested more than {self.limits.max_struct_depth} levels deep "
                "(request_limits.max_struct_depth); flatten it"
            )
        if isinstance(value, struct_pb2.Struct):
            items: Any = ((f"{where}.{k}", k, v) for k, v in value.fields.items())
        elif isinstance(value, struct_pb2.ListValue):
            items = ((f"{where}[{i}]", None, v) for i, v in enumerate(value.values))
        else:
            return self._value(value, where, depth)
        for child_where, key, child in items:
            problem = (self._string(key, f"{where} key") if key is not None else None) or self._value(
                child, child_where, depth
            )
            if problem:
                return problem
        return None

    def _value(self, value: struct_pb2.Value, where: str, depth: int) -> str | None:
        self.struct_values += 1
        if self.struct_values > self.limits.max_struct_values:
            return (
                f"{where}: the request's Struct fields hold more than {self.limits.max_struct_values:,} "
                "values (request_limits.max_struct_values)"
            )
        kind = value.WhichOneof("kind")
        if kind == "number_value":
            return _finite(value.number_value, where)
        if kind == "string_value":
            return self._string(value.string_value, where)
        if kind == "struct_value":
            return self.struct(value.struct_value, where, depth + 1)
        if kind == "list_value":
            return self.struct(value.list_value, where, depth + 1)
        return None

    @staticmethod
    def _first(problems: Iterator[str | None]) -> str | None:
        return next((p for p in problems if p), None)


def _finite(value: float, where: str) -> str | None:
    if math.isfinite(value):
        return None
    return f"{where}={value!r} is not a finite number; NaN and infinity are never accepted"


def check_message(msg: Message, limits: RequestLimits) -> str | None:
    """The first way `msg` breaks `limits` (non-finite float, long string, deep or big Struct), or None."""
    return _Walk(limits).message(msg, "")


def checked_deserializer(
    deserialize: Callable[[bytes], Any], limits: RequestLimits
) -> Callable[[bytes], Any]:
    """`deserialize` that never raises: a failure or a limit broken yields `Rejected` instead.

    Custom codecs' results that are not protobuf messages (raw chunks) pass through unchecked."""

    def parse(data: bytes) -> Any:
        try:
            msg = deserialize(data)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the client's bytes
            return Rejected(
                f"the request could not be decoded ({type(exc).__name__}: {exc}); send a serialized "
                "message of the RPC's request type, with every string field valid UTF-8"
            )
        problem = check_message(msg, limits) if isinstance(msg, Message) else None
        return Rejected(problem) if problem else msg

    return parse


def _refuse(method: str, rejected: Rejected) -> InvalidArgument:
    return InvalidArgument(f"{method}: {rejected.reason}")


def _checked_stream(requests: Iterator[Any], method: str) -> Iterator[Any]:
    for request in requests:
        if isinstance(request, Rejected):
            raise _refuse(method, request)
        yield request


class DecodeInterceptor(grpc.ServerInterceptor):
    """Installs `checked_deserializer` on every handler and refuses a `Rejected` request with
    INVALID_ARGUMENT before the handler runs (streamed requests: when the handler reaches it).

    Sits inside the error interceptor, which maps the InvalidArgument to its status, and inside
    auth, so an unauthenticated caller learns nothing about its bytes."""

    def __init__(self, limits: RequestLimits):
        self._limits = limits

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        deserializer = checked_deserializer(handler.request_deserializer, self._limits)

        def wrap(behavior: Behavior, _streaming: bool) -> Behavior:
            if handler.request_streaming:
                return lambda requests, context: behavior(_checked_stream(requests, method), context)

            def checked(request: Any, context: grpc.ServicerContext) -> Any:
                if isinstance(request, Rejected):
                    raise _refuse(method, request)
                return behavior(request, context)

            return checked

        return wrap_handler(handler, wrap, request_deserializer=deserializer)
