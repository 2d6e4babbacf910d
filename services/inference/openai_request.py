"""Reading and validating OpenAI completion requests for the HTTP front, bounded before any work.

Every way a body can be wrong ends here as an `InvalidArgument` (HTTP 400), a `BodyTooLarge` (413)
or a `WrongType` (422), never as an uncaught exception: the body is read with a cap (a declared
Content-Length over it is refused before reading), JSON nesting is bounded, every field is checked
for type, range and size, and text must be encodable as UTF-8 (JSON can spell lone surrogates).
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

from tokenmill.common.config import InferenceLimitsConfig
from tokenmill.common.errors import InvalidArgument
from tokenmill.v1 import inference_pb2

UINT32_MAX = 2**32 - 1
MAX_LOGPROBS = 20  # the legacy completions API takes an int (how many alternatives); we send one


class BodyTooLarge(InvalidArgument):
    """The request body is over `max_http_body_bytes`."""

    http_status = 413


class WrongType(InvalidArgument):
    """Well-formed JSON whose shape or field types are not a completion request's."""

    http_status = 422


# -- the body -------------------------------------------------------------------------------------


async def read_capped(headers: Any, chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The body, read no further than `limit` bytes: a larger declared Content-Length is refused
    before a byte is read, and a chunked body as soon as it passes the limit."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"the request body is {int(declared)} bytes; at most {limit} are accepted")
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"the request body is over {limit} bytes; at most {limit} are accepted")
        parts.append(chunk)
    return b"".join(parts)


def _reject_constant(name: str) -> Any:
    raise InvalidArgument(f"the body is not valid JSON: {name} is not a JSON number")


def parse_json(data: bytes, max_depth: int) -> Any:
    """Decode `data` as JSON nested at most `max_depth` deep (NaN and Infinity are not JSON)."""
    try:
        value = json.loads(data, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidArgument(f"the body is nested more than {max_depth} levels deep") from None
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"the body is not UTF-8 JSON: {exc}") from None
    except ValueError as exc:  # JSONDecodeError, and integers too long to convert
        raise InvalidArgument(f"the body is not valid JSON: {exc}") from None
    check_depth(value, max_depth)
    return value


def check_depth(value: Any, max_depth: int) -> None:
    """Iteratively (no recursion to exhaust) check that containers nest at most `max_depth` deep."""
    stack: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > max_depth:
            raise InvalidArgument(f"the body is nested more than {max_depth} levels deep")
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))


# -- fields ---------------------------------------------------------------------------------------


def text(value: Any, name: str, max_bytes: int) -> str:
    """A string field: UTF-8 encodable and at most `max_bytes` bytes."""
    if not isinstance(value, str):
        raise WrongType(f"'{name}' must be a string, got {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        bad = value[exc.start : exc.end].encode("unicode_escape").decode()
        raise InvalidArgument(
            f"'{name}' is not valid Unicode: it holds a lone surrogate ({bad}) at index {exc.start}; "
            "a character outside the BMP is a surrogate pair (\\ud83d\\ude00), never one half"
        ) from None
    if size > max_bytes:
        raise InvalidArgument(f"'{name}' is {size} bytes; at most {max_bytes} are accepted")
    return value


def integer(value: Any, name: str, lo: int, hi: int) -> int:
    """An integer field in [lo, hi] (JSON booleans are not integers)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise WrongType(f"'{name}' must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise InvalidArgument(f"'{name}' must be in [{lo}, {hi}], got {value}")
    return value


def number(value: Any, name: str) -> float:
    """A finite number field (range checks are the engine's, which knows the semantics)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise WrongType(f"'{name}' must be a number, got {type(value).__name__}")
    try:
        result = float(value)
    except OverflowError:  # an integer beyond any float
        result = math.inf
    if not math.isfinite(result):
        raise InvalidArgument(f"'{name}' must be a finite number, got {value}")
    return result


def flag(body: dict[str, Any], name: str, where: str = "") -> bool:
    """An optional boolean field (absent or null is false)."""
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise WrongType(f"'{where}{name}' must be true or false, got {type(value).__name__}")
    return bool(value)


def token_ids(value: Any, name: str, max_items: int | None) -> list[int]:
    """A list of token ids; each fits the wire type (the replica checks them against the vocab)."""
    if not isinstance(value, list):
        raise WrongType(f"'{name}' must be a list of token ids, got {type(value).__name__}")
    if max_items is not None and len(value) > max_items:
        raise InvalidArgument(f"'{name}' has {len(value)} entries; at most {max_items} are accepted")
    for i, t in enumerate(value):
        if not isinstance(t, int) or isinstance(t, bool):
            raise WrongType(f"'{name}[{i}]' must be an integer token id, got {type(t).__name__}")
        if not 0 <= t <= UINT32_MAX:
            raise InvalidArgument(f"'{name}[{i}]' = {t} is not a token id (ids are 0 .. vocab size - 1)")
    return value


def stop_strings(value: Any, limits: InferenceLimitsConfig) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise WrongType("'stop' must be a string or a list of strings")
    if len(items) > limits.max_stop_sequences:
        raise InvalidArgument(
            f"'stop' has {len(items)} strings; at most {limits.max_stop_sequences} are accepted"
        )
    out = [text(s, f"stop[{i}]", limits.max_string_bytes) for i, s in enumerate(items)]
    if not all(out):
        raise InvalidArgument("'stop' strings must not be empty")
    return out


# -- the request ----------------------------------------------------------------------------------


def _prompt(req: inference_pb2.GenerateRequest, prompt: Any, limits: InferenceLimitsConfig) -> None:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if prompt is None or prompt == "" or prompt == []:
        raise InvalidArgument("'prompt' is empty")
    if isinstance(prompt, str):
        req.prompt = text(prompt, "prompt", limits.max_prompt_bytes or limits.max_http_body_bytes)
    elif isinstance(prompt, list) and all(isinstance(p, str | list) for p in prompt):
        raise InvalidArgument("batched prompts are not supported: send one request per prompt")
    elif isinstance(prompt, list):
        req.prompt_token_ids.extend(token_ids(prompt, "prompt", None))
    else:
        raise WrongType(f"'prompt' must be a string or a list of token ids, got {type(prompt).__name__}")


def _sampling(sp: inference_pb2.SamplingParams, body: dict[str, Any], limits: InferenceLimitsConfig) -> None:
    max_tokens = body.get("max_tokens", 16)
    if max_tokens is not None:  # null: the server's default
        sp.max_tokens = integer(max_tokens, "max_tokens", 1, UINT32_MAX)
    for key in ("temperature", "top_p", "repetition_penalty"):
        if body.get(key) is not None:
            setattr(sp, key, number(body[key], key))
    if body.get("top_k") is not None:
        sp.top_k = max(integer(body["top_k"], "top_k", -1, UINT32_MAX), 0)  # vLLM: -1 means off
    if body.get("seed") is not None:
        sp.seed = integer(body["seed"], "seed", -(2**63), 2**64 - 1) & 0xFFFFFFFFFFFFFFFF
    if body.get("stop") is not None:
        sp.stop.extend(stop_strings(body["stop"], limits))
    if body.get("stop_token_ids") is not None:
        sp.stop_token_ids.extend(
            token_ids(body["stop_token_ids"], "stop_token_ids", limits.max_token_id_list)
        )
    logprobs = body.get("logprobs")
    if isinstance(logprobs, bool) or logprobs is None:
        sp.logprobs = bool(logprobs)
    else:  # the legacy API's count of alternatives; we return the chosen token's
        sp.logprobs = integer(logprobs, "logprobs", 0, MAX_LOGPROBS) > 0
    sp.ignore_eos = flag(body, "ignore_eos")


def _unsupported(body: dict[str, Any]) -> None:
    for key in ("n", "best_of"):
        if body.get(key) is not None and integer(body[key], key, 1, UINT32_MAX) != 1:
            raise InvalidArgument(f"only {key}=1 is supported, got {body[key]}")
    bias = body.get("logit_bias")
    if bias is not None and not isinstance(bias, dict):
        raise WrongType("'logit_bias' must be an object of token id -> bias")
    if bias:
        raise InvalidArgument("'logit_bias' is not supported; leave it out or empty")


def completion_request(
    body: Any, limits: InferenceLimitsConfig
) -> tuple[inference_pb2.GenerateRequest, bool, bool]:
    """OpenAI completion JSON -> (GenerateRequest, stream?, include usage in stream?)."""
    if not isinstance(body, dict):
        raise WrongType(f"the body must be a JSON object, got {type(body).__name__}")
    _unsupported(body)
    req = inference_pb2.GenerateRequest(request_id=f"cmpl-{uuid.uuid4().hex}")
    for key in ("model", "adapter"):
        if body.get(key) is not None:
            setattr(req, key, text(body[key], key, limits.max_string_bytes))
    _prompt(req, body.get("prompt"), limits)
    _sampling(req.sampling, body, limits)
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise WrongType(f"'stream_options' must be an object, got {type(opts).__name__}")
    return req, flag(body, "stream"), flag(opts, "include_usage", "stream_options.")
