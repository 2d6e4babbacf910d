"""Fuzzing the OpenAI HTTP front: every route, generated hostile JSON and raw bytes.

Routes are enumerated from the app, so a new one is covered without editing this file. For each,
Hypothesis sends completion-shaped bodies with hostile values, arbitrary JSON, deep nesting and
undecodable bytes, and asserts: never a server error (the one 5xx allowed is 503 UNAVAILABLE, the
routing answer for a valid request when no replica runs), always an OpenAI-style error body, an
answer within the client timeout (no hang), and the front still healthy afterwards.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.routing import Route

from tests.fixtures.grpc import TEST_TOKEN, make_test_config
from tokenmill.common.config import Config
from tokenmill.common.redis_conn import connect_url
from tokenmill.services.inference.dispatch.failover import RouterDispatcher
from tokenmill.services.inference.http_api import HttpFront

FIELDS = [
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed",
    "stop", "stop_token_ids", "logprobs", "ignore_eos", "n", "best_of", "logit_bias", "stream",
    "stream_options", "adapter", "echo", "suffix", "messages", "max_completion_tokens", "top_logprobs",
    "frequency_penalty", "presence_penalty", "response_format", "tools",
]  # fmt: skip

# Text with lone surrogates, NULs and non-BMP characters; json.dumps spells surrogates as \udXXX.
hostile_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**31, max_value=2**80),
    st.integers(max_value=-1),
    st.floats(allow_nan=False, allow_infinity=False),
    hostile_text,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(hostile_text, inner, max_size=5),
    max_leaves=20,
)
completion_bodies = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8)


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()


bodies = st.one_of(
    completion_bodies.map(encode),
    json_values.map(encode),
    st.integers(1, 20_000).map(lambda n: b"[" * n),
    st.integers(1, 5_000).map(lambda n: b'{"prompt":' * n),
    st.sampled_from([b"NaN", b'{"temperature": Infinity}', b"1" * 5000, b"", b"\xff\xfe{"]),
    st.binary(max_size=200),
)


@pytest.fixture
def front(redis_url: str, redis_client, tmp_path: Path) -> Iterator[HttpFront]:
    dispatcher = RouterDispatcher(connect_url(redis_url), dead_after_s=1.0, no_replica_timeout_s=1.0)
    config: Config = make_test_config(tmp_path, inference_limits={"max_http_body_bytes": 64 * 1024})
    front = HttpFront(dispatcher, config, "127.0.0.1", 0)
    front.start()
    yield front
    front.stop()


def send(front: HttpFront, method: str, path: str, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=20)
    try:
        headers = {"Authorization": f"Bearer {TEST_TOKEN}", "Content-Type": "application/json"}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def check_answer(status: int, payload: bytes, path: str = "") -> None:
    """No server error for bad input, and every refusal is an OpenAI-style error (`/metrics` answers
    Prometheus text whatever the body)."""
    if path == "/metrics":
        assert status in (200, 405) and payload, (status, payload[:200])
        return
    answer = json.loads(payload)
    if status == 503:
        assert answer["error"]["code"] == "UNAVAILABLE", answer  # routed: no replica is running
    assert status < 500 or status == 503, (status, answer)
    if status >= 400:
        assert set(answer["error"]) == {"message", "type", "code"} and answer["error"]["message"]


def routes(front: HttpFront) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, plus a method and a path it does not."""
    found = [
        (method, route.path)
        for route in front.app.routes
        if isinstance(route, Route)
        for method in sorted(route.methods or ())
        if method != "HEAD"
    ]
    return [*found, ("DELETE", found[0][1]), ("POST", "/v1/unknown")]


@pytest.mark.slow
def test_every_route_answers_hostile_bodies_without_server_errors(front: HttpFront) -> None:
    targets = routes(front)
    assert ("POST", "/v1/completions") in targets and ("GET", "/v1/models") in targets

    @settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
    @given(target=st.sampled_from(targets), body=bodies)
    def fuzz(target: tuple[str, str], body: bytes) -> None:
        check_answer(*send(front, *target, body), target[1])

    fuzz()
    status, payload = send(front, "GET", "/v1/models", b"")
    assert status == 200 and json.loads(payload)["object"] == "list"
