"""The Redis wire protocol between the router and the replicas (docs/contracts.md "Redis keys").

A routed request is an entry on the stream of its model's name, `tokenmill:inference:requests:{name}`
(consumer group `replicas`): a replica reads only the streams of the names it serves, and each
model's backlog is its own (what the autoscaler of that model's replicas reads). Its outputs come
back on the per-request reply stream `tokenmill:inference:reply:{id}` as `accepted` (replica id,
prompt token ids, resolved max_tokens), `chunk` (a GenerateChunk) or `error` (code + message)
messages. Replicas heartbeat a `ReplicaInfo` into the hash `tokenmill:inference:replicas`; a client
that goes away sets `cancelled:{id}` and publishes the id on the cancel channel.

Exactly one acceptance per request: a replica posts `accepted` only through `post_acceptance`, which
sets `accepted:{id}` first (SET NX, atomically with the XADD), so when a request taken by a replica
presumed dead is reclaimed by another, at most one of them serves it. Every entry carries its
deadline (`dl`, epoch seconds): a replica does not start a request past it and cancels one that
runs past it.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from tokenmill.common.inference import Continued, EngineStats
from tokenmill.services.inference.dispatch.selector import Served
from tokenmill.v1 import inference_pb2

NS = "tokenmill:inference"
REQUESTS_PREFIX = f"{NS}:requests:"  # + the model name: one request stream per served model
GROUP = "replicas"
REPLICAS = f"{NS}:replicas"
CANCEL_CHANNEL = f"{NS}:cancel"
REPLY_TTL_S = 600

Fields = dict[str, str]


def reply_key(request_id: str) -> str:
    return f"{NS}:reply:{request_id}"


def cancelled_key(request_id: str) -> str:
    return f"{NS}:cancelled:{request_id}"


def accepted_key(request_id: str) -> str:
    return f"{NS}:accepted:{request_id}"


def requests_stream(name: str) -> str:
    """The stream routed requests for model `name` (no version or tag) are queued on."""
    return f"{REQUESTS_PREFIX}{name}"


def stream_model(stream: str) -> str:
    """The model name a request stream belongs to (the inverse of `requests_stream`)."""
    return stream.removeprefix(REQUESTS_PREFIX)


def ensure_group(r: redis.Redis, stream: str) -> None:
    """Create the replicas' consumer group (and the stream) unless it exists: from id 0, so entries
    queued before the first replica of the model came up are delivered."""
    try:
        r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def model_streams(r: redis.Redis) -> list[str]:
    """The model names that have a request stream, sorted. SCAN, not the model registry: a name
    queued before anything registered it (scale from zero on a fresh platform) has a backlog too."""
    keys = r.scan_iter(match=f"{REQUESTS_PREFIX}*", count=1000, _type="STREAM")
    return sorted({stream_model(k) for k in keys})


def backlog(r: redis.Redis) -> dict[str, tuple[int, int]]:
    """Per model name: (entries in its request stream, entries taken by a replica, not answered)."""
    names = model_streams(r)
    pipe = r.pipeline(transaction=False)
    for name in names:
        pipe.xlen(requests_stream(name))
        pipe.xpending(requests_stream(name), GROUP)
    replies = pipe.execute(raise_on_error=False)  # XPENDING without the group (yet) errs: none taken
    out = {}
    for i, name in enumerate(names):
        length, pending = replies[2 * i], replies[2 * i + 1]
        out[name] = (int(length), int(pending.get("pending", 0)) if isinstance(pending, dict) else 0)
    return out


def _b64(msg: Any) -> str:
    return base64.b64encode(msg.SerializeToString()).decode()


# -- routed requests ---------------------------------------------------------------------------


def request_fields(
    request: inference_pb2.GenerateRequest, deadline: float, continued: Continued | None = None
) -> Fields:
    """The stream entry that routes `request` (its id names the reply stream); `deadline` is epoch
    seconds; `continued`: the request resumes one whose replica died (its prompt ends with the
    tokens generated so far, `gen`, whose text reached the client up to `sent` characters)."""
    fields = {
        "rid": request.request_id,
        "reply": reply_key(request.request_id),
        "req": _b64(request),
        "t": str(time.time()),
        "dl": repr(deadline),
    }
    if continued is not None and continued.tokens:
        fields.update(gen=str(continued.tokens), sent=str(continued.text_chars))
    return fields


@dataclass(frozen=True)
class RoutedEntry:
    """A routed request as read from the stream; the request itself is decoded on demand."""

    request_id: str
    reply: str
    payload: str | None  # the base64 GenerateRequest
    deadline: float = 0.0  # epoch seconds; 0 = none given (an entry from an older router)
    continued: Continued | None = None  # a failover continuation (request_fields)

    @classmethod
    def from_fields(cls, fields: Fields | None) -> RoutedEntry | None:
        """None for an entry without a request id or reply stream (nothing to answer to)."""
        fields = fields or {}
        rid, reply = fields.get("rid", ""), fields.get("reply", "")
        if not rid or not reply:
            return None
        try:
            deadline = float(fields.get("dl") or 0.0)
        except ValueError:
            deadline = 0.0
        return cls(rid, reply, fields.get("req"), deadline, _continued(fields))

    def expired(self, now: float | None = None) -> bool:
        return bool(self.deadline) and (now if now is not None else time.time()) >= self.deadline

    def decode(self) -> inference_pb2.GenerateRequest:
        """The request, its id set; raises (answered as INTERNAL) when the entry is malformed."""
        if self.payload is None:
            raise ValueError("the routed entry carries no request")
        request = inference_pb2.GenerateRequest.FromString(base64.b64decode(self.payload))
        request.request_id = self.request_id
        return request


def _continued(fields: Fields) -> Continued | None:
    """The entry's continuation (None for a first attempt); malformed counts are a ValueError,
    answered as INTERNAL like any malformed entry, when the request is decoded."""
    if "gen" not in fields:
        return None
    try:
        return Continued(int(fields["gen"]), int(fields.get("sent") or 0))
    except ValueError:
        return Continued(-1)  # refused by the engine with the reason


# -- replies -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accepted:
    """A replica took the request: who, the prompt as tokens, and max_tokens as resolved there."""

    replica: str
    prompt_token_ids: list[int]
    max_tokens: int = 0  # 0 = not reported; the request's own value stands
    # Characters token healing cuts from the start of the output's text (the prompt's own, generated
    # again): a continuation's text starts with them.
    healed_chars: int = 0


@dataclass(frozen=True)
class ReplyError:
    code: str  # a tokenmill.common.errors code
    message: str


Reply = Accepted | ReplyError | inference_pb2.GenerateChunk


# KEYS: accepted:{id}, the reply stream, cancelled:{id}. ARGV: replica id, accepted body, TTL.
# 1 = this replica serves the request; 0 = another replica already accepted it; -1 = it was cancelled.
_ACCEPT = """
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[3]) then return 0 end
redis.call('XADD', KEYS[2], '*', 't', 'accepted', 'd', ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
"""


def post_acceptance(r: redis.Redis, entry: RoutedEntry, accepted: Accepted) -> bool:
    """Post `accepted` unless another replica accepted this request first or it was cancelled: the
    fence that keeps a reclaimed request from being served twice. True when this replica serves it."""
    keys = [accepted_key(entry.request_id), entry.reply, cancelled_key(entry.request_id)]
    args = [accepted.replica, json.dumps(asdict(accepted)), REPLY_TTL_S]
    return int(r.eval(_ACCEPT, len(keys), *keys, *args)) == 1


def error_fields(code: str, message: str) -> Fields:
    return {"t": "error", "code": code, "msg": message}


def chunk_fields(chunk: inference_pb2.GenerateChunk) -> Fields:
    return {"t": "chunk", "d": _b64(chunk)}


def decode_reply(fields: Fields) -> Reply | None:
    """One reply message; None for a kind this side does not know (skipped, as before)."""
    kind = fields.get("t")
    if kind == "accepted":
        body = json.loads(fields["d"])
        return Accepted(
            body["replica"],
            list(body["prompt_token_ids"]),
            int(body.get("max_tokens") or 0),
            int(body.get("healed_chars") or 0),
        )
    if kind == "error":
        return ReplyError(fields.get("code", "INTERNAL"), fields.get("msg", "replica error"))
    if kind == "chunk":
        return inference_pb2.GenerateChunk.FromString(base64.b64decode(fields["d"]))
    return None


# -- heartbeats --------------------------------------------------------------------------------


@dataclass
class ReplicaInfo:
    """A replica's heartbeat: where to reach it, what it serves and how loaded it is."""

    replica_id: str
    address: str
    model: str  # resolved ref "name:version"
    time: float
    free_blocks: int = 0
    total_blocks: int = 0
    running: int = 0
    waiting: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0
    tags: list[str] = field(default_factory=list)  # the tags `model` was resolved through
    adapters: dict[str, list[str]] = field(default_factory=dict)  # LoRA adapter ref -> its tags
    # Shutting down (SIGTERM: removed or replaced): finishing what it took, taking nothing new. Still
    # live (its requests are not failed over), but no longer a routing target for new ones.
    draining: bool = False

    @property
    def name(self) -> str:
        return self.model.split(":")[0]

    @property
    def served(self) -> Served:
        return Served(self.model, tuple(self.tags))

    def serving(self) -> list[Served]:
        """The base model and each LoRA adapter loaded over it (each addressable as a model)."""
        return [self.served, *(Served(ref, tuple(tags)) for ref, tags in self.adapters.items())]

    def serves_name(self, name: str) -> bool:
        """Whether any version of model `name` (base or adapter) is served: it reads that name's stream."""
        return any(s.name == name for s in self.serving())

    @classmethod
    def from_stats(
        cls, replica_id: str, address: str, serving: list[Served], stats: EngineStats, draining: bool = False
    ) -> ReplicaInfo:
        """`serving`: the base model first, then the adapters (Replica.serving)."""
        served, adapters = serving[0], serving[1:]
        return cls(
            replica_id=replica_id,
            address=address,
            model=served.ref,
            tags=list(served.tags),
            adapters={a.ref: list(a.tags) for a in adapters},
            time=time.time(),
            free_blocks=stats.kv_blocks_free,
            total_blocks=stats.kv_blocks_total,
            running=stats.requests_running,
            waiting=stats.requests_waiting,
            prefix_queries=stats.prefix_cache_queries,
            prefix_hits=stats.prefix_cache_hits,
            preemptions=stats.preemptions,
            draining=draining,
        )


def publish_heartbeat(r: redis.Redis, info: ReplicaInfo) -> None:
    r.hset(REPLICAS, info.replica_id, json.dumps(asdict(info)))


def live_replicas(r: redis.Redis, dead_after_s: float) -> list[ReplicaInfo]:
    """Replicas whose last heartbeat is at most `dead_after_s` old (unparsable entries skipped)."""
    now = time.time()
    out = []
    for _rid, raw in r.hgetall(REPLICAS).items():
        try:
            info = ReplicaInfo(**json.loads(raw))
        except (TypeError, ValueError):
            continue
        if now - info.time <= dead_after_s:
            out.append(info)
    return out
