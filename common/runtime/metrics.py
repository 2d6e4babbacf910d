"""Prometheus metrics for a service: a per-app registry plus the standard per-RPC series.

Series names follow go-grpc-prometheus (`grpc_server_handled_total{grpc_service, grpc_method,
grpc_type, grpc_code}`, `grpc_server_handling_seconds`), so stock Grafana dashboards work.
Each `ServiceApp` owns its own `CollectorRegistry` (several apps can live in one test process);
services add their metrics with `Counter(..., registry=app.registry)`.
"""

from __future__ import annotations

import logging
import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

log = logging.getLogger("tokenmill.runtime")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)


def new_registry() -> CollectorRegistry:
    """A registry with the process/platform/GC collectors the default registry would have."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class RpcMetrics:
    """Counters and histograms the runtime's interceptor updates for every RPC."""

    def __init__(self, registry: CollectorRegistry, service: str):
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started", "RPCs started on the server.", labels, registry=registry
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code.",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self.latency = Histogram(
            "grpc_server_handling_seconds",
            "Time from the RPC's start until its status was decided.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "grpc_server_in_flight_rpcs", "RPCs currently being handled.", labels[1:], registry=registry
        )
        self.serving = Gauge(
            "tokenmill_service_serving",
            "1 while the service reports SERVING on grpc.health.v1, else 0.",
            ["service"],
            registry=registry,
        )
        self.serving.labels(service=service).set(0)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes arrive every few seconds; an access-log line for each would drown the service log."""


class MetricsServer:
    """The `/metrics` HTTP endpoint: prometheus_client's WSGI app, served from a daemon thread.

    Served here rather than with `prometheus_client.start_http_server` so that `close()` returns
    within `SHUTDOWN_POLL_SECONDS` instead of the 0.5 s `serve_forever` polls at by default, which
    every stop of a service (and every test) would otherwise wait out."""

    SHUTDOWN_POLL_SECONDS = 0.02

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][
            0
        ]
        server_class = type("MetricsWSGIServer", (_ThreadingWSGIServer,), {"address_family": family})
        self._server: WSGIServer = make_server(
            host, port, make_wsgi_app(registry), server_class=server_class, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": self.SHUTDOWN_POLL_SECONDS},
            name="metrics-http",
            daemon=True,
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
