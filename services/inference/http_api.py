"""OpenAI-compatible HTTP front on the router: `/v1/completions` (SSE streaming) and `/v1/models`.

Existing tools (the openai SDK, curl, load generators) talk to tokenmill through it. Requests are
routed exactly like gRPC ones (RouterDispatcher); a client that disconnects mid-stream cancels
the request on its replica. Bearer-token auth uses the platform's tokens, and the listener uses the
platform's TLS settings (`config.tls`, mutual TLS when `client_ca_file` is set), like the gRPC port.
"""

from __future__ import annotations

import hmac
import json
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from tokenmill.common.config import Config
from tokenmill.common.errors import InvalidArgument, TokenmillError
from tokenmill.common.runtime import StartupError
from tokenmill.services.inference.convert import ResponseBuilder
from tokenmill.services.inference.dispatch.failover import RouterDispatcher
from tokenmill.v1 import inference_pb2

log = logging.getLogger(__name__)

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


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": code.lower(), "code": code}}


def error_response(exc: TokenmillError) -> JSONResponse:
    return JSONResponse(error_body(exc.code, exc.message), status_code=HTTP_STATUS.get(exc.code, 500))


def completion_request(body: Any) -> tuple[inference_pb2.GenerateRequest, bool, bool]:
    """OpenAI completion JSON -> (GenerateRequest, stream?, include usage in stream?)."""
    if not isinstance(body, dict):
        raise InvalidArgument("the body must be a JSON object")
    prompt = body.get("prompt")
    req = inference_pb2.GenerateRequest(model=str(body.get("model") or ""))
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        req.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and t >= 0 for t in prompt):
        req.prompt_token_ids.extend(prompt)
    elif prompt in (None, "", []):
        raise InvalidArgument("'prompt' is empty")
    else:
        raise InvalidArgument(
            "'prompt' must be a string or a list of token ids (batched prompts: one request each)"
        )
    if int(body.get("n", 1) or 1) != 1 or int(body.get("best_of", 1) or 1) != 1:
        raise InvalidArgument("only n=1 and best_of=1 are supported")
    sp = req.sampling
    try:
        max_tokens = body.get("max_tokens", 16)
        if max_tokens is not None:
            max_tokens = int(max_tokens)
            if max_tokens <= 0:
                raise InvalidArgument(f"'max_tokens' must be > 0, got {max_tokens}")
            sp.max_tokens = max_tokens
        for key in ("temperature", "top_p", "repetition_penalty"):
            if body.get(key) is not None:
                setattr(sp, key, float(body[key]))
        if body.get("top_k") is not None:
            top_k = int(body["top_k"])
            if top_k < 0:
                top_k = 0  # vLLM: -1 means off
            sp.top_k = top_k
        if body.get("seed") is not None:
            sp.seed = int(body["seed"]) & 0xFFFFFFFFFFFFFFFF
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        for s in stop or []:
            if not isinstance(s, str) or not s:
                raise InvalidArgument("'stop' must be a string or a list of non-empty strings")
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidArgument(f"stop string {s!r} is not valid UTF-8") from None
            sp.stop.append(s)
        sp.stop_token_ids.extend(int(t) for t in body.get("stop_token_ids") or [])
        sp.logprobs = bool(body.get("logprobs"))
        sp.ignore_eos = bool(body.get("ignore_eos", False))
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"bad completion parameter: {exc}") from None
    req.adapter = str(body.get("adapter") or "")
    req.request_id = f"cmpl-{uuid.uuid4().hex}"
    opts = body.get("stream_options") or {}
    return req, bool(body.get("stream", False)), bool(isinstance(opts, dict) and opts.get("include_usage"))


def _usage(u: inference_pb2.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


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


def build_app(dispatcher: RouterDispatcher, tokens: list[str] | None) -> Starlette:
    """The Starlette app; `tokens=None` disables auth (see `bearer_checker`)."""
    authorized = bearer_checker(tokens)

    def unauthorized() -> JSONResponse:
        return JSONResponse(
            error_body("UNAUTHENTICATED", "missing or wrong bearer token (Authorization: Bearer <token>)"),
            status_code=401,
        )

    async def models(request: Request) -> JSONResponse:
        if not authorized(request):
            return unauthorized()
        replicas = await run_in_threadpool(dispatcher.replicas)
        names = sorted({r.model for r in replicas})
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "tokenmill", "root": n} for n in names]
        return JSONResponse({"object": "list", "data": data})

    async def completions(request: Request):
        if not authorized(request):
            return unauthorized()
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return error_response(InvalidArgument(f"the body is not valid JSON: {exc}"))
        try:
            req, stream, include_usage = completion_request(body)
        except TokenmillError as exc:
            return error_response(exc)
        created = int(time.time())
        # Routing errors (bad model, no replicas) are HTTP errors, not SSE events.
        try:
            replicas = await run_in_threadpool(dispatcher.replicas)
            dispatcher.check_model(req.model, replicas)
        except TokenmillError as exc:
            return error_response(exc)
        name = req.model.split(":")[0]
        model = next((r.model for r in replicas if not name or r.name == name), req.model)
        active = threading.Event()
        active.set()

        if not stream:

            def run() -> inference_pb2.GenerateResponse:
                builder = ResponseBuilder(req.request_id)
                for chunk in dispatcher.stream(req, active.is_set):
                    builder.add(chunk)
                return builder.build()

            try:
                resp = await run_in_threadpool(run)
            except TokenmillError as exc:
                return error_response(exc)
            finally:
                active.clear()
            choice = {"index": 0, "text": resp.text, "finish_reason": resp.finish_reason, "logprobs": None}
            if req.sampling.logprobs:
                choice["logprobs"] = {
                    "token_ids": list(resp.token_ids),
                    "token_logprobs": list(resp.logprobs),
                }
            return JSONResponse(
                {
                    "id": req.request_id,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [choice],
                    "usage": _usage(resp.usage),
                }
            )

        async def events():
            gen = dispatcher.stream(req, active.is_set)
            try:
                async for chunk in iterate_in_threadpool(gen):
                    choice = {
                        "index": 0,
                        "text": chunk.text,
                        "finish_reason": chunk.finish_reason or None,
                        "logprobs": {
                            "token_ids": list(chunk.token_ids),
                            "token_logprobs": list(chunk.logprobs),
                        }
                        if req.sampling.logprobs
                        else None,
                    }
                    event = {
                        "id": req.request_id,
                        "object": "text_completion",
                        "created": created,
                        "model": model,
                        "choices": [choice],
                    }
                    yield f"data: {json.dumps(event)}\n\n"
                    if chunk.finish_reason and include_usage and chunk.HasField("usage"):
                        usage_event: dict[str, Any] = {
                            "id": req.request_id,
                            "object": "text_completion",
                            "created": created,
                            "model": model,
                            "choices": [],
                            "usage": _usage(chunk.usage),
                        }
                        yield f"data: {json.dumps(usage_event)}\n\n"
            except TokenmillError as exc:
                yield f"data: {json.dumps(error_body(exc.code, exc.message))}\n\n"
            finally:
                active.clear()  # a disconnected client: the dispatcher cancels on its next poll
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    return Starlette(
        routes=[
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ]
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

    def __init__(self, dispatcher: RouterDispatcher, config: Config, host: str, port: int):
        tokens = None if config.auth.disabled else list(config.auth.tokens)
        self.app = build_app(dispatcher, tokens)
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
