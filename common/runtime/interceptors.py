"""Server interceptors: observe (log + metrics), authenticate, map errors.

All three work by wrapping the method handler's behaviour, so they apply equally to unary,
server-streaming, client-streaming and bidi handlers (streaming responses are wrapped as
generators, so an exception raised mid-stream is still mapped, logged and counted).

Order on the server (outermost first): observe -> auth -> errors -> decode (requests.py) -> handler.
Observe sees every outcome including UNAUTHENTICATED; errors sits next to the handler so domain
errors (the decode layer's InvalidArgument too) become statuses before anything else looks at them.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import grpc

from tokenmill.common import errors
from tokenmill.common.runtime.logs import request_id_var
from tokenmill.common.runtime.metrics import RpcMetrics

log = logging.getLogger("tokenmill.runtime")
access_log = logging.getLogger("tokenmill.rpc")

# Probes and tooling must work without a token (kubelet gRPC probes cannot send metadata).
OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
_SERVER_ERROR_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")

Behavior = Callable[[Any, grpc.ServicerContext], Any]
# wrap(behavior, streaming_response) -> new behavior
Wrapper = Callable[[Behavior, bool], Behavior]


def split_method(full_method: str) -> tuple[str, str]:
    """'/pkg.Service/Method' -> ('pkg.Service', 'Method')."""
    _, _, rest = full_method.partition("/")
    service, _, method = rest.partition("/")
    return service, method


def rpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    wrap: Wrapper,
    *,
    keep_non_blocking: bool = True,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """A copy of `handler` whose behaviour is `wrap(behaviour, response_streaming)` (and whose
    request deserializer is `request_deserializer`, when given).

    Handlers marked `experimental_non_blocking` (the health service's Watch: it answers through a
    callback instead of holding a worker thread) are returned unwrapped unless
    `keep_non_blocking=False`, because wrapping would turn them back into thread-holding streams."""
    behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    if keep_non_blocking and getattr(behavior, "experimental_non_blocking", False):
        return handler
    kwargs = {
        "request_deserializer": request_deserializer or handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream, True), **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary, False), **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream, True), **kwargs)
    return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, False), **kwargs)


def _metadata(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for k, v in details.invocation_metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("latin-1")
    return None


def _aborted(context: grpc.ServicerContext) -> bool:
    code = context.code()
    return code is not None and code != grpc.StatusCode.OK


class ErrorInterceptor(grpc.ServerInterceptor):
    """`TokenmillError` -> its status code and message; anything else -> INTERNAL with a request id
    (the traceback goes to the server log, never to the client)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def wrap(behavior: Behavior, streaming: bool) -> Behavior:
            if streaming:

                def streaming_behavior(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                    try:
                        yield from behavior(request, context)
                    except Exception as exc:  # noqa: BLE001 - mapping every error is the point
                        _abort_for(exc, context, method)

                return streaming_behavior

            def unary_behavior(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    return behavior(request, context)
                except Exception as exc:  # noqa: BLE001
                    _abort_for(exc, context, method)

            return unary_behavior

        return wrap_handler(handler, wrap)


def _abort_for(exc: Exception, context: grpc.ServicerContext, method: str) -> None:
    if isinstance(exc, errors.TokenmillError):
        code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)
        if code in _SERVER_ERROR_CODES:
            log.error("%s failed: %s", method, exc.message, exc_info=exc)
        context.abort(code, exc.message)
    if _aborted(context):  # the handler (or an inner layer) already chose a status
        raise exc
    request_id = request_id_var.get() or uuid.uuid4().hex[:16]
    log.error("unhandled exception in %s (request id %s)", method, request_id, exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error (see server log, request id {request_id})")


class AuthInterceptor(grpc.ServerInterceptor):
    """Bearer tokens from `authorization` metadata, compared in constant time.

    Health and reflection stay open so probes and grpcurl's `list` work without a token."""

    def __init__(self, tokens: Sequence[str], open_services: Iterable[str] = OPEN_SERVICES):
        if not tokens:
            raise ValueError("AuthInterceptor needs at least one token (or turn auth off in the config)")
        self._tokens = [t.encode() for t in tokens]
        self._open = frozenset(open_services)

    def _valid(self, presented: str) -> bool:
        candidate = presented.encode("utf-8", "replace")
        matched = False
        for token in self._tokens:  # no early exit: timing does not reveal which token matched
            matched |= hmac.compare_digest(candidate, token)
        return matched

    def _reason(self, header: str | None) -> str | None:
        if header is None:
            return (
                "missing credentials: send metadata 'authorization: Bearer <token>' "
                "with a token from the server's auth.tokens"
            )
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "malformed 'authorization' metadata: expected 'Bearer <token>'"
        if not self._valid(token.strip()):
            return "invalid bearer token: it is not one of the server's auth.tokens"
        return None

    def intercept_service(self, continuation, handler_call_details):
        service, _ = split_method(handler_call_details.method)
        if service in self._open:
            return continuation(handler_call_details)
        reason = self._reason(_metadata(handler_call_details, "authorization"))
        handler = continuation(handler_call_details)
        if reason is None or handler is None:
            return handler

        def wrap(behavior: Behavior, streaming: bool) -> Behavior:
            def deny(request: Any, context: grpc.ServicerContext) -> Any:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

            return deny

        return wrap_handler(handler, wrap, keep_non_blocking=False)


class ObserveInterceptor(grpc.ServerInterceptor):
    """One access-log line and the Prometheus series per RPC; sets the request id."""

    def __init__(self, metrics: RpcMetrics | None, quiet_services: Iterable[str] = OPEN_SERVICES):
        self._metrics = metrics
        self._quiet = frozenset(quiet_services)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        full = handler_call_details.method
        service, method = split_method(full)
        kind = rpc_type(handler)
        supplied = _metadata(handler_call_details, "x-request-id")
        quiet = service in self._quiet
        observer = self

        def wrap(behavior: Behavior, streaming: bool) -> Behavior:
            if streaming:

                def streaming_behavior(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                    rpc = _Rpc(observer, service, method, kind, supplied, quiet)
                    error: BaseException | None = None
                    try:
                        yield from behavior(request, context)
                    except GeneratorExit:  # the client went away mid-stream
                        rpc.cancelled = True
                        raise
                    except BaseException as exc:
                        error = exc
                        raise
                    finally:
                        rpc.finish(context, error)

                return streaming_behavior

            def unary_behavior(request: Any, context: grpc.ServicerContext) -> Any:
                rpc = _Rpc(observer, service, method, kind, supplied, quiet)
                error: BaseException | None = None
                try:
                    return behavior(request, context)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    rpc.finish(context, error)

            return unary_behavior

        return wrap_handler(handler, wrap)


class _Rpc:
    """Bookkeeping for one RPC between its start and its status."""

    def __init__(
        self,
        observer: ObserveInterceptor,
        service: str,
        method: str,
        kind: str,
        supplied: str | None,
        quiet: bool,
    ):
        self.observer = observer
        self.service, self.method, self.kind, self.quiet = service, method, kind, quiet
        self.request_id = (
            supplied if supplied and _REQUEST_ID_RE.fullmatch(supplied) else uuid.uuid4().hex[:16]
        )
        self.cancelled = False
        self.start = time.perf_counter()
        request_id_var.set(self.request_id)
        metrics = observer._metrics
        if metrics is not None:
            metrics.started.labels(kind, service, method).inc()
            metrics.in_flight.labels(service, method).inc()

    def _code(self, context: grpc.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
        code = context.code()
        if code is not None:
            return code
        if self.cancelled or error is not None or not context.is_active():
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                return grpc.StatusCode.DEADLINE_EXCEEDED
            if self.cancelled or not context.is_active():
                return grpc.StatusCode.CANCELLED
            return grpc.StatusCode.UNKNOWN
        return grpc.StatusCode.OK

    def finish(self, context: grpc.ServicerContext, error: BaseException | None) -> None:
        duration = time.perf_counter() - self.start
        code = self._code(context, error)
        metrics = self.observer._metrics
        if metrics is not None:
            metrics.handled.labels(self.kind, self.service, self.method, code.name).inc()
            metrics.latency.labels(self.kind, self.service, self.method).observe(duration)
            metrics.in_flight.labels(self.service, self.method).dec()
        if self.quiet and code == grpc.StatusCode.OK:
            level = logging.DEBUG
        elif code in _SERVER_ERROR_CODES:
            level = logging.ERROR
        else:
            level = logging.INFO
        if access_log.isEnabledFor(level):
            details = context.details() if code != grpc.StatusCode.OK else None
            access_log.log(
                level,
                "rpc",
                extra={
                    "grpc_service": self.service,
                    "grpc_method": self.method,
                    "grpc_type": self.kind,
                    "grpc_code": code.name,
                    "duration_ms": round(duration * 1000, 3),
                    "peer": context.peer(),
                    "request_id": self.request_id,
                    **({"details": _text(details)} if details else {}),
                },
            )
        request_id_var.set("")


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
