"""OpenAI-compatible HTTP front on the router: `/v1/completions`, `/v1/chat/completions` (both with
SSE streaming), `/v1/models`, and `/health` and `/metrics` for probes and Prometheus.

Existing tools (the openai SDK, curl, load generators) talk to tokenmill through it. Requests are
routed exactly like gRPC ones (RouterDispatcher); a client that disconnects mid-stream cancels
the request on its replica. Bearer-token auth uses the platform's tokens, and the listener uses the
platform's TLS settings (`config.tls`, mutual TLS when `client_ca_file` is set), like the gRPC port.
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import redis
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tokenmill.common.config import Config, InferenceLimitsConfig
from tokenmill.common.errors import NotFound, TokenmillError
from tokenmill.common.runtime import StartupError
from tokenmill.services.inference.convert import ResponseBuilder
from tokenmill.services.inference.dispatch.failover import RouterDispatcher
from tokenmill.services.inference.dispatch.protocol import ReplicaInfo
from tokenmill.services.inference.dispatch.selector import Selector
from tokenmill.services.inference.openai_request import (
    chat_request,
    completion_request,
    parse_json,
    read_capped,
)
from tokenmill.services.inference.openai_response import ChatFormat, CompletionFormat, usage
from tokenmill.v1 import inference_pb2

log = logging.getLogger(__name__)

Parse = Callable[[Any, InferenceLimitsConfig], tuple[inference_pb2.GenerateRequest, bool, bool]]

HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "OUT_OF_RANGE": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


def served_as(model: str, live: list[ReplicaInfo]) -> str:
    """The ref a response names: the one the request's selector matched (an adapter's own, not its
    base's), or the request's model while no replica is live (it queues)."""
    selector = Selector.parse(model)
    matched = (s.ref for r in live for s in r.serving() if selector is None or selector.matches(s))
    return next(matched, model)


def model_card(model_id: str, root: str) -> dict[str, Any]:
    """One OpenAI model object; `root` is the served `name:version` ref it resolves to."""
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "tokenmill", "root": root}


def model_list(replicas: list[ReplicaInfo]) -> list[dict[str, Any]]:
    """Every model a request may name: each base model and each LoRA adapter served over one (an
    adapter is addressable as a model, so clients that list before they call must see it), the
    adapter's card naming its base as `parent`, as vLLM's does."""
    cards: dict[str, dict[str, Any]] = {}
    for r in replicas:
        cards.setdefault(r.model, model_card(r.model, r.model))
        for ref in r.adapters:
            cards.setdefault(ref, {**model_card(ref, ref), "parent": r.model})
    return [cards[ref] for ref in sorted(cards)]


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": code.lower(), "code": code}}


def error_response(exc: TokenmillError) -> JSONResponse:
    """`exc` as an OpenAI-style error; request errors may carry their own `http_status` (413, 422)."""
    status = getattr(exc, "http_status", None) or HTTP_STATUS.get(exc.code, 500)
    return JSONResponse(error_body(exc.code, exc.message), status_code=status)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (unknown route 404, wrong method 405) in the same OpenAI shape."""
    assert isinstance(exc, HTTPException)
    body = error_body("NOT_FOUND" if exc.status_code == 404 else "INVALID_ARGUMENT", str(exc.detail))
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def collect(
    request_id: str, first: inference_pb2.GenerateChunk | None, rest: Iterator[inference_pb2.GenerateChunk]
) -> inference_pb2.GenerateResponse:
    """The whole response from the first chunk and the ones after it."""
    builder = ResponseBuilder(request_id)
    for chunk in itertools.chain([first] if first is not None else [], rest):
        builder.add(chunk)
    return builder.build()


def stream_events(
    chunk: inference_pb2.GenerateChunk, head: dict[str, Any], fmt: Any, include_usage: bool
) -> list[str]:
    """The SSE events for one chunk: its choice, and the usage event after the last one if asked."""
    events = [{**head, "object": fmt.chunk_object, "choices": [fmt.stream_choice(chunk)]}]
    if chunk.finish_reason and include_usage and chunk.HasField("usage"):
        events.append({**head, "object": fmt.chunk_object, "choices": [], "usage": usage(chunk.usage)})
    return [f"data: {json.dumps(e)}\n\n" for e in events]


def bearer_checker(tokens: list[str] | None) -> Callable[[Request], bool]:
    """`authorized(request)` for these tokens; `None` means auth is disabled (everyone is let in).

    An empty list lets nobody in: only an explicit `auth.disabled` opens the door. Tokens are
    compared as bytes (`hmac.compare_digest` raises TypeError on non-ASCII str), so any header,
    however malformed, is a 401 and never a 500."""
    if tokens is None:
        return lambda request: True
    expected = [t.encode("utf-8") for t in tokens]

    def authorized(request: Request) -> bool:
        header = request.headers.get("authorization", "")
        if header[:7].lower() != "bearer ":
            return False
        given = header[7:].encode("latin-1")  # ASGI headers are bytes that starlette decodes as latin-1
        # every token is compared (no short-circuit), so timing does not reveal which one matched
        return sum(hmac.compare_digest(given, t) for t in expected) > 0

    return authorized


def build_app(
    dispatcher: RouterDispatcher,
    tokens: list[str] | None,
    limits: InferenceLimitsConfig | None = None,
    registry: CollectorRegistry | None = None,
) -> Starlette:
    """The Starlette app; `tokens=None` disables auth (see `bearer_checker`); `limits` bound what
    a request body may hold (`config.inference_limits`), checked before any work is done on it;
    `/metrics` serves `registry` (the router process's; default: prometheus_client's global one).
    `/health` and `/metrics` are open, like the gRPC health service and metrics port: probes and
    scrapers carry no token, and they reveal only counts."""
    limits = limits or InferenceLimitsConfig()
    registry = registry or REGISTRY
    authorized = bearer_checker(tokens)

    def unauthorized() -> JSONResponse:
        return JSONResponse(
            error_body("UNAUTHENTICATED", "missing or wrong bearer token (Authorization: Bearer <token>)"),
            status_code=401,
        )

    async def models(request: Request) -> JSONResponse:
        if not authorized(request):
            return unauthorized()
        replicas = await run_in_threadpool(dispatcher.routable)
        return JSONResponse({"object": "list", "data": model_list(replicas)})

    async def model(request: Request) -> JSONResponse:
        """OpenAI's `models.retrieve`: the model a request could name `model` by (a listed
        `name:version`, a bare name or `name:tag`), 404 in OpenAI's error shape when none is served."""
        if not authorized(request):
            return unauthorized()
        name = request.path_params["model"]
        try:
            selector = Selector.parse(name)
            replicas = await run_in_threadpool(dispatcher.routable)
        except TokenmillError as exc:
            return error_response(exc)
        refs = sorted({s.ref for r in replicas for s in r.serving() if selector and selector.matches(s)})
        if not refs:
            served = sorted({r.model for r in replicas})
            return error_response(NotFound(f"model {name!r} is not served; served: {served or 'none'}"))
        return JSONResponse(model_card(name, refs[-1]))

    async def serve(request: Request, parse: Parse, make_format: Callable[[Any], Any]) -> Response:
        """Validate, route and answer one generation request. Everything known before the first
        token (a bad field, an unknown model, a full queue, a prompt over the context) is an HTTP
        status, streaming or not; only errors after it arrive as an in-stream error event."""
        if not authorized(request):
            return unauthorized()
        try:
            data = await read_capped(request.headers, request.stream(), limits.max_http_body_bytes)
            req, stream, include_usage = parse(parse_json(data, limits.max_json_depth), limits)
            live = await run_in_threadpool(dispatcher.targets, req.model)  # [] while it scales from zero
        except TokenmillError as exc:
            return error_response(exc)
        model = served_as(req.model, live)
        head = {"id": req.request_id, "created": int(time.time()), "model": model}
        fmt = make_format(req)
        active = threading.Event()
        active.set()
        chunks = dispatcher.stream(req, active.is_set)
        try:
            first = await run_in_threadpool(next, chunks, None)
        except TokenmillError as exc:
            active.clear()
            return error_response(exc)
        if not stream:
            try:
                resp = await run_in_threadpool(collect, req.request_id, first, chunks)
            except TokenmillError as exc:
                return error_response(exc)
            finally:
                active.clear()
            body = {**head, "object": fmt.object, "choices": [fmt.choice(resp)], "usage": usage(resp.usage)}
            return JSONResponse(body)

        async def events() -> AsyncIterator[str]:
            try:
                if first is not None:
                    for event in stream_events(first, head, fmt, include_usage):
                        yield event
                async for chunk in iterate_in_threadpool(chunks):
                    for event in stream_events(chunk, head, fmt, include_usage):
                        yield event
            except TokenmillError as exc:
                yield f"data: {json.dumps(error_body(exc.code, exc.message))}\n\n"
            finally:
                active.clear()  # a disconnected client: the dispatcher cancels on its next poll
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    async def completions(request: Request) -> Response:
        return await serve(request, completion_request, CompletionFormat)

    async def chat(request: Request) -> Response:
        return await serve(request, chat_request, ChatFormat)

    async def health(request: Request) -> JSONResponse:
        """200 when a live replica can take requests, else 503 (for probes and load balancers)."""
        try:
            replicas = await run_in_threadpool(dispatcher.replicas)
        except (TokenmillError, redis.RedisError) as exc:
            return JSONResponse(
                {"status": "unavailable", **error_body("UNAVAILABLE", f"Redis is unreachable: {exc}")}, 503
            )
        models = sorted({r.model for r in replicas})
        body = {
            "status": "ok" if replicas else "unavailable",
            "live_replicas": len(replicas),
            "models": models,
        }
        if not replicas:
            body["error"] = error_body("UNAVAILABLE", "no live inference replica")["error"]
        return JSONResponse(body, status_code=200 if replicas else 503)

    async def metrics(request: Request) -> Response:
        """The router process's Prometheus registry, in the text exposition format."""
        text = await run_in_threadpool(generate_latest, registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model:path}", model, methods=["GET"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
    )


def tls_options(config: Config) -> dict[str, Any]:
    """uvicorn's TLS keyword arguments for `config.tls`: server TLS when a certificate is set, and
    mutual TLS (a client certificate signed by `client_ca_file` required) when that is set too."""
    tls = config.tls
    if not tls.enabled:
        return {}
    options: dict[str, Any] = {"ssl_certfile": str(tls.cert_file), "ssl_keyfile": str(tls.key_file)}
    if tls.client_ca_file is not None:
        options["ssl_ca_certs"] = str(tls.client_ca_file)
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return options


class HttpFront:
    """uvicorn in a background thread (the router's gRPC server owns the main thread)."""

    def __init__(
        self,
        dispatcher: RouterDispatcher,
        config: Config,
        host: str,
        port: int,
        registry: CollectorRegistry | None = None,
    ):
        tokens = None if config.auth.disabled else list(config.auth.tokens)
        self.app = build_app(dispatcher, tokens, config.inference_limits, registry)
        self.tls = config.tls.enabled
        uv_config = uvicorn.Config(
            self.app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            **tls_options(config),
        )
        # Load now (certificates included), so a bad key or CA fails here with its reason, not as
        # a background thread that silently never starts.
        try:
            uv_config.load()
        except (OSError, ssl.SSLError) as exc:
            tls = config.tls
            raise StartupError(
                f"the HTTP front cannot load its TLS files (tls.cert_file={tls.cert_file}, "
                f"tls.key_file={tls.key_file}, tls.client_ca_file={tls.client_ca_file}): {exc}"
            ) from exc
        self.server = uvicorn.Server(uv_config)
        self.thread = threading.Thread(target=self.server.run, name="http-front", daemon=True)

    def start(self, timeout: float = 10.0) -> int:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise StartupError("the HTTP front did not start (port in use?)")
            time.sleep(0.02)
        return self.port

    @property
    def port(self) -> int:
        for server in self.server.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return 0

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
