"""Proto <-> engine conversions shared by the replica, the router and the HTTP front, and the
InferenceService's registration (its requests parse tolerantly so bad UTF-8 is INVALID_ARGUMENT)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.message import DecodeError, Message

from tokenmill.common.errors import InvalidArgument
from tokenmill.common.inference import RequestOutput, SamplingParams, Usage
from tokenmill.common.runtime.codec import servicer_adder
from tokenmill.v1 import inference_pb2

SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]
SERVICE_NAME = SERVICE.full_name


def sampling_from_proto(sp: inference_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=int(sp.max_tokens),
        temperature=sp.temperature if sp.HasField("temperature") else 1.0,
        top_k=int(sp.top_k),
        top_p=sp.top_p if sp.HasField("top_p") else 1.0,
        repetition_penalty=sp.repetition_penalty if sp.HasField("repetition_penalty") else 1.0,
        seed=int(sp.seed) if sp.HasField("seed") else None,
        stop_token_ids=tuple(int(t) for t in sp.stop_token_ids),
        stop=tuple(sp.stop),
        logprobs=bool(sp.logprobs),
        ignore_eos=bool(sp.ignore_eos),
    )


def submit_kwargs(request: inference_pb2.GenerateRequest) -> dict[str, Any]:
    """Keyword arguments for AsyncEngine.submit / LLMEngine.make_request."""
    return {
        "prompt": request.prompt or None,
        "prompt_token_ids": list(request.prompt_token_ids) or None,
        "params": sampling_from_proto(request.sampling),
        "request_id": request.request_id,
        "adapter": request.adapter,
    }


def usage_to_proto(u: Usage) -> inference_pb2.Usage:
    return inference_pb2.Usage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        cached_prompt_tokens=u.cached_prompt_tokens,
        time_to_first_token_s=u.time_to_first_token_s,
        total_time_s=u.total_time_s,
    )


def chunk_from_output(out: RequestOutput, replica: str) -> inference_pb2.GenerateChunk:
    chunk = inference_pb2.GenerateChunk(
        request_id=out.request_id,
        token_ids=out.token_ids,
        text=out.text,
        logprobs=out.logprobs,
        finish_reason=out.finish_reason,
        replica=replica,
    )
    if out.usage is not None:
        chunk.usage.CopyFrom(usage_to_proto(out.usage))
    return chunk


class ResponseBuilder:
    """Folds a stream of chunks into one GenerateResponse (unary Generate)."""

    def __init__(self, request_id: str = ""):
        self.resp = inference_pb2.GenerateResponse(request_id=request_id)
        self.texts: list[str] = []

    def add(self, chunk: inference_pb2.GenerateChunk) -> None:
        r = self.resp
        r.request_id = chunk.request_id or r.request_id
        r.token_ids.extend(chunk.token_ids)
        r.logprobs.extend(chunk.logprobs)
        self.texts.append(chunk.text)
        if chunk.finish_reason:
            r.finish_reason = chunk.finish_reason
        if chunk.HasField("usage"):
            r.usage.CopyFrom(chunk.usage)
        if chunk.replica:
            r.replica = chunk.replica

    def build(self) -> inference_pb2.GenerateResponse:
        self.resp.text = "".join(self.texts)
        return self.resp


class _BadRequest:
    """Stands in for a request whose bytes did not parse (e.g. a stop string that is not UTF-8)."""

    def __init__(self, error: str):
        self.error = error


def _tolerant_parser(cls: type[Message]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except DecodeError as exc:
            return _BadRequest(str(exc))

    return parse


def check_parsed(request: Any) -> None:
    if isinstance(request, _BadRequest):
        raise InvalidArgument(
            f"the request could not be decoded ({request.error}); every string field (prompt, stop "
            "strings, model, adapter) must be valid UTF-8"
        )


# Like the generated adder (every RPC of the proto), but a request that fails to parse reaches the
# handler, which answers INVALID_ARGUMENT with the reason, instead of gRPC's opaque INTERNAL.
add_inference_servicer = servicer_adder(SERVICE, request_parser=_tolerant_parser)
