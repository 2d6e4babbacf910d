"""Prometheus metrics with vLLM's names and meanings (prefix `tokenmill:`), what autoscalers read.

Gauges and counters are read from the engine's stats at scrape time (never stale); latency
histograms are fed by the engine's observer hook as tokens are produced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import redis
from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from tokenmill.common.inference import EngineStats

log = logging.getLogger(__name__)

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)


class EngineCollector(Collector):
    """Engine gauges and counters, read from `stats()` (the async engine's) at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats], labels: dict[str, str]):
        self._stats = stats
        self._labels = labels

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        names, values = list(self._labels), list(self._labels.values())

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"tokenmill:{name}", doc, labels=names)
            g.add_metric(values, float(value))
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"tokenmill:{name}", doc, labels=names)
            c.add_metric(values, float(value))
            return c

        yield gauge("num_requests_running", "Requests in the running batch.", s.requests_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", s.requests_waiting)
        yield gauge("kv_cache_usage_perc", "KV-cache usage: 1 means full.", s.kv_cache_usage)
        yield counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries
        )
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)
        yield counter("prompt_tokens", "Prefill tokens processed.", s.prompt_tokens)
        yield counter("generation_tokens", "Generation tokens produced.", s.generation_tokens)
        yield counter(
            "num_preemptions",
            "Requests preempted (recomputed later) for lack of KV blocks.",
            s.preemptions,
        )


class LatencyObserver:
    """The engine's observer: TTFT, inter-token latency and end-to-end latency histograms."""

    def __init__(self, registry: CollectorRegistry | None, labels: dict[str, str]):
        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            metric = Histogram(name, doc, labelnames=list(labels), registry=registry, buckets=buckets)
            return metric.labels(**labels)

        self.ttft = histogram("tokenmill:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = histogram(
            "tokenmill:inter_token_latency_seconds", "Time between consecutive tokens.", ITL_BUCKETS
        )
        self.e2e = histogram(
            "tokenmill:e2e_request_latency_seconds", "Request latency, arrival to finish.", E2E_BUCKETS
        )

    def on_first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def on_token(self, inter_token_s: float) -> None:
        self.itl.observe(inter_token_s)

    def on_finish(self, e2e_s: float, prompt_tokens: int, completion_tokens: int) -> None:
        self.e2e.observe(e2e_s)


QUEUE_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class RouterMetrics:
    """The router's own series, fed as requests are routed: the request rate (a counter; PromQL
    `rate()`) and the time a request waited in the queue until a replica accepted it."""

    def __init__(self, registry: CollectorRegistry | None):
        self.requests = Counter(
            "tokenmill:router_requests",
            "Generate requests routed, by the model name they asked for.",
            labelnames=["model"],
            registry=registry,
        )
        self.queue_wait = Histogram(
            "tokenmill:router_queue_wait_seconds",
            "Time from queueing a request to a replica accepting it (long while scaling from zero).",
            labelnames=["model"],
            registry=registry,
            buckets=QUEUE_WAIT_BUCKETS,
        )


class RouterCollector(Collector):
    """Read at scrape time from Redis: the backlog autoscalers scale on (stream length, taken but
    unanswered) per model name, live replicas per model, and the replicas' vLLM-named gauges summed
    per model. `backlog` maps each model name with a request stream to (length, pending)."""

    def __init__(self, backlog: Callable[[], dict[str, tuple[int, int]]], replicas: Callable[[], list]):
        self._backlog = backlog
        self._replicas = replicas

    def collect(self) -> Iterator[Metric]:
        try:
            per_model_backlog = self._backlog()
            replicas = self._replicas()
        except redis.RedisError as exc:  # the rest of /metrics still renders while Redis is away
            log.warning("router metrics: Redis unreachable, backlog and replica series left out: %s", exc)
            return
        yield from _backlog_families(per_model_backlog)
        live = GaugeMetricFamily("tokenmill:router_live_replicas", "Live replicas.", labels=["model_name"])
        running = GaugeMetricFamily(
            "tokenmill:num_requests_running",
            "Requests in the replicas' running batches.",
            labels=["model_name"],
        )
        waiting = GaugeMetricFamily(
            "tokenmill:num_requests_waiting", "Requests waiting in the replicas.", labels=["model_name"]
        )
        per_model: dict[str, list[int]] = {}
        for info in replicas:
            row = per_model.setdefault(info.model, [0, 0, 0])
            row[0] += 1
            row[1] += info.running
            row[2] += info.waiting
        for model, (n, run, wait) in sorted(per_model.items()):
            live.add_metric([model], n)
            running.add_metric([model], run)
            waiting.add_metric([model], wait)
        yield from (live, running, waiting)


def _backlog_families(per_model: dict[str, tuple[int, int]]) -> Iterator[Metric]:
    """One series per model name with a request stream: a model's autoscaler selects `model=<name>`
    (the chart's HPA external metric, docs/deploy.md), so another model's backlog never scales it."""
    length = GaugeMetricFamily(
        "tokenmill:router_queue_length", "Routed requests in the model's request stream.", labels=["model"]
    )
    pending = GaugeMetricFamily(
        "tokenmill:router_queue_pending", "Requests taken by a replica, not yet answered.", labels=["model"]
    )
    backlog = GaugeMetricFamily(
        "tokenmill:router_backlog",
        "Requests queued or in flight: queue length plus pending.",
        labels=["model"],
    )
    for name, (queued, taken) in sorted(per_model.items()):
        length.add_metric([name], queued)
        pending.add_metric([name], taken)
        backlog.add_metric([name], queued + taken)
    yield from (length, pending, backlog)
