"""A thread that owns an LLMEngine and streams each request's outputs to its caller.

The engine is single-threaded; callers on any thread (gRPC handlers, the Redis puller, asyncio
code) submit validated requests and read a `RequestStream`. Validation runs in the caller's
thread so bad input fails at once with a precise error; cancel() aborts the request inside the
engine (its blocks are freed at the next loop turn). If a step raises, every in-flight request
gets that error (never a stream that silently stops) and the engine state is reset.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from tokenmill.common.errors import TokenmillError, Unavailable
from tokenmill.common.inference.llm_engine import LLMEngine, RequestOutput
from tokenmill.common.inference.request import Request
from tokenmill.common.inference.stats import EngineStats

log = logging.getLogger(__name__)

_END = object()


class RequestStream:
    """Outputs of one request, in order; iterate (blocking) or `async for`."""

    def __init__(
        self, engine: AsyncEngine, request: Request, sink: Callable[[RequestStream, Any], None] | None
    ):
        self.request = request
        self.request_id = request.request_id
        self._engine = engine
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._sink = sink
        self.finished = False

    def _put(self, item: Any) -> None:
        """Called on the engine thread: an output, an exception, or the end marker."""
        if self._sink is not None:
            self._sink(self, None if item is _END else item)
        else:
            self._q.put(item)

    def get(self, timeout: float | None = None) -> RequestOutput | None:
        """Next output; None at the end. Raises the engine's error if the request failed."""
        if self.finished:
            return None
        item = self._q.get(timeout=timeout)
        if item is _END:
            self.finished = True
            return None
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def __iter__(self) -> Iterator[RequestOutput]:
        while True:
            out = self.get()
            if out is None:
                return
            yield out
            if out.finished:
                return

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        out = await asyncio.get_running_loop().run_in_executor(None, self.get)
        if out is None:
            raise StopAsyncIteration
        return out

    def cancel(self) -> None:
        if not self.finished:
            self._engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, name: str = "engine"):
        self.engine = engine
        self._lock = threading.Lock()  # guards _pending/_aborts/_streams
        self._wake = threading.Event()
        self._pending: list[tuple[Request, RequestStream]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, RequestStream] = {}
        self._calls: list[tuple[Callable[[LLMEngine], Any], queue.SimpleQueue]] = []
        self._stop = threading.Event()
        self._snapshot: EngineStats = engine.stats()  # refreshed by the engine thread each turn
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ callers

    def submit(
        self, *, sink: Callable[[RequestStream, Any], None] | None = None, **kwargs: Any
    ) -> RequestStream:
        """Validate (raises tokenmill.common.errors) and queue a request; returns its stream.

        With `sink`, outputs are pushed to sink(stream, output | exception | None-at-end) on the
        engine thread (keep it cheap) instead of being queued for iteration.
        """
        if self._stop.is_set():
            raise Unavailable("the engine is shutting down; retry on another replica")
        req = self.engine.make_request(**kwargs)
        stream = RequestStream(self, req, sink)
        with self._lock:
            if req.request_id in self._streams:
                raise TokenmillError(f"request id {req.request_id!r} is already in flight")
            self._streams[req.request_id] = stream
            self._pending.append((req, stream))
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def call(self, fn: Callable[[LLMEngine], Any], timeout: float = 60.0) -> Any:
        """Run fn(engine) on the engine thread (e.g. add an adapter) and return its result."""
        box: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            self._calls.append((fn, box))
        self._wake.set()
        ok, value = box.get(timeout=timeout)
        if not ok:
            raise value
        return value

    def stats(self) -> EngineStats:
        """The engine's latest snapshot, with submitted requests not yet handed to it counted as waiting."""
        with self._lock:
            queued = len(self._pending)
        return self._snapshot.with_queued(queued)

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ engine thread

    def _drain_commands(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            aborts, self._aborts = self._aborts, []
            calls, self._calls = self._calls, []
        for fn, box in calls:
            try:
                box.put((True, fn(self.engine)))
            except BaseException as exc:  # handed to the caller
                box.put((False, exc))
        for req, _stream in pending:
            try:
                self.engine.add(req)
            except TokenmillError as exc:
                self._close(req.request_id, exc)
        for rid in aborts:
            out = self.engine.abort(rid)
            if out is not None:
                self._deliver(out)
            else:
                self._close(rid, None)

    def _deliver(self, out: RequestOutput) -> None:
        with self._lock:
            stream = self._streams.get(out.request_id)
            if out.finished:
                self._streams.pop(out.request_id, None)
        if stream is not None:
            stream._put(out)

    def _close(self, request_id: str, error: BaseException | None) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream._put(error if error is not None else _END)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain_commands()
            if not self.engine.has_unfinished():
                self._snapshot = self.engine.stats()
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:
                log.exception("engine step failed; failing %d in-flight requests", len(self.engine.requests))
                self._fail_all(TokenmillError(f"the inference engine failed: {type(exc).__name__}: {exc}"))
                continue
            for out in outputs:
                self._deliver(out)
            self._snapshot = self.engine.stats()
        self._fail_all(Unavailable("the replica is shutting down; retry the request"))

    def _fail_all(self, error: TokenmillError) -> None:
        for rid in list(self.engine.requests):
            self.engine.abort(rid)
        with self._lock:
            streams, self._streams = self._streams, {}
            self._pending = []
        for stream in streams.values():
            stream._put(error)
