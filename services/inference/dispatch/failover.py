"""The router side of routing: put a request on the stream, follow its reply stream, and when the
replica serving it stops heartbeating, continue it on another replica (prompt + tokens already
streamed, the remaining max_tokens), or answer UNAVAILABLE once retries are exhausted: never a
silent truncation. A client that goes away cancels the request on the replica (blocks freed).

Every request has a deadline (the client's, or `default_deadline_s`): past it the request ends
DEADLINE_EXCEEDED and is cancelled on the replica, whatever state it is in, so nothing waits forever.
Requests a dead replica had taken but not accepted are reclaimed by the live replicas (puller).

A request is queued on the stream of its model's name (protocol.requests_stream), so replicas of
other models never see it and each model's backlog is its own. One without a model ("": any served
model) goes to the live model with the shortest queue, or to the only model the platform knows; while
none is live and several are known, it waits unqueued for a replica to come up. Once queued, its
retries stay on that model's stream (a continuation is only valid on the model that began it).

A request for a model with no live replica is queued all the same (scale from zero: the stream's
length is what KEDA/HPA watch) and answered UNAVAILABLE when none has taken it after
`no_replica_timeout_s`; a selector nothing serves or ever served is NOT_FOUND, and a model whose
replicas report a load error is FAILED_PRECONDITION with that error, at once."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis

from tokenmill.common.errors import DeadlineExceeded, FailedPrecondition, Unavailable, from_code
from tokenmill.common.inference import Continued
from tokenmill.services.inference.dispatch.protocol import (
    CANCEL_CHANNEL,
    REPLY_TTL_S,
    Accepted,
    ReplicaInfo,
    ReplyError,
    accepted_key,
    backlog,
    cancelled_key,
    decode_reply,
    ensure_group,
    live_replicas,
    reply_key,
    request_fields,
    requests_stream,
    stream_model,
)
from tokenmill.services.inference.dispatch.registry import known_models, load_errors
from tokenmill.services.inference.dispatch.selector import Selector, check_served
from tokenmill.v1 import inference_pb2

if TYPE_CHECKING:
    from tokenmill.services.inference.metrics import RouterMetrics

log = logging.getLogger(__name__)


@dataclass
class _Routing:
    """One client request across its attempts: the original, then its continuations."""

    original: inference_pb2.GenerateRequest
    base_id: str  # the id the client sees on every chunk
    request_id: str  # the current attempt's id (names its reply stream)
    max_tokens: int  # as the first replica resolved it
    timeout_s: float  # the request's deadline, as seconds from its start
    deadline: float  # time.monotonic() at the deadline
    attempt: int = 0
    streamed: list[int] = field(default_factory=list)  # tokens already yielded, across attempts
    sent_chars: int = 0  # characters of their text already yielded
    healed_chars: int = 0  # characters token healing cut from the text's start (Accepted)
    prompt_ids: list[int] | None = None
    finished: bool = False
    stream: str = ""  # the model's request stream; "" while a request for "" waits to be queued
    entry_id: str = ""  # the current attempt's entry on `stream`

    @classmethod
    def start(cls, request: inference_pb2.GenerateRequest, timeout_s: float) -> _Routing:
        original = inference_pb2.GenerateRequest()
        original.CopyFrom(request)
        base_id = request.request_id or uuid.uuid4().hex
        deadline = time.monotonic() + timeout_s
        return cls(original, base_id, base_id, int(original.sampling.max_tokens), timeout_s, deadline)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def check_deadline(self) -> None:
        if self.remaining() <= 0:
            raise DeadlineExceeded(
                f"request {self.base_id} did not finish within its {self.timeout_s:g} s deadline "
                f"({len(self.streamed)} tokens streamed); give a longer deadline, fewer max_tokens, or "
                "check that the inference replicas are healthy"
            )

    def request(self) -> inference_pb2.GenerateRequest:
        """What to enqueue for the current attempt: a continuation once a replica reported the prompt."""
        current = inference_pb2.GenerateRequest()
        current.CopyFrom(self.original)
        current.request_id = self.request_id
        # Before any token, a healed request starts over from its own prompt: the reported one is
        # already healed (its last token gone), and healing it again would drop another.
        rehealing = self.original.sampling.token_healing and not self.streamed
        if self.prompt_ids is not None and not rehealing:
            current.prompt = ""
            del current.messages[:]  # a chat: the first replica rendered it into prompt_ids
            del current.prompt_token_ids[:]
            current.prompt_token_ids.extend(self.prompt_ids + self.streamed)
            if self.streamed:
                current.sampling.echo = False  # the prompt went out with the first chunk
                current.sampling.token_healing = False  # healed on the first attempt
            if self.max_tokens:
                current.sampling.max_tokens = max(1, self.max_tokens - len(self.streamed))
        return current

    def continued(self) -> Continued | None:
        """What the current attempt continues: the tokens and text the client already has."""
        if self.prompt_ids is None or not self.streamed:
            return None
        return Continued(len(self.streamed), self.healed_chars + self.sent_chars)

    def next_attempt(self) -> None:
        self.attempt += 1
        self.request_id = f"{self.base_id}.retry{self.attempt}"

    def accept(self, accepted: Accepted) -> None:
        if self.prompt_ids is None:
            self.prompt_ids = accepted.prompt_token_ids
            self.max_tokens = accepted.max_tokens or int(self.original.sampling.max_tokens)
            self.healed_chars = accepted.healed_chars

    def relabel(self, chunk: inference_pb2.GenerateChunk) -> inference_pb2.GenerateChunk:
        """The chunk as the client sees it: its own id, usage counted across attempts."""
        chunk.request_id = self.base_id
        self.streamed.extend(chunk.token_ids)
        self.sent_chars += len(chunk.text)
        if chunk.HasField("usage") and self.attempt:
            chunk.usage.prompt_tokens = len(self.prompt_ids or [])
            chunk.usage.completion_tokens = len(self.streamed)
        return chunk


class RouterDispatcher:
    def __init__(
        self,
        r: redis.Redis,
        *,
        dead_after_s: float = 3.0,
        max_retries: int = 2,
        poll_s: float = 0.25,
        no_replica_timeout_s: float = 10.0,
        default_deadline_s: float = 600.0,
        metrics: RouterMetrics | None = None,
    ):
        """`default_deadline_s`: the deadline of requests that come without one (config:
        `inference_limits.deadline_seconds`); `no_replica_timeout_s`: how long a request waits for
        a replica of its model (`inference_limits.no_replica_wait_seconds`)."""
        self.r = r
        self.dead_after_s = dead_after_s
        self.max_retries = max_retries
        self.poll_s = poll_s
        self.no_replica_timeout_s = no_replica_timeout_s
        self.default_deadline_s = default_deadline_s
        self.metrics = metrics
        self._grouped: set[str] = set()  # request streams whose consumer group this router made sure of

    def replicas(self) -> list[ReplicaInfo]:
        return live_replicas(self.r, self.dead_after_s)

    def routable(self) -> list[ReplicaInfo]:
        """The live replicas that take new requests (not draining): what is served right now."""
        return [r for r in self.replicas() if not r.draining]

    def queue_depth(self) -> int:
        """Routed requests no replica has taken yet, over all models."""
        return sum(length for length, _ in self.backlog().values())

    def backlog(self) -> dict[str, tuple[int, int]]:
        """Per model name: (entries in its request stream, taken by a replica but not yet answered)."""
        return backlog(self.r)

    def targets(self, model: str) -> list[ReplicaInfo]:
        """The live replicas that serve exactly `model` (dispatch.selector), or [] when it is served
        by none live right now but may be (a request for it queues). FAILED_PRECONDITION when its
        replicas could not load it, NOT_FOUND (saying what is served) when nothing serves or served
        it, INVALID_ARGUMENT for bad syntax."""
        selector = Selector.parse(model)
        replicas = self.routable()
        live = [r for r in replicas if selector is None or any(selector.matches(s) for s in r.serving())]
        if live:
            return live
        failed = [e for e in load_errors(self.r) if e.concerns(selector)]
        if failed:
            e = failed[0]
            raise FailedPrecondition(
                f"model {model or e.model!r} cannot be served: replica {e.replica_id} could not load "
                f"{e.model}: {e.message}"
            )
        known = known_models(self.r) + [s for r in replicas for s in r.serving()]
        if selector is not None and known:
            check_served(model, known, where="the platform serves")
        return []

    def live_for(self, model: str) -> list[ReplicaInfo]:
        """`targets`, but UNAVAILABLE when no replica of `model` is live (calls that cannot queue)."""
        live = self.targets(model)
        if not live:
            raise Unavailable(
                f"no inference replica of {model or 'any model'!r} is live; start some with "
                "'tokenmill serve MODEL --replicas N'"
            )
        return live

    def timeout_for(self, remaining_s: float | None) -> float:
        """The deadline of a request, in seconds: the client's, or the default when it gave none
        (gRPC reports "none" as None or a huge number)."""
        if remaining_s is None or remaining_s > 10 * 365 * 86400:
            return self.default_deadline_s
        return max(0.0, remaining_s)

    def cancel(self, request_id: str) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.set(cancelled_key(request_id), "1", ex=REPLY_TTL_S)
        pipe.publish(CANCEL_CHANNEL, request_id)
        pipe.delete(reply_key(request_id))
        pipe.execute()

    def stream(
        self,
        request: inference_pb2.GenerateRequest,
        is_active: Callable[[], bool] = lambda: True,
        timeout_s: float | None = None,
    ) -> Iterator[inference_pb2.GenerateChunk]:
        """Route one request and yield its chunks; raises the replica's error, UNAVAILABLE, or
        DEADLINE_EXCEEDED once `timeout_s` (default: `default_deadline_s`) has passed."""
        live = self.targets(request.model)
        routing = _Routing.start(request, self.timeout_for(timeout_s))
        if self.metrics is not None:
            self.metrics.requests.labels(model=request.model.partition(":")[0]).inc()
        self._enqueue(routing, live)
        try:
            while True:
                died = yield from self._follow(routing, is_active)
                if died is None:
                    return
                self._continue_elsewhere(routing, died)
        finally:
            if routing.finished:
                self.r.delete(reply_key(routing.request_id))
            else:
                self.cancel(routing.request_id)
                # Not taken yet (no replica came): drop it, so the backlog autoscalers read is real demand.
                if routing.entry_id and not self.r.xdel(routing.stream, routing.entry_id):
                    self._drop_handed_back(routing)

    def _drop_handed_back(self, routing: _Routing) -> None:
        """Drop the entries a replica handed the current attempt back as (draining, or serving
        another version: puller._process, _route_elsewhere): new entries after the original."""
        if self.r.exists(accepted_key(routing.request_id)):
            return  # a replica accepted this attempt: nothing was handed back
        later = self.r.xrange(routing.stream, min=f"({routing.entry_id}")
        stale = [eid for eid, fields in later if fields.get("rid") == routing.request_id]
        if stale:
            self.r.xdel(routing.stream, *stale)

    def _stream_name(self, model: str, live: list[ReplicaInfo]) -> str | None:
        """The model name whose stream a request for `model` queues on: its selector's name; for ""
        the live base model with the shortest queue, else the one model known; None while undecided."""
        selector = Selector.parse(model)
        if selector is not None:
            return selector.name
        names = sorted({info.name for info in live})
        if not names:
            known = {s.name for s in known_models(self.r)}
            return known.pop() if len(known) == 1 else None
        pipe = self.r.pipeline(transaction=False)
        for name in names:
            pipe.xlen(requests_stream(name))
        queued = dict(zip(names, pipe.execute(), strict=True))
        return min(names, key=lambda name: (queued[name], name))

    def _enqueue(self, routing: _Routing, live: list[ReplicaInfo]) -> None:
        """Route the current attempt on its model's stream (a request for "" that cannot be placed
        yet stays unqueued); a request id a client reuses starts with a clean fence."""
        if not routing.stream:
            name = self._stream_name(routing.original.model, live)
            if name is None:
                return
            routing.stream = requests_stream(name)
        if routing.stream not in self._grouped:  # the group KEDA reads the lag of, before any replica
            ensure_group(self.r, routing.stream)
            self._grouped.add(routing.stream)
        request = routing.request()
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(accepted_key(request.request_id), cancelled_key(request.request_id))
        fields = request_fields(request, time.time() + routing.remaining(), routing.continued())
        pipe.xadd(routing.stream, fields)
        routing.entry_id = pipe.execute()[-1]

    def _follow(
        self, routing: _Routing, is_active: Callable[[], bool]
    ) -> Generator[inference_pb2.GenerateChunk, None, str | None]:
        """Yield the current attempt's chunks. Returns the id of the replica that died serving it,
        or None once the request finished or the client went away."""
        key = reply_key(routing.request_id)
        replica: str | None = None
        last_id, queued_since = "0", time.monotonic()
        while is_active():
            routing.check_deadline()
            block_ms = max(1, int(min(self.poll_s, routing.remaining()) * 1000))
            resp = self.r.xread({key: last_id}, count=256, block=block_ms)
            if not resp:
                if replica is None:
                    self._check_waiting(routing, time.monotonic() - queued_since)
                elif replica not in {i.replica_id for i in self.replicas()}:
                    return replica
                continue
            for _key, messages in resp:
                for msg_id, fields in messages:
                    last_id = msg_id
                    reply = decode_reply(fields)
                    if isinstance(reply, Accepted):
                        replica = reply.replica
                        if self.metrics is not None and not routing.attempt:
                            wait = time.monotonic() - queued_since
                            name = routing.original.model.partition(":")[0]
                            self.metrics.queue_wait.labels(model=name).observe(wait)
                        routing.accept(reply)
                    elif isinstance(reply, ReplyError):
                        raise from_code(reply.code, reply.message)
                    elif reply is not None:
                        yield routing.relabel(reply)
                        if reply.finish_reason:
                            routing.finished = True
                            return None
        return None

    def _check_waiting(self, routing: _Routing, waited_s: float) -> None:
        """A queued request nobody took yet: fail it once no replica of its model came up within
        the wait (or at once when they report a load error); otherwise keep waiting. A request
        for "" not queued yet is queued as soon as a replica is live; once queued, it waits for its
        stream's model like any other."""
        model = routing.original.model
        live = self.targets(model)
        if live and not routing.entry_id:
            self._enqueue(routing, live)
        if routing.stream and not model:  # "" queued on one model's stream: only that model takes it
            model = stream_model(routing.stream)
            live = [info for info in live if info.serves_name(model)]
        if live or waited_s <= self.no_replica_timeout_s:
            return
        raise Unavailable(
            f"no inference replica of {model or 'any model'!r} became live within "
            f"{self.no_replica_timeout_s:g} s (the request was queued for the autoscaler); start one "
            "with 'tokenmill serve MODEL' or check the autoscaler"
        )

    def _continue_elsewhere(self, routing: _Routing, died: str) -> None:
        """The replica serving the request died: enqueue its continuation, or give up."""
        if routing.attempt >= self.max_retries:
            raise Unavailable(
                f"replica {died} died while serving request {routing.base_id} after {len(routing.streamed)} "
                f"tokens and {self.max_retries} retries failed; the output is incomplete, retry the request"
            )
        log.warning(
            "replica %s died serving %s; retrying (attempt %d)", died, routing.base_id, routing.attempt + 1
        )
        self.r.delete(reply_key(routing.request_id))
        routing.next_attempt()
        self._enqueue(routing, self.targets(routing.original.model))
