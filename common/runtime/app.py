"""`ServiceApp`: one gRPC server with everything every tokenmill service needs.

Health (grpc.health.v1, NOT_SERVING until ready), reflection, bearer-token auth, TLS/mTLS,
message-size limits, request decoding (INVALID_ARGUMENT for bytes that do not parse or values out
of bounds; requests.py), per-RPC metrics and access logs, domain-error mapping, and a graceful
SIGTERM drain. Services only add their servicers and say when they are ready.

Deadlines: gRPC enforces the client's deadline (the client gets DEADLINE_EXCEEDED when it passes);
handlers that do long work should read `context.time_remaining()` (seconds; a huge number when
the client set no deadline) and stop early, and pass it as `timeout=` to downstream calls, because gRPC
Python does not propagate deadlines by itself.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tokenmill.common.config import Config, host_port
from tokenmill.common.runtime.interceptors import AuthInterceptor, ErrorInterceptor, ObserveInterceptor
from tokenmill.common.runtime.metrics import MetricsServer, RpcMetrics, new_registry
from tokenmill.common.runtime.requests import DecodeInterceptor
from tokenmill.common.runtime.tls import server_credentials

log = logging.getLogger("tokenmill.runtime")

ReadyCheck = Callable[[], Any]  # returns truthy when ready; falsy or raising = not yet


class StartupError(RuntimeError):
    """The service cannot start (port taken, unreadable TLS files); the message says what to fix."""


class ServiceApp:
    """A configured gRPC server for one named service (`config.services[name]`).

    `port` / `metrics_port` override the config (tests pass `port=0` for an ephemeral port; the
    metrics endpoint then also binds an ephemeral port). `metrics=False` skips the HTTP endpoint
    (the registry and counters still exist). `min_workers` raises the configured handler-thread
    count for services whose open streams each hold a thread (the inference service).
    `server_options` are extra gRPC core options for services with unusual traffic (the
    checkpoint store's multi-MiB chunks); they come first, and gRPC core keeps the first value of
    a repeated option, so they win over the defaults."""

    def __init__(
        self,
        service_name: str,
        config: Config,
        *,
        host: str | None = None,
        port: int | None = None,
        metrics_port: int | None = None,
        metrics: bool = True,
        min_workers: int = 0,
        server_options: Sequence[tuple[str, Any]] = (),
    ):
        if service_name not in config.services:
            raise ValueError(f"unknown service {service_name!r}; configured: {sorted(config.services)}")
        service_cfg = config.services[service_name]
        self.name = service_name
        self.config = config
        self.host = host or service_cfg.host
        self._requested_port = service_cfg.port if port is None else port
        if metrics_port is None:
            metrics_port = service_cfg.effective_metrics_port if port is None else 0
        self._requested_metrics_port = metrics_port
        self._metrics_enabled = metrics

        self.registry = new_registry()
        self.rpc_metrics = RpcMetrics(self.registry, service_name)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.health.set(health.OVERALL_HEALTH, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.stopping = threading.Event()  # set when shutdown begins; long streams should end
        self._shutdown_requested = threading.Event()
        self._service_names: list[str] = []
        self._shutdown_hooks: list[Callable[[], Any]] = []
        self._metrics_server: MetricsServer | None = None
        self._started = False
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self.port = 0
        self.metrics_port = 0

        interceptors: list[grpc.ServerInterceptor] = [ObserveInterceptor(self.rpc_metrics)]
        if not config.auth.disabled:
            interceptors.append(AuthInterceptor(config.auth.tokens))
        interceptors += [ErrorInterceptor(), DecodeInterceptor(config.request_limits)]
        limit = config.max_message_bytes
        self._thread_prefix = f"grpc-{service_name}-handler"
        self._executor = futures.ThreadPoolExecutor(
            max_workers=max(service_cfg.workers, min_workers), thread_name_prefix=self._thread_prefix
        )
        self.server = grpc.server(
            self._executor,
            interceptors=interceptors,
            options=[
                *server_options,
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # A second process on the same port must fail loudly, not share the port.
                ("grpc.so_reuseport", 0),
                # Let clients keep long WatchJob/Download streams alive through idle NATs.
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
                ("grpc.http2.max_ping_strikes", 0),
            ],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)

    # -- building ---------------------------------------------------------------------------

    def add(self, adder: Callable[[Any, grpc.Server], None], servicer: Any, full_service_name: str) -> None:
        """Register a servicer: `app.add(pb2_grpc.add_XServicer_to_server, servicer, "tokenmill.v1.X")`."""
        if self._started:
            raise RuntimeError("add() must be called before start()/serve()")
        adder(servicer, self.server)
        self._service_names.append(full_service_name)
        self.health.set(full_service_name, health_pb2.HealthCheckResponse.NOT_SERVING)

    def on_shutdown(self, hook: Callable[[], Any]) -> Callable[[], Any]:
        """Run `hook()` after the drain (in registration order); usable as a decorator."""
        self._shutdown_hooks.append(hook)
        return hook

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Bind, start serving (health NOT_SERVING) and start the metrics endpoint."""
        if self._started:
            raise RuntimeError("already started")
        reflection.enable_server_reflection(
            [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        address = host_port(self.host, self._requested_port)
        try:
            credentials = server_credentials(self.config.tls)
            if credentials is None:
                port = self.server.add_insecure_port(address)
            else:
                port = self.server.add_secure_port(address, credentials)
        except (RuntimeError, ValueError) as exc:
            raise StartupError(f"{self.name}: cannot listen on {address}: {exc}") from None
        if not port:
            raise StartupError(f"{self.name}: cannot listen on {address} (address in use?)")
        self.port = port
        if self._metrics_enabled:
            try:
                self._metrics_server = MetricsServer(self.registry, self.host, self._requested_metrics_port)
            except OSError as exc:
                raise StartupError(
                    f"{self.name}: cannot serve metrics on {host_port(self.host, self._requested_metrics_port)}: "
                    f"{exc.strerror} (set services.{self.name}.metrics_port)"
                ) from None
            self.metrics_port = self._metrics_server.port
        self.server.start()
        self._started = True
        log.info(
            "%s listening",
            self.name,
            extra={
                "address": host_port(self.host, self.port),
                "metrics_port": self.metrics_port,
                "tls": self.config.tls.enabled,
                "mtls": self.config.tls.client_ca_file is not None,
                "auth": not self.config.auth.disabled,
            },
        )

    def set_serving(self, serving: bool = True) -> None:
        """Flip the overall and every per-service health status (ignored once shutting down)."""
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in (health.OVERALL_HEALTH, *self._service_names):
            self.health.set(name, status)
        if not self.stopping.is_set():
            self.rpc_metrics.serving.labels(service=self.name).set(1 if serving else 0)

    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new RPCs, let in-flight ones finish for `grace` seconds
        (default `config.shutdown_grace_seconds`), then run the shutdown hooks. Idempotent."""
        self._shutdown_requested.set()  # a serve() loop in another thread returns too
        with self._stop_lock:
            if self._stopped.is_set():
                return
            grace = self.config.shutdown_grace_seconds if grace is None else grace
            self.stopping.set()
            self.health.enter_graceful_shutdown()
            self.rpc_metrics.serving.labels(service=self.name).set(0)
            log.info("%s stopping", self.name, extra={"grace_seconds": grace})
            if self._started:
                self.server.stop(grace).wait(grace + 5)
            for hook in self._shutdown_hooks:
                try:
                    hook()
                except Exception:
                    log.exception("shutdown hook %r failed", hook)
            if self._metrics_server is not None:
                self._metrics_server.close()
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._stopped.set()
            log.info("%s stopped", self.name)

    def stuck_handlers(self, timeout: float = 1.0) -> list[threading.Thread]:
        """Handler threads still running `timeout` s after `stop()`: handlers that ignored the
        cancellation. The interpreter would wait for them at exit, so `run_service` exits hard."""
        deadline = time.monotonic() + timeout
        threads = [t for t in threading.enumerate() if t.name.startswith(self._thread_prefix)]
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [t for t in threads if t.is_alive()]

    def wait_ready(self, ready: ReadyCheck | None, stop: threading.Event | None = None) -> bool:
        """Poll `ready()` with backoff until it is truthy (True) or `stop` is set (False).

        A raising check counts as "not ready yet": dependencies (Redis, the store) may come up
        after us; the exception is logged at most every 30 s so the reason is visible."""
        stop = stop or self.stopping
        delay, last_log = 0.05, 0.0
        while not stop.is_set():
            try:
                if ready is None or ready():
                    return True
                reason = "ready() returned false"
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
            now = time.monotonic()
            if now - last_log >= 30:
                log.warning("%s not ready yet: %s", self.name, reason)
                last_log = now
            stop.wait(delay)
            delay = min(delay * 2, 2.0)
        return False

    def request_shutdown(self) -> None:
        """Make `serve()` drain and return, as SIGTERM does (thread-safe; for tests and fatal errors)."""
        self.health.enter_graceful_shutdown()
        self._shutdown_requested.set()

    def serve(self, ready: ReadyCheck | None = None) -> None:
        """Start, become SERVING once `ready()` passes, block until SIGTERM/SIGINT (or
        `request_shutdown()`), then drain and run the shutdown hooks.

        A SIGINT during the drain cancels the in-flight RPCs at once (a repeated SIGTERM does not). Signal handlers are
        installed only when called from the main thread."""
        stop = self._shutdown_requested

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if not stop.is_set():
                log.info("%s received %s; draining", self.name, name)
                self.request_shutdown()  # readiness fails before the listener closes
            elif signum == signal.SIGINT:  # Ctrl-C twice: the operator wants out now
                log.warning("%s received %s during the drain; cancelling in-flight RPCs", self.name, name)
                threading.Thread(target=self.server.stop, args=(0,), daemon=True).start()
            else:  # a repeated SIGTERM (supervisor plus tini, timeout(1), ...) keeps draining
                log.info("%s received %s again; still draining", self.name, name)

        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, on_signal)
        try:
            self.start()
            if self.wait_ready(ready, stop):
                self.set_serving(True)
                log.info("%s serving", self.name, extra={"port": self.port})
            stop.wait()
        finally:
            try:
                self.stop()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
