"""The router: the platform's single inference endpoint, in front of any number of replicas.

Generate/GenerateStream go through Redis (dispatch.failover.RouterDispatcher: replicas pull by capacity);
Tokenize and ModelInfo are answered by a live replica over gRPC; GetStats sums the replicas'
heartbeats.
"""

from __future__ import annotations

import random

from tokenmill.common.clients.inference import InferenceClient
from tokenmill.common.errors import InvalidArgument
from tokenmill.services.inference.convert import ResponseBuilder
from tokenmill.services.inference.dispatch.failover import RouterDispatcher
from tokenmill.v1 import inference_pb2, inference_pb2_grpc


class RouterServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, dispatcher: RouterDispatcher, *, client_kwargs: dict | None = None):
        self.dispatcher = dispatcher
        self.client_kwargs = client_kwargs or {}
        self._clients: dict[str, InferenceClient] = {}

    def _client(self, model: str = "") -> InferenceClient:
        info = random.choice(self.dispatcher.live_for(model))
        client = self._clients.get(info.address)
        if client is None:
            client = self._clients[info.address] = InferenceClient(info.address, **self.client_kwargs)
        return client

    def _chunks(self, request, context):
        if not request.prompt and not request.prompt_token_ids:
            raise InvalidArgument("the prompt is empty: give prompt text or prompt_token_ids")
        yield from self.dispatcher.stream(request, context.is_active, context.time_remaining())

    def Generate(self, request, context):
        builder = ResponseBuilder(getattr(request, "request_id", ""))
        for chunk in self._chunks(request, context):
            builder.add(chunk)
        return builder.build()

    def GenerateStream(self, request, context):
        yield from self._chunks(request, context)

    def Tokenize(self, request, context):
        return self._client(request.model).tokenize(request.text, model=request.model, timeout=30)

    def ModelInfo(self, request, context):
        return self._client(request.model).model_info(model=request.model, timeout=30)

    def GetStats(self, request, context):
        replicas = self.dispatcher.replicas()
        total = sum(r.total_blocks for r in replicas)
        free = sum(r.free_blocks for r in replicas)
        return inference_pb2.ReplicaStats(
            replica=f"router ({len(replicas)} live replicas)",
            requests_running=sum(r.running for r in replicas),
            requests_waiting=sum(r.waiting for r in replicas) + self.dispatcher.queue_depth(),
            kv_cache_usage=(1 - free / total) if total else 0.0,
            kv_blocks_total=total,
            kv_blocks_free=free,
            prefix_cache_queries=sum(r.prefix_queries for r in replicas),
            prefix_cache_hits=sum(r.prefix_hits for r in replicas),
            preemptions=sum(r.preemptions for r in replicas),
        )
