"""Servicer adders built from a proto's service descriptor, for services with a custom codec.

The generated `add_XServicer_to_server` fixes every RPC's (de)serializers. Services that need raw
bytes for some RPCs (the checkpoint store's zero-copy chunks) used to copy that table by hand,
which silently misses an RPC added to the proto.
`servicer_adder` derives the table from the descriptor instead: every RPC the proto declares is
registered, with its streaming kind and message classes, and only the codecs named here differ.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

Deserializer = Callable[[bytes], Any]
Serializer = Callable[[Any], bytes]
Adder = Callable[[Any, grpc.Server], None]


@dataclass(frozen=True)
class RawCodec:
    """Raw-bytes (de)serializers for one RPC; None keeps the message class's own."""

    request_deserializer: Deserializer | None = None
    response_serializer: Serializer | None = None


def _handler_factory(method: MethodDescriptor) -> Callable[..., grpc.RpcMethodHandler]:
    """The grpc constructor for this RPC's streaming kind."""
    return {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(method.client_streaming, method.server_streaming)]


def _checked(service: ServiceDescriptor, codecs: Mapping[str, RawCodec] | None) -> dict[str, RawCodec]:
    """`codecs` as a dict; naming an RPC the service does not declare is a programming error."""
    codecs = dict(codecs or {})
    unknown = set(codecs) - {m.name for m in service.methods}
    if unknown:
        raise ValueError(f"codecs for RPCs {sorted(unknown)} that {service.full_name} does not declare")
    return codecs


def method_handlers(
    service: ServiceDescriptor,
    servicer: Any,
    *,
    codecs: Mapping[str, RawCodec] | None = None,
) -> dict[str, grpc.RpcMethodHandler]:
    """One handler per RPC of `service`, keyed by method name (the generated adder's table).

    `codecs`: per-RPC overrides by method name; a name the service does not declare is an error."""
    codecs = _checked(service, codecs)
    handlers = {}
    for method in service.methods:
        request_cls = GetMessageClass(method.input_type)
        response_cls = GetMessageClass(method.output_type)
        codec = codecs.get(method.name, RawCodec())
        handlers[method.name] = _handler_factory(method)(
            getattr(servicer, method.name),
            request_deserializer=codec.request_deserializer or request_cls.FromString,
            response_serializer=codec.response_serializer or response_cls.SerializeToString,
        )
    return handlers


def servicer_adder(
    service: ServiceDescriptor,
    *,
    codecs: Mapping[str, RawCodec] | None = None,
) -> Adder:
    """An `app.add` adder like the generated one, with the codecs of `method_handlers`."""
    _checked(service, codecs)  # a typo fails at import, not at the first start

    def add(servicer: Any, server: grpc.Server) -> None:
        handlers = method_handlers(service, servicer, codecs=codecs)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
        server.add_registered_method_handlers(service.full_name, handlers)

    add.__doc__ = f"Register a {service.full_name} servicer (every RPC of the proto; custom codecs)."
    return add
