"""Scale from zero and model lookup at the router: real Redis, real in-process replicas and router.

A request for a model with no live replica is queued on its model's stream (which grows: what
KEDA/HPA scale on), served when a replica comes up within the wait, UNAVAILABLE after it; an
unknown selector is NOT_FOUND at once; a replica's load error is FAILED_PRECONDITION with its reason.
"""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tests.fixtures.grpc import free_port
from tests.fixtures.inference import greedy, in_thread, reference_greedy, save_lora_adapter, wait_for
from tokenmill.common import errors
from tokenmill.services.inference.dispatch.protocol import requests_stream
from tokenmill.services.inference.dispatch.registry import publish_load_error
from tokenmill.services.inference.metrics import RouterCollector, RouterMetrics

PROMPT = "Once upon a time"
TINY = requests_stream("tiny")


def test_request_with_zero_replicas_is_served_once_a_replica_starts(
    start_router, start_replica, redis_url, redis_client, tiny_ckpt
):
    client, _, _ = start_router(no_replica_timeout_s=120.0)
    t, out = in_thread(lambda: client.generate(PROMPT, max_tokens=8, model="tiny", **greedy()))
    # Queued in Redis on tiny's stream (the autoscaler's signal), not refused.
    wait_for(lambda: redis_client.xlen(TINY) >= 1, 30, "the request to be queued")
    assert t.is_alive() and not out
    start_replica(redis_url, replica_id="late")
    t.join(120)
    assert "error" not in out, out.get("error")
    resp = out["value"]
    assert resp.replica == "late"
    assert list(resp.token_ids) == reference_greedy(tiny_ckpt.model, tiny_ckpt.encode(PROMPT), 8)


def test_request_with_zero_replicas_fails_after_the_wait(start_router, redis_client):
    client, _, _ = start_router(no_replica_timeout_s=0.5)
    with pytest.raises(errors.Unavailable, match=r"no inference replica of 'tiny'.*within 0.5 s"):
        client.generate(PROMPT, max_tokens=2, model="tiny")
    assert redis_client.xlen(TINY) == 0  # given up: no longer part of the backlog autoscalers read


def test_unknown_selector_is_not_found_and_a_known_model_scaled_to_zero_queues(
    start_router, start_replica, redis_url, redis_client
):
    client, dispatcher, _ = start_router(no_replica_timeout_s=0.5)
    h = start_replica(redis_url, replica_id="once")
    assert client.generate(PROMPT, max_tokens=2, model="tiny:1").token_ids
    h.puller.stop()  # scaled to zero: no live replica, but tiny:1 was served
    wait_for(lambda: not dispatcher.replicas(), 30, "the replica to be gone")
    with pytest.raises(errors.NotFound, match="'gpt-9' is not served.*tiny:1"):
        client.generate(PROMPT, max_tokens=2, model="gpt-9")
    with pytest.raises(errors.NotFound, match="'tiny:7' is not served"):
        client.generate(PROMPT, max_tokens=2, model="tiny:7")
    with pytest.raises(errors.Unavailable, match="became live within"):
        client.generate(PROMPT, max_tokens=2, model="tiny:latest")


def test_load_error_is_failed_precondition_through_the_router(start_router, redis_client):
    client, _, _ = start_router(no_replica_timeout_s=60.0)
    publish_load_error(redis_client, "r-bad", "broken", "INVALID_ARGUMENT: tensor x has shape [3]")
    for call in (
        lambda: client.generate(PROMPT, max_tokens=2, model="broken"),
        lambda: client.model_info(model="broken:1"),
    ):
        with pytest.raises(errors.FailedPrecondition, match="r-bad could not load broken.*shape"):
            call()


def test_load_error_ends_a_queued_request_at_once(start_router, redis_client):
    client, _, _ = start_router(no_replica_timeout_s=120.0)
    t, out = in_thread(lambda: client.generate(PROMPT, max_tokens=2, model="broken"))
    wait_for(lambda: redis_client.xlen(requests_stream("broken")) >= 1, 30, "the request to be queued")
    publish_load_error(redis_client, "r-bad", "broken", "KeyError: 'layers.0.attn.q_proj.weight'")
    t.join(30)
    assert isinstance(out.get("error"), errors.FailedPrecondition), out


def test_router_metrics_backlog_rate_live_replicas_and_queue_wait(
    start_router, start_replica, redis_url, redis_client
):
    registry = CollectorRegistry()
    client, dispatcher, _ = start_router(no_replica_timeout_s=120.0, metrics=RouterMetrics(registry))
    registry.register(RouterCollector(dispatcher.backlog, dispatcher.replicas))
    t, out = in_thread(lambda: client.generate(PROMPT, max_tokens=4, model="tiny"))
    wait_for(lambda: redis_client.xlen(TINY) >= 1, 30, "the request to be queued")
    text = generate_latest(registry).decode()
    assert 'tokenmill:router_queue_length{model="tiny"} 1.0' in text
    assert 'tokenmill:router_backlog{model="tiny"} 1.0' in text  # the series the chart's HPA scales on
    assert "tokenmill:router_live_replicas{" not in text
    start_replica(redis_url, replica_id="m")
    t.join(120)
    assert "value" in out, out
    text = generate_latest(registry).decode()
    assert 'tokenmill:router_requests_total{model="tiny"} 1.0' in text
    assert 'tokenmill:router_queue_wait_seconds_count{model="tiny"} 1.0' in text
    assert 'tokenmill:router_live_replicas{model_name="tiny:1"} 1.0' in text
    assert 'tokenmill:num_requests_running{model_name="tiny:1"}' in text
    assert 'tokenmill:router_queue_length{model="tiny"} 0.0' in text
    assert 'tokenmill:router_queue_pending{model="tiny"} 0.0' in text
    assert 'tokenmill:router_backlog{model="tiny"} 0.0' in text


def test_router_metrics_still_render_while_redis_is_unreachable() -> None:
    """A scrape during a Redis outage keeps the router's own series; the Redis-read ones are left out."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    gone = redis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))  # no listener
    registry = CollectorRegistry()
    RouterMetrics(registry).requests.labels(model="tiny").inc()
    registry.register(RouterCollector(lambda: {"tiny": (gone.xlen(TINY), 0)}, list))
    text = generate_latest(registry).decode()
    assert 'tokenmill:router_requests_total{model="tiny"} 1.0' in text
    assert "tokenmill:router_backlog" not in text


def test_lora_adapter_is_addressable_as_a_model_through_the_router(
    start_router, start_replica, redis_url, inference_store, tiny_ckpt
):
    save_lora_adapter(inference_store.client, tiny_ckpt, "tiny-style")
    client, dispatcher, _ = start_router()
    h = start_replica(redis_url, replica_id="lora")
    h.replica.ensure_adapter("tiny-style")  # what `--adapter tiny-style` preloads
    wait_for(
        lambda: any("tiny-style:1" in r.adapters for r in dispatcher.replicas()),
        30,
        "the adapter's heartbeat",
    )
    direct = h.client.generate(PROMPT, max_tokens=10, adapter="tiny-style", **greedy())
    results: dict[str, object] = {}
    # Base and adapter requests at once: one batch mixes them (multi-LoRA).
    models = ["tiny", "tiny-style", "tiny-style:1", "tiny:1"] * 3
    threads = [
        threading.Thread(
            target=lambda i=i, m=m: results.__setitem__(
                f"{i}", client.generate(PROMPT, max_tokens=10, model=m, **greedy())
            )
        )
        for i, m in enumerate(models)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    base = reference_greedy(tiny_ckpt.model, tiny_ckpt.encode(PROMPT), 10)
    assert list(direct.token_ids) != base
    for i, m in enumerate(models):
        want = list(direct.token_ids) if m.startswith("tiny-style") else base
        assert list(results[f"{i}"].token_ids) == want, m
    with pytest.raises(errors.NotFound, match="'tiny-style:2' is not served"):
        client.generate(PROMPT, max_tokens=2, model="tiny-style:2")
    with pytest.raises(errors.InvalidArgument, match="LoRA adapter 'tiny-style'"):
        client.generate(PROMPT, max_tokens=2, model="tiny-style", adapter="other")
