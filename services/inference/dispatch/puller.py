"""The replica side of routing: pull requests while there is room, stream outputs back, heartbeat,
honour cancels. Four threads, one job each, sharing the table of routed requests in flight."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import redis

from tokenmill.common.errors import TokenmillError
from tokenmill.common.inference import RequestOutput
from tokenmill.common.inference.async_engine import RequestStream
from tokenmill.common.redis_conn import InterruptibleReads
from tokenmill.services.inference.convert import chunk_from_output
from tokenmill.services.inference.dispatch.protocol import (
    CANCEL_CHANNEL,
    GROUP,
    REPLICAS,
    REPLY_TTL_S,
    REQUESTS,
    Accepted,
    Fields,
    ReplicaInfo,
    RoutedEntry,
    accepted_fields,
    cancelled_key,
    chunk_fields,
    ensure_group,
    error_fields,
    publish_heartbeat,
)

if TYPE_CHECKING:
    from tokenmill.services.inference.replica import Replica

log = logging.getLogger(__name__)

LOW_KV_FRACTION = 0.02  # below this share of free KV blocks, take no work while some is queued

# What the engine thread hands the forwarder: an output, an error, or None at the end.
Outcome: TypeAlias = RequestOutput | BaseException | None


def default_replica_id() -> str:
    return f"replica-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class ReplicaPuller:
    """Runs next to a Replica: pulls routed requests, forwards outputs, heartbeats, honours cancels."""

    def __init__(
        self,
        replica: Replica,
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
        self.active: dict[str, tuple[str, RequestStream]] = {}  # request id -> (reply key, stream)
        self._lock = threading.Lock()
        self._out: queue.SimpleQueue[tuple[str, Outcome] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pubsub: Any = None  # redis.client.PubSub once started
        self._reads = InterruptibleReads(r)  # stop() ends the pull loop's wait at once

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
        self._reads.interrupt()
        with contextlib.suppress(redis.RedisError):
            self.r.publish(CANCEL_CHANNEL, "")  # wakes the cancel loop (no request has id "")
        for t in self._threads:
            t.join(timeout=3)
        self._reads.close()
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
        if s.kv_free_fraction < LOW_KV_FRACTION and s.requests_waiting > 0:
            return 0
        return max(0, min(self.batch, self.max_waiting - s.requests_waiting))

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
                resp = self._reads.run(self._take(n))
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

    def _take(self, count: int) -> Callable[[redis.Redis], Any]:
        """A read of up to `count` new routed requests, blocking up to 0.5 s for the first."""
        return lambda r: r.xreadgroup(GROUP, self.consumer, {REQUESTS: ">"}, count=count, block=500)

    def _handle(self, fields: Fields) -> None:
        entry = RoutedEntry.from_fields(fields)
        if entry is None or self.r.exists(cancelled_key(entry.request_id)):
            return
        try:
            stream = self.replica.submit(entry.decode(), sink=self._sink)
        except TokenmillError as exc:
            self._post(entry.reply, error_fields(exc.code, exc.message))
            return
        except Exception as exc:
            log.exception("could not start routed request %s", entry.request_id)
            self._post(entry.reply, error_fields("INTERNAL", f"replica failed to start it: {exc}"))
            return
        with self._lock:
            self.active[entry.request_id] = (entry.reply, stream)
        accepted = Accepted(
            replica=self.consumer,
            prompt_token_ids=stream.request.prompt_token_ids,
            max_tokens=stream.request.params.max_tokens,  # resolved (0 = server default on the wire)
        )
        self._post(entry.reply, accepted_fields(accepted))

    def _post(self, reply: str, fields: Fields) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.xadd(reply, fields)
        pipe.expire(reply, REPLY_TTL_S)
        pipe.execute()

    # -- forwarding (engine thread -> Redis) ---------------------------------------------------

    def _sink(self, stream: RequestStream, item: Outcome) -> None:
        self._out.put((stream.request_id, item))

    def _next_batch(self) -> list[tuple[str, Outcome]] | None:
        """Block for one outcome, then take whatever else is queued; None once stopping."""
        first = self._out.get()
        if first is None:
            return None
        batch = [first]
        while True:
            try:
                nxt = self._out.get_nowait()
            except queue.Empty:
                return batch
            if nxt is None:
                self._stop.set()
                return batch
            batch.append(nxt)

    def _forward_loop(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            if batch is None:
                return
            pipe = self.r.pipeline(transaction=False)
            done = []
            for rid, item in batch:
                with self._lock:
                    entry = self.active.get(rid)
                if entry is None:
                    continue
                if item is None or self._forward(pipe, entry[0], item):
                    done.append(rid)
            try:
                pipe.execute()
            except redis.RedisError:
                log.exception("could not forward %d outputs", len(batch))
            with self._lock:
                for rid in done:
                    self.active.pop(rid, None)

    def _forward(self, pipe: Any, reply: str, item: RequestOutput | BaseException) -> bool:
        """Queue one outcome on `pipe`; True when it ends the request."""
        if isinstance(item, TokenmillError):
            fields, final = error_fields(item.code, item.message), True
        elif isinstance(item, BaseException):
            fields, final = error_fields("INTERNAL", str(item)), True
        else:
            fields, final = chunk_fields(chunk_from_output(item, self.consumer)), item.finished
        pipe.xadd(reply, fields)
        pipe.expire(reply, REPLY_TTL_S)
        return final

    # -- heartbeat and cancels -------------------------------------------------------------

    def heartbeat(self) -> None:
        stats = self.replica.aengine.stats()
        publish_heartbeat(
            self.r, ReplicaInfo.from_stats(self.consumer, self.address, self.replica.loaded.ref, stats)
        )

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
