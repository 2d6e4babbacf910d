"""Size limits before work on inference (issue 10 items 5 and 6), and no HTTP 500 for bad input.

The tokenizer refuses a prompt that cannot fit the context before tokenizing it; the engine bounds
stop strings; the HTTP front answers 413 for a body over its limit before reading it, and 400/422
with an OpenAI-style error for every malformed body. Real uvicorn on loopback over the test Redis.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fixtures.grpc import TEST_TOKEN, make_test_config
from tests.fixtures.inference import train_tokenizer
from tokenmill.common.config import Config, load_config
from tokenmill.common.errors import InvalidArgument
from tokenmill.common.inference import SamplingParams, Tokenizer
from tokenmill.common.inference.request import MAX_STOP_BYTES, MAX_STOP_SEQUENCES, MAX_STOP_TOKEN_IDS
from tokenmill.common.redis_conn import connect_url
from tokenmill.services.inference.dispatch.failover import RouterDispatcher
from tokenmill.services.inference.http_api import HttpFront

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}", "Content-Type": "application/json"}
MiB = 1024 * 1024

# -- the tokenizer: prompt bytes are checked before tokenization -------------------------------------


class CountingTokenizer:
    """A real HF tokenizer that counts `encode` calls (to prove a refusal did no tokenization)."""

    def __init__(self) -> None:
        self.inner = train_tokenizer()
        self.encodes = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> Any:
        self.encodes += 1
        return self.inner.encode(text, add_special_tokens=add_special_tokens)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(train_tokenizer())


def test_oversized_prompt_is_refused_before_tokenization() -> None:
    hf = CountingTokenizer()
    tok = Tokenizer(hf)
    with pytest.raises(InvalidArgument, match=r"the prompt is 7340032 bytes; this model accepts at most"):
        tok.encode("a" * 7 * MiB, max_tokens=2048)
    assert hf.encodes == 0
    assert (
        tok.encode("hello world", max_tokens=2048)
        == hf.inner.encode("hello world", add_special_tokens=False).ids
    )


def test_explicit_max_input_bytes_caps_every_encode() -> None:
    hf = CountingTokenizer()
    tok = Tokenizer(hf, max_input_bytes=100)
    with pytest.raises(InvalidArgument, match="at most 100 bytes"):
        tok.encode("é" * 51)  # 102 bytes in 51 characters
    assert hf.encodes == 0
    assert tok.prompt_byte_limit(10**6) == 100
    assert tok.encode("x" * 100)


@given(st.text(max_size=200))
def test_byte_bound_never_refuses_a_prompt_that_fits(tokenizer: Tokenizer, text: str) -> None:
    """Soundness: a text's tokens cover at most `max_token_bytes` bytes each, so a text over the
    bound for `max_tokens` really has more than `max_tokens` tokens."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return  # lone surrogates cannot reach the tokenizer (proto and JSON fronts refuse them)
    ids = tokenizer.encode(text)
    assert len(ids) * tokenizer.max_token_bytes >= size
    assert tokenizer.encode(text, max_tokens=max(len(ids), 1)) == ids


# -- the engine's ceilings on stop conditions ------------------------------------------------------


@pytest.mark.parametrize(
    "params, message",
    [
        (SamplingParams(stop=("x",) * (MAX_STOP_SEQUENCES + 1)), "stop strings; at most"),
        (SamplingParams(stop=("x" * (MAX_STOP_BYTES + 1),)), "a stop string is .* bytes"),
        (SamplingParams(stop_token_ids=(1,) * (MAX_STOP_TOKEN_IDS + 1)), "stop token ids; at most"),
    ],
)
def test_stop_conditions_are_bounded(params: SamplingParams, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        params.validate()


def test_limits_are_configurable_from_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOKENMILL_INFERENCE_LIMITS__MAX_HTTP_BODY_BYTES", "65536")
    config = load_config(data_dir=tmp_path, auth={"disabled": True})
    assert config.inference_limits.max_http_body_bytes == 65536
    assert config.inference_limits.max_prompt_bytes == 0  # derived from the model by default


# -- the HTTP front --------------------------------------------------------------------------------


@pytest.fixture
def start_front(redis_url: str, redis_client) -> Iterator[Callable[[Config], HttpFront]]:
    fronts: list[HttpFront] = []

    def start(config: Config) -> HttpFront:
        dispatcher = RouterDispatcher(connect_url(redis_url), dead_after_s=1.0, no_replica_timeout_s=1.0)
        front = HttpFront(dispatcher, config, "127.0.0.1", 0)
        front.start()
        fronts.append(front)
        return front

    yield start
    for front in fronts:
        front.stop()


@pytest.fixture
def front(start_front, tmp_path: Path) -> HttpFront:
    return start_front(make_test_config(tmp_path, inference_limits={"max_http_body_bytes": 128 * 1024}))


def request(front: HttpFront, method: str, path: str, body: bytes = b"") -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=AUTH)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def post(front: HttpFront, body: Any) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return request(front, "POST", "/v1/completions", data)


def raw_exchange(front: HttpFront, head: bytes, chunks: list[bytes]) -> bytes:
    """Send `head` then `chunks` on a socket (stopping if the server hangs up) and read the answer."""
    with socket.create_connection(("127.0.0.1", front.port), timeout=30) as sock:
        sock.sendall(head)
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        answer = b""
        while not answer.endswith(b"}") and (data := sock.recv(65536)):
            answer += data
        return answer


def test_declared_oversized_body_is_413_before_it_is_read(front: HttpFront) -> None:
    """64 MiB announced and none of it sent: the answer comes anyway, so nothing waited for it."""
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {TEST_TOKEN}\r\nContent-Length: {64 * MiB}\r\n\r\n".encode()
    )
    answer = raw_exchange(front, head, [])
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"at most 131072" in answer
    assert request(front, "GET", "/v1/models")[0] == 200


def test_chunked_body_over_the_limit_is_413(front: HttpFront) -> None:
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        + f"Authorization: Bearer {TEST_TOKEN}\r\n\r\n".encode()
    )
    piece = b'{"prompt": "' + b"a" * 8000
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * 20  # 160 KB, never terminated
    answer = raw_exchange(front, head, chunks)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_default_limit_refuses_a_16_mib_body(start_front, tmp_path: Path) -> None:
    front = start_front(make_test_config(tmp_path))
    status, body = post(front, {"prompt": "a" * 16 * MiB})
    assert status == 413 and body["error"]["code"] == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b'{"prompt":[123456789012345678901234567890]}', 400, r"'prompt\[0\]' = 1234.* is not a token id"),
        (b'{"prompt":[-1]}', 400, "is not a token id"),
        (b'{"prompt":[1, true]}', 422, r"'prompt\[1\]' must be an integer"),
        (b'{"prompt":"hi","n":"two"}', 422, "'n' must be an integer"),
        (b'{"prompt":"hi","n":2}', 400, "only n=1"),
        (b'{"prompt":"\\ud800"}', 400, r"lone surrogate \(\\ud800\) at index 0"),
        (b'{"prompt":"hi","stop":["\\udfff"]}', 400, "lone surrogate"),
        (b'{"prompt":"hi","model":"\\ud800x"}', 400, "'model' is not valid Unicode"),
        (b"[" * 100_000, 400, "nested more than 32 levels"),
        (b'{"a":' * 33 + b"1" + b"}" * 33, 400, "nested more than 32 levels"),
        (b'{"prompt":"hi","temperature":NaN}', 400, "NaN is not a JSON number"),
        (b'{"prompt":"hi","temperature":1e999}', 400, "must be a finite number"),
        (b'{"prompt":"hi","temperature":"hot"}', 422, "must be a number"),
        (b'{"prompt":"hi","max_tokens":99999999999}', 400, r"'max_tokens' must be in \[1, "),
        (b'{"prompt":"hi","stream":"yes"}', 422, "'stream' must be true or false"),
        (b'{"prompt":"hi","stop":' + json.dumps(["x"] * 17).encode() + b"}", 400, "at most 16"),
        (b'{"prompt":"hi","stop":"' + b"x" * 1025 + b'"}', 400, "at most 1024"),
        (b'{"prompt":"hi","stop_token_ids":' + json.dumps([1] * 1025).encode() + b"}", 400, "at most 1024"),
        (b'{"prompt":"hi","logit_bias":{"5":101}}', 400, r"must be in \[-100, 100\]"),
        (b'{"prompt":"hi","logit_bias":{"x":1}}', 400, "is not a token id"),
        (b'{"prompt":"hi","logit_bias":{"\\u00b2":1}}', 400, "is not a token id"),  # a digit to isdigit()
        (b'{"prompt":"hi","suffix":"x"}', 400, "'suffix' is not supported"),
        (b'{"prompt":{"a":1}}', 422, "'prompt' must be a string or a list"),
        (b'{"prompt":["a","b"]}', 400, "batched prompts are not supported"),
        (b"[1]", 422, "must be a JSON object"),
        (b"\xff\xfe", 400, "not UTF-8 JSON|not valid JSON"),
        (b"1" * 5000, 400, "not valid JSON"),  # an integer too long to convert
    ],
)
def test_bad_bodies_are_4xx_with_an_openai_error(
    front: HttpFront, body: bytes, status: int, message: str
) -> None:
    got, answer = post(front, body)
    assert got == status, answer
    assert set(answer["error"]) == {"message", "type", "code"}
    assert answer["error"]["code"] == "INVALID_ARGUMENT"
    assert re.search(message, answer["error"]["message"]), answer


def test_explicit_max_prompt_bytes_is_checked_at_the_front(start_front, tmp_path: Path) -> None:
    front = start_front(make_test_config(tmp_path, inference_limits={"max_prompt_bytes": 1000}))
    status, body = post(front, {"prompt": "a" * 1001})
    assert status == 400 and "'prompt' is 1001 bytes; at most 1000" in body["error"]["message"]


def test_unknown_routes_and_methods_answer_in_the_openai_shape(front: HttpFront) -> None:
    assert request(front, "GET", "/v1/nope") == (
        404,
        {"error": {"message": "Not Found", "type": "not_found", "code": "NOT_FOUND"}},
    )
    status, body = request(front, "GET", "/v1/completions")
    assert status == 405 and body["error"]["code"] == "INVALID_ARGUMENT"


def test_a_valid_request_gets_past_validation(front: HttpFront) -> None:
    """Without replicas, a well-formed request reaches routing (UNAVAILABLE), so the checks above
    refuse only what is wrong."""
    body = {
        "prompt": [1, 2, 3],
        "n": 1,
        "stop": ["\n"] * 16,
        "logprobs": 1,
        "seed": -1,
        "top_k": -1,
        "max_tokens": None,
        "logit_bias": {},
        "stream_options": None,
    }
    status, answer = post(front, body)
    assert status == 503 and answer["error"]["code"] == "UNAVAILABLE", answer


def test_engine_refuses_a_prompt_past_its_context_before_tokenizing(tiny_ckpt) -> None:
    """The engine passes its context length to the tokenizer, so a 7 MiB prompt costs no tokenization."""
    from tokenmill.common.inference import EngineConfig, build_engine

    hf = CountingTokenizer()
    engine = build_engine(
        tiny_ckpt.model.state_dict(),
        tiny_ckpt.model.config.to_dict(),
        EngineConfig(num_blocks=32),
        Tokenizer(hf),
    )
    with pytest.raises(InvalidArgument, match="this model accepts at most"):
        engine.make_request(prompt="a" * 7 * MiB)
    assert hf.encodes == 0
