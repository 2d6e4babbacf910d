"""InferenceClient: generate (unary or streamed), tokenize, model info and stats.

Works against the router (the platform's inference endpoint) or one replica directly: both expose
the same InferenceService.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from tokenmill.common.clients.base import BaseClient
from tokenmill.common.errors import InvalidArgument
from tokenmill.v1 import inference_pb2, inference_pb2_grpc


def build_generate_request(
    prompt: str | Sequence[int],
    *,
    max_tokens: int = 0,
    temperature: float | None = None,
    top_k: int = 0,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    logit_bias: Mapping[int, float] | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    logprobs: bool = False,
    top_logprobs: int = 0,
    ignore_eos: bool = False,
    echo: bool = False,
    token_healing: bool = False,
    model: str = "",
    adapter: str = "",
    request_id: str = "",
) -> inference_pb2.GenerateRequest:
    if max_tokens < 0:
        raise InvalidArgument(f"max_tokens must be >= 0 (0 = server default), got {max_tokens}")
    bad = [t for t in (logit_bias or {}) if not 0 <= int(t) < 2**32]
    if bad:
        raise InvalidArgument(f"logit_bias keys must be token ids (non-negative integers), got {bad[:8]}")
    sp = inference_pb2.SamplingParams(
        max_tokens=max_tokens,
        top_k=top_k,
        stop=list(stop),
        stop_token_ids=list(stop_token_ids),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        ignore_eos=ignore_eos,
        echo=echo,
        token_healing=token_healing,
        logit_bias={int(t): float(b) for t, b in (logit_bias or {}).items()},
    )
    for name, value in (
        ("temperature", temperature),
        ("top_p", top_p),
        ("repetition_penalty", repetition_penalty),
        ("seed", seed),
        ("frequency_penalty", frequency_penalty),
        ("presence_penalty", presence_penalty),
    ):
        if value is not None:
            setattr(sp, name, value)
    req = inference_pb2.GenerateRequest(request_id=request_id, model=model, sampling=sp, adapter=adapter)
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.prompt_token_ids.extend(int(t) for t in prompt)
    return req


class InferenceClient(BaseClient):
    """``InferenceClient.from_config(config).generate("Once upon a time", max_tokens=32).text``."""

    stub_class = inference_pb2_grpc.InferenceServiceStub
    service_name = "inference"

    def generate(
        self, prompt: str | Sequence[int], *, timeout: float | None = None, **kwargs: Any
    ) -> inference_pb2.GenerateResponse:
        """One completion (blocks until it finishes). kwargs: see build_generate_request."""
        return self._unary(self.stub.Generate, build_generate_request(prompt, **kwargs), timeout=timeout)

    def stream(
        self, prompt: str | Sequence[int], *, timeout: float | None = None, **kwargs: Any
    ) -> Iterator[inference_pb2.GenerateChunk]:
        """Chunks as tokens are produced; stopping the iteration cancels the request server-side."""
        yield from self._stream(
            self.stub.GenerateStream, build_generate_request(prompt, **kwargs), timeout=timeout
        )

    def tokenize(
        self, text: str, *, model: str = "", timeout: float | None = None
    ) -> inference_pb2.TokenizeResponse:
        return self._unary(
            self.stub.Tokenize, inference_pb2.TokenizeRequest(model=model, text=text), timeout=timeout
        )

    def model_info(self, *, model: str = "", timeout: float | None = None) -> inference_pb2.ModelInfoResponse:
        """What serves `model` ("" = any served model): through the router, FAILED_PRECONDITION with
        the reason when its replicas could not load it."""
        return self._unary(self.stub.ModelInfo, inference_pb2.ModelInfoRequest(model=model), timeout=timeout)

    def stats(self, *, timeout: float | None = None) -> inference_pb2.ReplicaStats:
        return self._unary(self.stub.GetStats, inference_pb2.GetStatsRequest(), timeout=timeout)
