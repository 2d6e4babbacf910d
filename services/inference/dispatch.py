"""Pull-based request routing over Redis (docs/contracts.md "Redis keys").

Router side: a request goes onto the stream `tokenmill:inference:requests` (consumer group
`replicas`); its outputs come back on a per-request reply stream `tokenmill:inference:reply:{id}`.
Replica side: a replica reads new entries only while it has room (few waiting requests and free
KV blocks), so load balances itself and the stream's lag is the autoscaling signal.

Reply messages: `accepted` (replica id + prompt token ids), `chunk` (a GenerateChunk), `error`
(code + message). Replicas heartbeat into the hash `tokenmill:inference:replicas`; when the replica
serving a request stops heartbeating, the router resubmits the request as a continuation
(prompt + tokens already streamed, the remaining max_tokens) to another replica, or answers
UNAVAILABLE when retries are exhausted: never a silent truncation. A client that goes away
publishes a cancel that the serving replica turns into an engine abort (blocks freed).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from tokenmill.common.errors import NotFound, TokenmillError, Unavailable, from_code
from tokenmill.services.inference.convert import chunk_from_output
from tokenmill.v1 import inference_pb2

log = logging.getLogger(__name__)

NS = "tokenmill:inference"
REQUESTS = f"{NS}:requests"
GROUP = "replicas"
REPLICAS = f"{NS}:replicas"
CANCEL_CHANNEL = f"{NS}:cancel"
REPLY_TTL_S = 600


def reply_key(request_id: str) -> str:
    return f"{NS}:reply:{request_id}"


def cancelled_key(request_id: str) -> str:
    return f"{NS}:cancelled:{request_id}"


def _b64(msg) -> str:
    return base64.b64encode(msg.SerializeToString()).decode()


def _unb64(cls, data: str):
    return cls.FromString(base64.b64decode(data))


def ensure_group(r: redis.Redis) -> None:
    try:
        r.xgroup_create(REQUESTS, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


@dataclass
class ReplicaInfo:
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

    @property
    def name(self) -> str:
        return self.model.split(":")[0]


def live_replicas(r: redis.Redis, dead_after_s: float) -> list[ReplicaInfo]:
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


# ---------------------------------------------------------------------------- replica side


class ReplicaPuller:
    """Runs next to a Replica: pulls routed requests, forwards outputs, heartbeats, honours cancels."""

    def __init__(
        self,
        replica,
        r: redis.Redis,
        address: str,
        *,
        heartbeat_s: float = 0.5,
        max_waiting: int | None = None,
        batch: int = 16,
    ):
        self.replica = replica
        self.r = r
        self.address = address
        self.heartbeat_s = heartbeat_s
        cfg = replica.engine.config
        self.max_waiting = max_waiting if max_waiting is not None else max(4, cfg.max_num_seqs // 2)
        self.batch = batch
        self.consumer = replica.replica_id
        self.active: dict[str, tuple[str, Any]] = {}  # request id -> (reply key, stream)
        self._lock = threading.Lock()
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pubsub = None

    def start(self) -> None:
        ensure_group(self.r)
        self._pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(CANCEL_CHANNEL)
        if self.replica.ready.is_set():
            self.heartbeat()  # visible to routers as soon as start() returns
        for fn in (self._pull_loop, self._forward_loop, self._heartbeat_loop, self._cancel_loop):
            t = threading.Thread(target=fn, name=f"{fn.__name__}-{self.consumer}", daemon=True)
            t.start()
            self._threads.append(t)

    def drain(self, timeout: float) -> bool:
        """Stop taking new work and wait for the routed requests in flight to finish (SIGTERM)."""
        self._draining.set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self.active:
                    return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        self._stop.set()
        self._out.put(None)
        for t in self._threads:
            t.join(timeout=3)
        try:
            self.r.hdel(REPLICAS, self.consumer)
            if self._pubsub is not None:
                self._pubsub.close()
        except redis.RedisError:
            pass

    # -- pulling ---------------------------------------------------------------------------

    def capacity(self) -> int:
        """How many new requests to take now: keep a short local queue, leave the rest in Redis."""
        s = self.replica.aengine.stats()
        waiting = s["requests_waiting"] + len(self.replica.aengine._pending)
        if s["kv_blocks_total"] and s["kv_blocks_free"] / s["kv_blocks_total"] < 0.02 and waiting > 0:
            return 0
        return max(0, min(self.batch, self.max_waiting - waiting))

    def _pull_loop(self) -> None:
        while not self._stop.is_set():
            if not self.replica.ready.is_set() or self._draining.is_set():
                self._stop.wait(0.05)
                continue
            n = self.capacity()
            if n == 0:
                self._stop.wait(0.01)
                continue
            try:
                resp = self.r.xreadgroup(GROUP, self.consumer, {REQUESTS: ">"}, count=n, block=500)
            except redis.ResponseError as exc:  # the group vanished (FLUSHDB): recreate it
                log.warning("xreadgroup failed (%s); recreating the consumer group", exc)
                ensure_group(self.r)
                continue
            except redis.RedisError:
                log.exception("redis unavailable; retrying")
                self._stop.wait(1.0)
                continue
            for _stream, entries in resp or []:
                for entry_id, fields in entries:
                    try:
                        if self._draining.is_set():  # read while drain began: hand it back to the queue
                            self.r.xadd(REQUESTS, fields)
                        else:
                            self._handle(fields)
                    finally:
                        self.r.xack(REQUESTS, GROUP, entry_id)
                        self.r.xdel(REQUESTS, entry_id)

    def _handle(self, fields: dict[str, str]) -> None:
        rid, reply = fields.get("rid", ""), fields.get("reply", "")
        if not rid or not reply:
            return
        if self.r.exists(cancelled_key(rid)):
            return
        try:
            request = _unb64(inference_pb2.GenerateRequest, fields["req"])
            request.request_id = rid
            stream = self.replica.submit(request, sink=self._sink)
        except TokenmillError as exc:
            self._post(reply, {"t": "error", "code": exc.code, "msg": exc.message})
            return
        except Exception as exc:
            log.exception("could not start routed request %s", rid)
            self._post(reply, {"t": "error", "code": "INTERNAL", "msg": f"replica failed to start it: {exc}"})
            return
        with self._lock:
            self.active[rid] = (reply, stream)
        accepted = {
            "replica": self.consumer,
            "prompt_token_ids": stream.request.prompt_token_ids,
            "max_tokens": stream.request.params.max_tokens,  # resolved (0 = server default on the wire)
        }
        self._post(reply, {"t": "accepted", "d": json.dumps(accepted)})

    def _post(self, reply: str, fields: dict[str, str]) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.xadd(reply, fields)
        pipe.expire(reply, REPLY_TTL_S)
        pipe.execute()

    # -- forwarding (engine thread -> Redis) ---------------------------------------------------

    def _sink(self, stream, item) -> None:
        self._out.put((stream.request_id, item))

    def _forward_loop(self) -> None:
        while not self._stop.is_set():
            first = self._out.get()
            if first is None:
                return
            batch = [first]
            while True:
                try:
                    nxt = self._out.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._stop.set()
                    break
                batch.append(nxt)
            pipe = self.r.pipeline(transaction=False)
            done = []
            for rid, item in batch:
                with self._lock:
                    entry = self.active.get(rid)
                if entry is None:
                    continue
                reply = entry[0]
                if item is None:
                    done.append(rid)
                    continue
                if isinstance(item, TokenmillError):
                    pipe.xadd(reply, {"t": "error", "code": item.code, "msg": item.message})
                    done.append(rid)
                elif isinstance(item, BaseException):
                    pipe.xadd(reply, {"t": "error", "code": "INTERNAL", "msg": str(item)})
                    done.append(rid)
                else:
                    pipe.xadd(reply, {"t": "chunk", "d": _b64(chunk_from_output(item, self.consumer))})
                    if item.finished:
                        done.append(rid)
                pipe.expire(reply, REPLY_TTL_S)
            try:
                pipe.execute()
            except redis.RedisError:
                log.exception("could not forward %d outputs", len(batch))
            with self._lock:
                for rid in done:
                    self.active.pop(rid, None)

    # -- heartbeat and cancels -------------------------------------------------------------

    def heartbeat(self) -> None:
        s = self.replica.aengine.stats()
        info = ReplicaInfo(
            replica_id=self.consumer,
            address=self.address,
            model=self.replica.loaded.ref,
            time=time.time(),
            free_blocks=s["kv_blocks_free"],
            total_blocks=s["kv_blocks_total"],
            running=s["requests_running"],
            waiting=s["requests_waiting"],
            prefix_queries=s["prefix_cache_queries"],
            prefix_hits=s["prefix_cache_hits"],
            preemptions=s["preemptions"],
        )
        self.r.hset(REPLICAS, self.consumer, json.dumps(info.__dict__))

    def _heartbeat_loop(self) -> None:
        while not self._stop.is_set():
            if self.replica.ready.is_set():
                try:
                    self.heartbeat()
                except redis.RedisError:
                    log.warning("heartbeat failed", exc_info=True)
            self._stop.wait(self.heartbeat_s)

    def _cancel_loop(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._pubsub.get_message(timeout=0.5)
            except (redis.RedisError, ValueError, AttributeError):
                if self._stop.is_set():
                    return
                self._stop.wait(0.5)
                continue
            if not msg:
                continue
            rid = msg.get("data")
            with self._lock:
                entry = self.active.get(rid)
            if entry is not None:
                entry[1].cancel()


# ---------------------------------------------------------------------------- router side


class RouterDispatcher:
    def __init__(
        self,
        r: redis.Redis,
        *,
        dead_after_s: float = 3.0,
        max_retries: int = 2,
        poll_s: float = 0.25,
        no_replica_timeout_s: float = 10.0,
    ):
        self.r = r
        self.dead_after_s = dead_after_s
        self.max_retries = max_retries
        self.poll_s = poll_s
        self.no_replica_timeout_s = no_replica_timeout_s
        ensure_group(r)

    def replicas(self) -> list[ReplicaInfo]:
        return live_replicas(self.r, self.dead_after_s)

    def check_model(self, model: str, replicas: list[ReplicaInfo]) -> None:
        if not replicas:
            raise Unavailable(
                "no inference replica is running; start some with 'tokenmill serve MODEL --replicas N'"
            )
        if model and model.split(":")[0] not in {r.name for r in replicas}:
            served = sorted({r.model for r in replicas})
            raise NotFound(f"model {model!r} is not served; the replicas serve {served}")

    def _enqueue(self, request: inference_pb2.GenerateRequest) -> None:
        self.r.xadd(
            REQUESTS,
            {
                "rid": request.request_id,
                "reply": reply_key(request.request_id),
                "req": _b64(request),
                "t": str(time.time()),
            },
        )

    def cancel(self, request_id: str) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.set(cancelled_key(request_id), "1", ex=REPLY_TTL_S)
        pipe.publish(CANCEL_CHANNEL, request_id)
        pipe.delete(reply_key(request_id))
        pipe.execute()

    def stream(
        self, request: inference_pb2.GenerateRequest, is_active: Callable[[], bool] = lambda: True
    ) -> Iterator[inference_pb2.GenerateChunk]:
        """Route one request and yield its chunks; raises the replica's error or UNAVAILABLE."""
        self.check_model(request.model, self.replicas())
        base_id = request.request_id or uuid.uuid4().hex
        original = inference_pb2.GenerateRequest()
        original.CopyFrom(request)
        attempt = 0
        streamed: list[int] = []  # tokens already yielded, across attempts
        prompt_ids: list[int] | None = None
        max_tokens = int(original.sampling.max_tokens)
        rid = base_id
        current = inference_pb2.GenerateRequest()
        current.CopyFrom(original)
        current.request_id = rid
        self._enqueue(current)
        finished = False
        try:
            while True:
                replica, last_id, queued_since = None, "0", time.monotonic()
                retry = False
                while not retry:
                    if not is_active():
                        return
                    resp = self.r.xread({reply_key(rid): last_id}, count=256, block=int(self.poll_s * 1000))
                    if not resp:
                        live = {i.replica_id for i in self.replicas()}
                        if replica is not None and replica not in live:
                            retry = True
                        elif (
                            replica is None
                            and not live
                            and time.monotonic() - queued_since > self.no_replica_timeout_s
                        ):
                            raise Unavailable(
                                "no inference replica picked up the request; are replicas running?"
                            )
                        continue
                    for _key, messages in resp:
                        for msg_id, fields in messages:
                            last_id = msg_id
                            kind = fields.get("t")
                            if kind == "accepted":
                                body = json.loads(fields["d"])
                                replica = body["replica"]
                                if prompt_ids is None:
                                    prompt_ids = body["prompt_token_ids"]
                                    max_tokens = int(body.get("max_tokens") or original.sampling.max_tokens)
                            elif kind == "error":
                                raise from_code(
                                    fields.get("code", "INTERNAL"), fields.get("msg", "replica error")
                                )
                            elif kind == "chunk":
                                chunk = _unb64(inference_pb2.GenerateChunk, fields["d"])
                                chunk.request_id = base_id
                                streamed.extend(chunk.token_ids)
                                if chunk.HasField("usage") and attempt:
                                    chunk.usage.prompt_tokens = len(prompt_ids or [])
                                    chunk.usage.completion_tokens = len(streamed)
                                yield chunk
                                if chunk.finish_reason:
                                    finished = True
                                    return
                # The replica serving this request died: continue it elsewhere.
                attempt += 1
                if attempt > self.max_retries:
                    raise Unavailable(
                        f"replica {replica} died while serving request {base_id} after {len(streamed)} tokens "
                        f"and {self.max_retries} retries failed; the output is incomplete, retry the request"
                    )
                log.warning("replica %s died serving %s; retrying (attempt %d)", replica, base_id, attempt)
                self.r.delete(reply_key(rid))
                rid = f"{base_id}.retry{attempt}"
                current = inference_pb2.GenerateRequest()
                current.CopyFrom(original)
                current.request_id = rid
                if prompt_ids is not None:
                    current.prompt = ""
                    del current.prompt_token_ids[:]
                    current.prompt_token_ids.extend(prompt_ids + streamed)
                    if max_tokens:
                        current.sampling.max_tokens = max(1, max_tokens - len(streamed))
                self.check_model(request.model, self.replicas())
                self._enqueue(current)
        finally:
            if not finished:
                self.cancel(rid)
            else:
                self.r.delete(reply_key(rid))


def default_replica_id() -> str:
    return f"replica-{os.getpid()}-{uuid.uuid4().hex[:6]}"
