"""Proto <-> engine conversions shared by the replica, the router and the HTTP front, and the
InferenceService's registration (undecodable requests are INVALID_ARGUMENT through the runtime's
decoding layer, common/runtime/requests.py, like every service's)."""

from __future__ import annotations

from typing import Any

from tokenmill.common.inference import RequestOutput, SamplingParams, Usage
from tokenmill.common.inference.llm_engine import NamedLogprobs, PromptScores
from tokenmill.v1 import inference_pb2, inference_pb2_grpc

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
        top_logprobs=int(sp.top_logprobs),
        frequency_penalty=sp.frequency_penalty if sp.HasField("frequency_penalty") else 0.0,
        presence_penalty=sp.presence_penalty if sp.HasField("presence_penalty") else 0.0,
        logit_bias={int(k): float(v) for k, v in sp.logit_bias.items()},
        echo=bool(sp.echo),
        prompt_only=bool(sp.prompt_only),
        token_healing=bool(sp.token_healing),
        clamp_max_tokens=bool(sp.clamp_max_tokens),
    )


def submit_kwargs(request: inference_pb2.GenerateRequest) -> dict[str, Any]:
    """Keyword arguments for AsyncEngine.submit / LLMEngine.make_request."""
    return {
        "prompt": request.prompt or None,
        "prompt_token_ids": list(request.prompt_token_ids) or None,
        "params": sampling_from_proto(request.sampling),
        "request_id": request.request_id,
        "adapter": request.adapter,
        "messages": [{"role": m.role, "content": m.content} for m in request.messages] or None,
    }


def usage_to_proto(u: Usage) -> inference_pb2.Usage:
    return inference_pb2.Usage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        cached_prompt_tokens=u.cached_prompt_tokens,
        time_to_first_token_s=u.time_to_first_token_s,
        total_time_s=u.total_time_s,
    )


def top_to_proto(alts: NamedLogprobs | None) -> inference_pb2.TokenLogprobs:
    """One position's alternatives, most likely first."""
    entries = [inference_pb2.TokenLogprob(token_id=t, token=s, logprob=lp) for t, lp, s in alts or []]
    return inference_pb2.TokenLogprobs(entries=entries)


def prompt_to_proto(p: PromptScores) -> inference_pb2.PromptScores:
    """The echoed prompt; its first logprob (there is none) travels as NaN."""
    msg = inference_pb2.PromptScores(token_ids=p.token_ids, tokens=p.tokens, text=p.text)
    msg.logprobs.extend(float("nan") if lp is None else lp for lp in p.logprobs)
    msg.top_logprobs.extend(top_to_proto(alts) for alts in p.top_logprobs)
    return msg


def chunk_from_output(out: RequestOutput, replica: str) -> inference_pb2.GenerateChunk:
    chunk = inference_pb2.GenerateChunk(
        request_id=out.request_id,
        token_ids=out.token_ids,
        text=out.text,
        logprobs=out.logprobs,
        finish_reason=out.finish_reason,
        replica=replica,
        tokens=out.tokens,
        top_logprobs=[top_to_proto(alts) for alts in out.top_logprobs],
    )
    if out.prompt is not None:
        chunk.prompt.CopyFrom(prompt_to_proto(out.prompt))
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
        r.top_logprobs.extend(chunk.top_logprobs)
        r.tokens.extend(chunk.tokens)
        if chunk.HasField("prompt"):
            r.prompt.CopyFrom(chunk.prompt)
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


add_inference_servicer = inference_pb2_grpc.add_InferenceServiceServicer_to_server
