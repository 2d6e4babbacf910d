"""One inference replica: an engine on a thread plus the gRPC InferenceService over it.

Answers direct gRPC (Generate, GenerateStream, Tokenize, ModelInfo, GetStats) and, when a Redis
connection is given, also pulls routed requests (services/inference/dispatch/puller.py). Health turns
SERVING only after a real one-token forward pass succeeded (`warmup`).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterator

import torch
from prometheus_client import CollectorRegistry

from tokenmill.common.errors import FailedPrecondition, InvalidArgument, NotFound, TokenmillError, Unavailable
from tokenmill.common.inference import Continued, EngineConfig, SamplingParams, build_engine
from tokenmill.common.inference.async_engine import AsyncEngine, RequestStream
from tokenmill.common.telemetry import gpu_stats
from tokenmill.services.inference.convert import (
    ResponseBuilder,
    chunk_from_output,
    submit_kwargs,
)
from tokenmill.services.inference.dispatch.selector import Selector, Served, check_served
from tokenmill.services.inference.loader import LoadedModel, load_adapter
from tokenmill.services.inference.metrics import LatencyObserver
from tokenmill.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

# One LatencyObserver per (registry, labels): a replica whose load failed is built again on the
# next attempt, and registering its histograms twice would raise DuplicateTimeseries, reported in
# place of the real reason it could not load.
_OBSERVERS: weakref.WeakKeyDictionary[CollectorRegistry, dict[tuple[tuple[str, str], ...], LatencyObserver]]
_OBSERVERS = weakref.WeakKeyDictionary()


def _observer(registry: CollectorRegistry, labels: dict[str, str]) -> LatencyObserver:
    observers = _OBSERVERS.setdefault(registry, {})
    key = tuple(sorted(labels.items()))
    if key not in observers:
        observers[key] = LatencyObserver(registry, labels)
    return observers[key]


class Replica:
    """The engine and what it serves; shared by the gRPC servicer and the Redis puller."""

    def __init__(
        self,
        loaded: LoadedModel,
        engine_config: EngineConfig,
        replica_id: str,
        *,
        store_client=None,
        registry=None,
    ):
        self.loaded = loaded
        self.replica_id = replica_id
        self.store = store_client
        labels = {"model_name": loaded.ref, "replica": replica_id}
        self.observer = _observer(registry, labels) if registry is not None else None
        self.engine = build_engine(
            loaded.tensors, loaded.config, engine_config, loaded.tokenizer, self.observer
        )
        loaded.tensors = {}  # the engine holds the weights now; drop the host copy
        self.aengine = AsyncEngine(self.engine, name=f"engine-{replica_id}")
        self.ready = threading.Event()
        self._adapter_lock = threading.Lock()
        self.adapters: dict[str, Served] = {}  # engine adapter name -> what it serves as a model
        self.labels = labels

    # ------------------------------------------------------------------ lifecycle

    def warmup(self, timeout: float = 300.0) -> bool:
        """Readiness: one real token through the whole model (never just "the process is up")."""
        tok = self.engine.spec.bos_token_id or 0
        stream = self.aengine.submit(
            prompt_token_ids=[tok], params=SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        )
        outs = []
        while True:
            out = stream.get(timeout=timeout)
            if out is None:
                break
            outs.append(out)
            if out.finished:
                break
        if not outs or not outs[-1].token_ids:
            raise FailedPrecondition("warm-up generation produced no token")
        self.ready.set()
        return True

    def shutdown(self) -> None:
        self.aengine.shutdown()

    # ------------------------------------------------------------------ requests

    def serving(self) -> list[Served]:
        """The base model, then each loaded LoRA adapter (addressable as a model over the base)."""
        return [self.loaded.served, *self.adapters.values()]

    def check_model(self, model: str) -> None:
        """NOT_FOUND unless `model` selects exactly what this replica serves (dispatch.selector)."""
        check_served(model, self.serving(), where="this replica serves")

    def resolve_model(self, request: inference_pb2.GenerateRequest) -> None:
        """A request whose `model` names a loaded adapter runs on the base with that adapter."""
        selector = Selector.parse(request.model)
        if selector is None or selector.matches(self.loaded.served):
            return
        key = next((k for k, s in self.adapters.items() if selector.matches(s)), None)
        if key is None:
            self.check_model(request.model)  # NOT_FOUND, saying what is served
            return
        if request.adapter and request.adapter != key:
            raise InvalidArgument(
                f"model {request.model!r} is the LoRA adapter {key!r}; do not also name adapter "
                f"{request.adapter!r}"
            )
        request.adapter = key

    def ensure_adapter(self, ref: str) -> None:
        if not ref or ref in self.engine.adapters:
            return
        if self.store is None:
            raise NotFound(f"LoRA adapter {ref!r} is not loaded and this replica has no checkpoint store")
        with self._adapter_lock:
            if ref in self.engine.adapters:
                return
            m = self.engine.model
            s = self.engine.spec
            shapes = {
                "q_proj": (m.q_size, s.hidden_size),
                "k_proj": (m.kv_size, s.hidden_size),
                "v_proj": (m.kv_size, s.hidden_size),
                "o_proj": (s.hidden_size, m.q_size),
                "gate_proj": (s.intermediate_size, s.hidden_size),
                "up_proj": (s.intermediate_size, s.hidden_size),
                "down_proj": (s.hidden_size, s.intermediate_size),
            }
            adapter, served = load_adapter(self.store, ref, dtype=m.dtype, device="cpu", base_shapes=shapes)
            self.aengine.call(lambda e: e.add_adapter(adapter))
            self.adapters[ref] = served
            log.info("loaded LoRA adapter %s", ref)

    def prepare(self, request: inference_pb2.GenerateRequest) -> None:
        """Everything before the engine takes `request`: checks, and loading its adapter (slow once)."""
        if not self.ready.is_set():
            raise Unavailable("the replica is still warming up; retry in a moment")
        self.resolve_model(request)
        self.ensure_adapter(request.adapter)

    def submit(
        self, request: inference_pb2.GenerateRequest, sink=None, continued: Continued | None = None
    ) -> RequestStream:
        """Queue `request`; `continued` when it resumes one another replica died serving."""
        self.prepare(request)
        return self.aengine.submit(sink=sink, continued=continued, **submit_kwargs(request))

    # ------------------------------------------------------------------ info

    def model_info(self) -> inference_pb2.ModelInfoResponse:
        m = self.engine.model
        return inference_pb2.ModelInfoResponse(
            model=self.loaded.ref,
            architecture="LlamaForCausalLM",
            parameters=m.num_parameters(),
            context_length=self.engine.max_model_len,
            vocab_size=self.engine.spec.vocab_size,
            dtype=str(m.dtype).removeprefix("torch."),
            quantization=self.loaded.quantization,
            adapters=sorted(self.engine.adapters),
        )

    def stats(self) -> inference_pb2.ReplicaStats:
        s = self.aengine.stats()
        msg = inference_pb2.ReplicaStats(
            replica=self.replica_id,
            requests_running=s.requests_running,
            requests_waiting=s.requests_waiting,
            kv_cache_usage=s.kv_cache_usage,
            kv_blocks_total=s.kv_blocks_total,
            kv_blocks_free=s.kv_blocks_free,
            prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits,
            preemptions=s.preemptions,
        )
        for g in gpu_stats():
            msg.gpus.add(
                index=g.index,
                name=g.name,
                utilization=(g.utilization_percent or 0.0) / 100.0,
                memory_used_bytes=g.memory_used_bytes or 0,
                memory_total_bytes=g.memory_total_bytes or 0,
                temperature_c=g.temperature_celsius or 0.0,
                power_w=g.power_watts or 0.0,
            )
        return msg


class ReplicaServicer(inference_pb2_grpc.InferenceServiceServicer):
    """gRPC over a Replica; `replica` may be a callable returning it (None while still loading)."""

    def __init__(self, replica: Replica | Callable[[], Replica | None]):
        self._get = replica if callable(replica) else (lambda: replica)

    @property
    def replica(self) -> Replica:
        r = self._get()
        if r is None:
            raise Unavailable("the replica is still loading its model; retry in a moment")
        return r

    def _stream(self, request, context) -> Iterator[inference_pb2.GenerateChunk]:
        stream = self.replica.submit(request)
        # A client that goes away (cancel, deadline, disconnect) aborts the request in the engine.
        context.add_callback(stream.cancel)
        rid = self.replica.replica_id
        for out in stream:
            yield chunk_from_output(out, rid)

    def Generate(self, request, context):
        builder = ResponseBuilder(getattr(request, "request_id", ""))
        for chunk in self._stream(request, context):
            builder.add(chunk)
        return builder.build()

    def GenerateStream(self, request, context):
        yield from self._stream(request, context)

    def Tokenize(self, request, context):
        self.replica.check_model(request.model)
        tok = self.replica.engine.tokenizer
        if tok is None:
            raise FailedPrecondition(f"model {self.replica.loaded.ref} has no tokenizer.json")
        if not request.text:
            raise InvalidArgument("text is empty: nothing to tokenize")
        ids = tok.encode(request.text)
        return inference_pb2.TokenizeResponse(token_ids=ids, tokens=tok.tokens(ids))

    def ModelInfo(self, request, context):
        self.replica.check_model(request.model)
        return self.replica.model_info()

    def GetStats(self, request, context):
        return self.replica.stats()


def parse_dtype(name: str) -> torch.dtype:
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if name not in table:
        raise InvalidArgument(f"unknown dtype {name!r}; use one of {sorted(table)}")
    return table[name]


__all__ = ["Replica", "ReplicaServicer", "TokenmillError", "parse_dtype"]
