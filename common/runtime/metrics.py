"""Prometheus metrics for a service: a per-app registry plus the standard per-RPC series.

Series names follow go-grpc-prometheus (`grpc_server_handled_total{grpc_service, grpc_method,
grpc_type, grpc_code}`, `grpc_server_handling_seconds`), so stock Grafana dashboards work.
Each `ServiceApp` owns its own `CollectorRegistry` (several apps can live in one test process);
services add their metrics with `Counter(..., registry=app.registry)`.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
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


class MetricsServer:
    """The `/metrics` HTTP endpoint (prometheus_client's WSGI server in a daemon thread)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
