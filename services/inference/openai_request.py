"""Reading and validating OpenAI completion and chat requests for the HTTP front, bounded before
any work.

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
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs ceiling)
COMPLETION_DEFAULT_MAX_TOKENS = 16  # what OpenAI completions generate when max_tokens is not given
CHAT_ROLES = ("system", "user", "assistant")
# vLLM's extensions that change how the chat template renders (a custom template, extra template
# variables such as Qwen3's enable_thinking, RAG documents): not supported, so refused by name.
TEMPLATE_CONTROLS = ("chat_template", "chat_template_kwargs", "documents")


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
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
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


def logit_bias(value: Any, limits: InferenceLimitsConfig) -> dict[int, float]:
    """OpenAI's {"token id": bias} with biases in [-100, 100] (the replica checks ids against its vocab)."""
    if not isinstance(value, dict):
        raise WrongType("'logit_bias' must be an object of token id -> bias")
    if len(value) > limits.max_token_id_list:
        raise InvalidArgument(
            f"'logit_bias' has {len(value)} entries; at most {limits.max_token_id_list} are accepted"
        )
    out: dict[int, float] = {}
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit()) or int(key) > UINT32_MAX:
            raise InvalidArgument(
                f"'logit_bias' key {key[:40]!r} is not a token id (ids are 0 .. vocab size - 1)"
            )
        b = number(bias, f"logit_bias[{key}]")
        if not -100.0 <= b <= 100.0:
            raise InvalidArgument(f"'logit_bias[{key}]' must be in [-100, 100], got {bias}")
        out[int(key)] = b
    return out


def _sampling(sp: inference_pb2.SamplingParams, body: dict[str, Any], limits: InferenceLimitsConfig) -> None:
    """The fields completions and chat share (max_tokens and logprobs are each API's own)."""
    for key in ("temperature", "top_p", "repetition_penalty"):
        if body.get(key) is not None:
            setattr(sp, key, number(body[key], key))
    for key in ("frequency_penalty", "presence_penalty"):
        if body.get(key) is not None:
            value = number(body[key], key)
            if not -2.0 <= value <= 2.0:
                raise InvalidArgument(f"'{key}' must be in [-2, 2], got {body[key]}")
            setattr(sp, key, value)
    if body.get("logit_bias") is not None:
        for token, bias in logit_bias(body["logit_bias"], limits).items():
            sp.logit_bias[token] = bias
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
    sp.ignore_eos = flag(body, "ignore_eos")
    sp.token_healing = flag(body, "token_healing")


def _max_tokens(sp: inference_pb2.SamplingParams, value: Any, name: str, lo: int) -> None:
    if value is not None:  # null: the server's default
        sp.max_tokens = integer(value, name, lo, UINT32_MAX)


def _unsupported(body: dict[str, Any], names: tuple[str, ...]) -> None:
    """400 naming the field for what tokenmill does not do, rather than silently ignoring it."""
    for key in ("n", "best_of"):
        if body.get(key) is not None and integer(body[key], key, 1, UINT32_MAX) != 1:
            raise InvalidArgument(
                f"'{key}' = {body[key]} is not supported: only {key}=1; send separate requests"
            )
    for key in names:
        if body.get(key) not in (None, "", [], {}):
            raise InvalidArgument(f"'{key}' is not supported by this server; leave it out")


def _common(body: Any, prefix: str, limits: InferenceLimitsConfig) -> inference_pb2.GenerateRequest:
    if not isinstance(body, dict):
        raise WrongType(f"the body must be a JSON object, got {type(body).__name__}")
    req = inference_pb2.GenerateRequest(request_id=f"{prefix}-{uuid.uuid4().hex}")
    for key in ("model", "adapter"):
        if body.get(key) is not None:
            setattr(req, key, text(body[key], key, limits.max_string_bytes))
    _sampling(req.sampling, body, limits)
    return req


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise WrongType(f"'stream_options' must be an object, got {type(opts).__name__}")
    return flag(body, "stream"), flag(opts, "include_usage", "stream_options.")


def completion_request(
    body: Any, limits: InferenceLimitsConfig
) -> tuple[inference_pb2.GenerateRequest, bool, bool]:
    """OpenAI completion JSON -> (GenerateRequest, stream?, include usage in stream?).

    `logprobs` is the legacy integer (alternatives per token; true counts as 0); `echo` returns the
    prompt too, and with `max_tokens: 0` only scores it (lm-evaluation-harness's loglikelihood)."""
    req = _common(body, "cmpl", limits)
    _unsupported(body, ("suffix",))
    _prompt(req, body.get("prompt"), limits)
    sp = req.sampling
    sp.echo = flag(body, "echo")
    if body.get("max_tokens") is None:  # OpenAI's default, as much of it as the context has room for
        sp.max_tokens, sp.clamp_max_tokens = COMPLETION_DEFAULT_MAX_TOKENS, True
    else:
        _max_tokens(sp, body["max_tokens"], "max_tokens", 0 if sp.echo else 1)
    sp.prompt_only = sp.echo and body.get("max_tokens") == 0
    logprobs = body.get("logprobs")
    if isinstance(logprobs, bool) or logprobs is None:
        sp.logprobs = bool(logprobs)
    else:
        sp.top_logprobs = integer(logprobs, "logprobs", 0, MAX_LOGPROBS)
        sp.logprobs = True
    return req, *_stream_flags(body)


def chat_request(
    body: Any, limits: InferenceLimitsConfig
) -> tuple[inference_pb2.GenerateRequest, bool, bool]:
    """OpenAI chat completion JSON -> (GenerateRequest with `messages`, stream?, include usage?)."""
    req = _common(body, "chatcmpl", limits)
    _unsupported(body, ("tools", "functions", "audio", "prediction", *TEMPLATE_CONTROLS))
    # vLLM's chat template switches: the model's own template always renders the messages as they
    # are, with the assistant's turn opened, so a request asking otherwise is refused, not ignored.
    if flag(body, "continue_final_message"):
        raise InvalidArgument(
            "'continue_final_message' is not supported by this server: the model's chat template "
            "always opens a new assistant turn; leave it out"
        )
    if body.get("add_generation_prompt") is not None and not flag(body, "add_generation_prompt"):
        raise InvalidArgument(
            "'add_generation_prompt': false is not supported by this server: the model's chat "
            "template always opens a new assistant turn; leave it out"
        )
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise InvalidArgument('\'response_format\' other than {"type": "text"} is not supported')
    req.messages.extend(chat_messages(body.get("messages"), limits))
    sp = req.sampling
    limit = body.get("max_completion_tokens")
    _max_tokens(sp, body.get("max_tokens") if limit is None else limit, "max_completion_tokens", 1)
    sp.logprobs = flag(body, "logprobs")
    if body.get("top_logprobs") is not None:
        sp.top_logprobs = integer(body["top_logprobs"], "top_logprobs", 0, MAX_LOGPROBS)
        if not sp.logprobs:
            raise InvalidArgument("'top_logprobs' needs 'logprobs': true")
    return req, *_stream_flags(body)


def chat_messages(value: Any, limits: InferenceLimitsConfig) -> list[inference_pb2.ChatMessage]:
    """`messages`: a non-empty list of {role: system|user|assistant, content: text or text parts},
    its text bounded like a prompt's."""
    if not isinstance(value, list):
        raise WrongType(f"'messages' must be a list of messages, got {type(value).__name__}")
    if not value:
        raise InvalidArgument("'messages' is empty: send at least one message")
    budget = limits.max_prompt_bytes or limits.max_http_body_bytes
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise WrongType(f"'messages[{i}]' must be an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise InvalidArgument(
                f"'messages[{i}].role' must be one of {', '.join(CHAT_ROLES)}, got {role!r}"
            )
        # Each message gets what the ones before left of the prompt's bytes (text() refuses more).
        content = text(_content(m.get("content"), i), f"messages[{i}].content", budget)
        budget -= len(content.encode("utf-8"))
        out.append(inference_pb2.ChatMessage(role=role, content=content))
    return out


def _content(content: Any, i: int) -> Any:
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if not isinstance(content, list):
        return content
    parts: list[str] = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise InvalidArgument(
                f"'messages[{i}].content[{j}]' must be a text part; images and audio are not supported"
            )
        value = part.get("text")
        if not isinstance(value, str):
            raise WrongType(f"'messages[{i}].content[{j}].text' must be a string")
        parts.append(value)
    return "".join(parts)
