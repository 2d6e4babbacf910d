"""The replica side of routing: pull requests while there is room, stream outputs back, heartbeat,
honour cancels and deadlines. Four threads, one job each, sharing the table of routed requests in flight.

A replica reads, claims and acks only the request streams of the model names it serves (its base
model and each LoRA adapter loaded over it; protocol.requests_stream), all in one XREADGROUP: a
request for another model is never taken. Within one name, a request for a version or tag this
replica does not serve (demo-model:2 taken by a replica of demo-model:1) goes back on that stream.

Nothing taken is lost: a request stays in the taker's pending list (PEL) until it is accepted or
answered. Requests a replica took and then died with (its heartbeat expired, the entries idle past
the lease) are claimed by a live replica of that model; a restarted replica first re-reads its own
pending list on each of its streams.
The acceptance fence (protocol.post_acceptance) makes sure a reclaimed request is served once."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import redis

from tokenmill.common import failpoints
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
    Accepted,
    Fields,
    ReplicaInfo,
    RoutedEntry,
    accepted_key,
    cancelled_key,
    chunk_fields,
    ensure_group,
    error_fields,
    live_replicas,
    post_acceptance,
    publish_heartbeat,
    requests_stream,
    stream_model,
)
from tokenmill.services.inference.dispatch.registry import register_model
from tokenmill.services.inference.dispatch.selector import Selector

if TYPE_CHECKING:
    from tokenmill.services.inference.replica import Replica

log = logging.getLogger(__name__)

LOW_KV_FRACTION = 0.02  # below this share of free KV blocks, take no work while some is queued

# What the engine thread hands the forwarder: an output, an error, or None at the end.
Outcome: TypeAlias = RequestOutput | BaseException | None
Taken: TypeAlias = list[tuple[str, str, Fields | None]]  # (stream, entry id, fields) as read or claimed


@dataclass(frozen=True)
class _Active:
    """A routed request this replica accepted and is serving."""

    reply: str
    stream: RequestStream
    deadline: float  # epoch seconds; 0 = none


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
        dead_after_s: float = 3.0,
        reclaim_every_s: float = 1.0,
    ):
        """`dead_after_s`: a replica whose heartbeat is older is dead (as the router judges it), and
        its taken requests idle that long are reclaimed, looked for every `reclaim_every_s`."""
        self.replica = replica
        self.r = r
        self.address = address
        self.heartbeat_s = heartbeat_s
        cfg = replica.engine.config
        self.max_waiting = max_waiting if max_waiting is not None else max(4, cfg.max_num_seqs // 2)
        self.batch = batch
        self.dead_after_s = dead_after_s
        self.reclaim_every_s = reclaim_every_s
        self.consumer = replica.replica_id
        self.active: dict[str, _Active] = {}  # request id -> what serves it
        self._reread: set[str] = set()  # streams whose own pending list (taken before a restart) was re-read
        self._grouped: set[str] = set()  # request streams whose consumer group this replica made sure of
        self._next_reclaim = 0.0
        self._lock = threading.Lock()
        self._out: queue.SimpleQueue[tuple[str, Outcome] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pubsub: Any = None  # redis.client.PubSub once started
        self._reads = InterruptibleReads(r)  # stop() ends the pull loop's wait at once

    def start(self) -> None:
        self.streams()
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
        with contextlib.suppress(redis.RedisError):
            self.heartbeat()  # routers stop sending new requests here at once, not a heartbeat later
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

    def streams(self) -> list[str]:
        """The request streams of the names this replica serves now (adapters load at run time),
        each with its consumer group, and each served model registered (known from now on, even
        scaled to zero or after this replica restarts without it)."""
        streams = set()
        for served in self.replica.serving():
            stream = requests_stream(served.name)
            if stream not in self._grouped:
                ensure_group(self.r, stream)
                register_model(self.r, served)
                self._grouped.add(stream)
            streams.add(stream)
        return sorted(streams)

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
                taken = self._claim_orphans(n) or self._read(n)
                if taken:
                    failpoints.hit("inference.routed_taken", replica=self.consumer)
                for stream, entry_id, fields in taken:
                    self._process(stream, entry_id, fields)
            except redis.ResponseError as exc:  # a group vanished (FLUSHDB): recreate them
                log.warning("reading routed requests failed (%s); recreating the consumer groups", exc)
                self._grouped.clear()
                self.streams()
            except redis.RedisError:
                log.exception("redis unavailable; retrying")
                self._stop.wait(1.0)

    def _read(self, count: int) -> Taken:
        """Up to `count` requests over this replica's streams (at least one per stream: XREADGROUP's
        COUNT is per stream, so each gets an equal share): on each stream, first those this consumer
        took before a restart (its own pending list; a stream joins when its adapter loads), then
        new ones, blocking up to 0.5 s for the first."""
        streams = {s: ">" if s in self._reread else "0" for s in self.streams()}
        backlog = [s for s, start in streams.items() if start == "0"]
        share = max(1, count // len(streams))
        resp = self._reads.run(
            lambda r: r.xreadgroup(GROUP, self.consumer, streams, count=share, block=None if backlog else 500)
        )
        taken = [(stream, *entry) for stream, entries in resp or [] for entry in entries]
        self._reread.update(set(backlog) - {stream for stream, _, _ in taken})
        return taken

    def _claim_orphans(self, count: int) -> Taken:
        """Requests taken by replicas whose heartbeat expired, idle past the lease: XCLAIM them.
        The claim resets their idle time, so of several replicas claiming at once one wins each."""
        now = time.monotonic()
        if now < self._next_reclaim:
            return []
        self._next_reclaim = now + self.reclaim_every_s
        lease_ms = int(self.dead_after_s * 1000)
        live: list[ReplicaInfo] | None = None  # read once, and only when something is pending past the lease
        claimed: Taken = []
        for stream in self.streams():
            pending = self.r.xpending_range(stream, GROUP, "-", "+", max(64, 4 * count), idle=lease_ms)
            if not pending:
                continue
            if live is None:
                live = live_replicas(self.r, self.dead_after_s)
            # A live replica that no longer serves this name (back without an adapter) never reads it.
            name = stream_model(stream)
            owners = {i.replica_id for i in live if i.serves_name(name)} | {self.consumer}
            orphans = [p["message_id"] for p in pending if p["consumer"] not in owners][
                : count - len(claimed)
            ]
            if orphans:
                entries = self.r.xclaim(stream, GROUP, self.consumer, lease_ms, orphans)
                claimed += [(stream, *entry) for entry in entries]
            if len(claimed) >= count:
                break
        if claimed:
            log.warning("reclaimed %d routed requests taken by replicas that died", len(claimed))
        return claimed

    def _process(self, stream: str, entry_id: str, fields: Fields | None) -> None:
        """Serve (or, while draining, hand back to its stream) one taken entry, then drop it."""
        try:
            if self._draining.is_set():  # read while drain began: hand it back to the queue
                if fields:
                    self.r.xadd(stream, fields)
            else:
                self._handle(stream, fields)
        finally:
            self.r.xack(stream, GROUP, entry_id)
            self.r.xdel(stream, entry_id)

    def _handle(self, stream: str, fields: Fields | None) -> None:
        entry = RoutedEntry.from_fields(fields)
        if entry is None or self.r.exists(cancelled_key(entry.request_id), accepted_key(entry.request_id)):
            return  # nothing to answer, cancelled, or accepted already (a reclaimed request)
        if entry.expired():
            self._post(
                entry.reply, error_fields("DEADLINE_EXCEEDED", "the request's deadline passed in the queue")
            )
            return
        try:
            request = entry.decode()
            if fields and self._route_elsewhere(stream, request, fields):
                return
            self.replica.prepare(request)
            self._start(entry, request)
        except TokenmillError as exc:
            self._post(entry.reply, error_fields(exc.code, exc.message))
        except Exception as exc:
            log.exception("could not start routed request %s", entry.request_id)
            self._post(entry.reply, error_fields("INTERNAL", f"replica failed to start it: {exc}"))

    def _route_elsewhere(self, stream: str, request: Any, fields: Fields) -> bool:
        """Hand back, on its own stream, a request for a version or tag of one of this replica's
        names that it does not serve: the router checked that it is served, or known and scaling
        from zero, so a replica of it takes it (or the router gives up after its wait and cancels it)."""
        selector = Selector.parse(request.model)
        if selector is None or any(selector.matches(s) for s in self.replica.serving()):
            return False
        self.r.xadd(stream, fields)
        self._stop.wait(0.05)  # let a replica that serves it take it
        return True

    def _start(self, entry: RoutedEntry, request: Any) -> None:
        """Submit to the engine and post the acceptance through the fence. The lock keeps the
        forwarder from seeing this request's outputs before the fence decided: none precedes
        `accepted`, none is lost, and a request another replica accepted is cancelled here."""
        with self._lock:
            stream = self.replica.submit(request, sink=self._sink, continued=entry.continued)
            accepted = Accepted(
                replica=self.consumer,
                prompt_token_ids=stream.request.prompt_token_ids,
                max_tokens=stream.request.params.max_tokens,  # resolved (0 = server default on the wire)
                healed_chars=stream.request.healed_chars,
            )
            try:
                won = post_acceptance(self.r, entry, accepted)
            except BaseException:
                stream.cancel()
                raise
            if not won:
                log.info("request %s was accepted elsewhere or cancelled; not serving it", entry.request_id)
                stream.cancel()
                return
            self.active[entry.request_id] = _Active(entry.reply, stream, entry.deadline)

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
                if item is None or self._forward(pipe, entry.reply, item):
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
            self.r,
            ReplicaInfo.from_stats(
                self.consumer, self.address, self.replica.serving(), stats, self._draining.is_set()
            ),
        )

    def cancel_expired(self) -> None:
        """Cancel routed requests past their deadline (blocks freed even if the router is gone)."""
        now = time.time()
        with self._lock:
            late = [a.stream for a in self.active.values() if a.deadline and now >= a.deadline]
        for stream in late:
            stream.cancel()

    def _heartbeat_loop(self) -> None:
        while not self._stop.is_set():
            if self.replica.ready.is_set():
                try:
                    self.heartbeat()
                except redis.RedisError:
                    log.warning("heartbeat failed", exc_info=True)
            self.cancel_expired()
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
                entry.stream.cancel()
