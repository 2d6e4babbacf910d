"""One routed-request stream per model name (issue 11, many models at once): real Redis, real
in-process replicas of two different models ('tiny' and 'other', different weights) and a real router.

A replica reads, claims and acks only the streams of the names it serves, so a backlog for one model
never passes through (or scales) another model's replicas, and each model's backlog is its own series.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tests.fixtures.inference import (
    greedy,
    in_thread,
    reference_greedy,
    save_lora_adapter,
    wait_for,
)
from tokenmill.services.inference.dispatch.protocol import (
    GROUP,
    REPLICAS,
    ReplicaInfo,
    ensure_group,
    model_streams,
    publish_heartbeat,
    requests_stream,
)
from tokenmill.services.inference.dispatch.registry import register_model
from tokenmill.services.inference.dispatch.selector import Served
from tokenmill.services.inference.metrics import RouterCollector, RouterMetrics

TINY, OTHER = requests_stream("tiny"), requests_stream("other")
PROMPTS = ["Once upon a time", "The quick brown fox", "def add(a, b):"]


@pytest.fixture
def serve_other(start_puller, other_ckpt) -> Callable[[str], object]:
    """`serve_other(replica_id)` -> the puller of a started replica of 'other' (routed work only)."""
    return lambda replica_id: start_puller("other", replica_id)


def consumers(redis_client, stream: str) -> set[str]:
    return {c["name"] for c in redis_client.xinfo_consumers(stream, GROUP)}


def test_replica_of_one_model_never_takes_requests_queued_for_another(
    start_router, start_replica, redis_url, redis_client, tiny_ckpt
):
    """B's request stays on B's stream, untouched (same entry, never delivered), while A's replica
    keeps serving A; before, A's replica took it and put it back, over and over."""
    client, dispatcher, _ = start_router(no_replica_timeout_s=120.0)
    register_model(redis_client, Served("other:1", ("latest",)))  # known, scaled to zero: it queues
    start_replica(redis_url, replica_id="a")
    t, out = in_thread(lambda: client.generate(PROMPTS[0], max_tokens=4, model="other", timeout=60))
    wait_for(lambda: redis_client.xlen(OTHER) == 1, 30, "B's request to be queued")
    [(entry_id, _fields)] = redis_client.xrange(OTHER)
    for prompt in PROMPTS:  # A's replica pulls (its loop runs) after B's entry is queued
        resp = client.generate(prompt, max_tokens=4, model="tiny", **greedy())
        assert resp.replica == "a"
        assert list(resp.token_ids) == reference_greedy(tiny_ckpt.model, tiny_ckpt.encode(prompt), 4)
    assert [eid for eid, _ in redis_client.xrange(OTHER)] == [entry_id]
    assert consumers(redis_client, OTHER) == set()  # no replica ever read B's stream
    assert redis_client.xpending(OTHER, GROUP)["pending"] == 0
    assert consumers(redis_client, TINY) == {"a"}
    assert t.is_alive() and not out  # still waiting for a replica of B


def test_backlog_metric_is_per_model(start_router, start_replica, redis_url, redis_client):
    """`tokenmill:router_backlog{model=...}`: B's queued requests show under B only, never under A."""
    client, dispatcher, _ = start_router(no_replica_timeout_s=120.0)
    registry = CollectorRegistry()
    registry.register(RouterCollector(dispatcher.backlog, dispatcher.replicas))
    register_model(redis_client, Served("other:1", ("latest",)))
    start_replica(redis_url, replica_id="a")
    assert client.generate(PROMPTS[0], max_tokens=2, model="tiny").token_ids
    calls = [in_thread(lambda: client.generate(PROMPTS[1], max_tokens=2, model="other")) for _ in range(3)]
    wait_for(lambda: redis_client.xlen(OTHER) == 3, 30, "B's requests to be queued")
    text = generate_latest(registry).decode()
    assert 'tokenmill:router_backlog{model="other"} 3.0' in text
    assert 'tokenmill:router_queue_length{model="other"} 3.0' in text
    assert 'tokenmill:router_backlog{model="tiny"} 0.0' in text
    assert 'tokenmill:router_queue_length{model="tiny"} 0.0' in text
    assert 'tokenmill:router_queue_pending{model="tiny"} 0.0' in text
    assert dispatcher.queue_depth() == 3  # GetStats' waiting count sums the models
    assert all(t.is_alive() for t, _ in calls)


@pytest.mark.slow
def test_two_models_loaded_each_replica_serves_only_its_own(
    start_router, start_replica, serve_other, redis_url, redis_client, tiny_ckpt, other_ckpt
):
    """Requests for both models at once: every answer comes from a replica of the model asked for,
    token-identical to that model's reference, and neither replica ever read the other's stream."""
    client, _, _ = start_router(no_replica_timeout_s=60.0)
    start_replica(redis_url, replica_id="a")
    serve_other("b")
    jobs = [(m, p) for m in ("tiny", "other", "tiny:1", "other:latest") for p in PROMPTS] * 2
    calls = [
        in_thread(lambda m=m, p=p: client.generate(p, max_tokens=6, model=m, timeout=90, **greedy()))
        for m, p in jobs
    ]
    for (model, prompt), (t, out) in zip(jobs, calls, strict=True):
        t.join(120)
        assert "value" in out, out.get("error")
        ckpt, replica = (tiny_ckpt, "a") if model.startswith("tiny") else (other_ckpt, "b")
        assert out["value"].replica == replica, model
        assert list(out["value"].token_ids) == reference_greedy(ckpt.model, ckpt.encode(prompt), 6), model
    assert consumers(redis_client, TINY) == {"a"}
    assert consumers(redis_client, OTHER) == {"b"}


@pytest.mark.slow
def test_orphans_are_reclaimed_only_by_a_replica_of_their_model(
    start_router, start_replica, serve_other, redis_url, redis_client, other_ckpt
):
    """A request for B taken by a replica that died: A's replica (reclaiming every 0.2 s) leaves it,
    B's replica claims and serves it."""
    client, _, _ = start_router(no_replica_timeout_s=60.0)
    register_model(redis_client, Served("other:1", ("latest",)))
    start_replica(redis_url, replica_id="a", puller_kwargs={"dead_after_s": 1.0, "reclaim_every_s": 0.2})
    ensure_group(redis_client, OTHER)
    prompt = other_ckpt.encode(PROMPTS[2])
    t, out = in_thread(lambda: client.generate(prompt, max_tokens=5, model="other", timeout=90, **greedy()))
    taken = redis_client.xreadgroup(GROUP, "ghost", {OTHER: ">"}, count=1, block=20_000)  # then "dies"
    assert taken and taken[0][1], "the request never reached B's stream"
    # Past the 1 s lease A's replica has looked for orphans several times; it must not claim B's.
    assert client.generate(PROMPTS[0], max_tokens=2, model="tiny").replica == "a"
    wait_for(
        lambda: (
            redis_client.xpending(OTHER, GROUP)["pending"] == 1
            and redis_client.xpending_range(OTHER, GROUP, "-", "+", 1, idle=2000)
        ),
        30,
        "the orphan to idle past A's lease",
    )
    assert consumers(redis_client, OTHER) == {"ghost"}
    serve_other("b")
    t.join(120)
    assert "value" in out, out.get("error")
    assert out["value"].replica == "b"
    assert list(out["value"].token_ids) == reference_greedy(other_ckpt.model, prompt, 5)
    assert consumers(redis_client, OTHER) == {"ghost", "b"}


def test_request_without_a_model_waits_unqueued_until_a_model_is_live(
    start_router, start_replica, redis_url, redis_client, tiny_ckpt
):
    """ "" means any served model, as before: on a platform that knows no model it is queued nowhere
    (no stream to pick) until a replica comes up, then goes to that replica's model and is served."""
    registry = CollectorRegistry()
    client, _, _ = start_router(no_replica_timeout_s=120.0, metrics=RouterMetrics(registry))
    t, out = in_thread(lambda: client.generate(PROMPTS[0], max_tokens=6, timeout=120, **greedy()))
    wait_for(
        lambda: registry.get_sample_value("tokenmill:router_requests_total", {"model": ""}) == 1.0,
        30,
        "the router to take the request",
    )
    assert model_streams(redis_client) == [] and t.is_alive()
    start_replica(redis_url, replica_id="late")
    t.join(120)
    assert "value" in out, out.get("error")
    assert out["value"].replica == "late"
    want = reference_greedy(tiny_ckpt.model, tiny_ckpt.encode(PROMPTS[0]), 6)
    assert list(out["value"].token_ids) == want
    assert model_streams(redis_client) == ["tiny"] and consumers(redis_client, TINY) == {"late"}


def test_one_read_takes_at_most_the_replicas_room_over_all_its_streams(
    inference_store, tiny_ckpt, redis_url, redis_client
) -> None:
    """XREADGROUP's COUNT is per stream: a replica serving a base model and an adapter (two streams)
    that has room for 2 must take 2 in all, one from each, not 2 from each."""
    from tokenmill.common.inference import EngineConfig
    from tokenmill.common.redis_conn import connect_url
    from tokenmill.services.inference.dispatch.puller import ReplicaPuller
    from tokenmill.services.inference.loader import load_model
    from tokenmill.services.inference.replica import Replica

    save_lora_adapter(inference_store.client, tiny_ckpt, "tiny-style")
    cfg = EngineConfig(num_blocks=64, block_size=4, max_num_seqs=8)
    replica = Replica(
        load_model(inference_store.client, "tiny"), cfg, "r", store_client=inference_store.client
    )
    try:
        replica.ensure_adapter("tiny-style")
        puller = ReplicaPuller(replica, connect_url(redis_url), "127.0.0.1:1")  # not started: reads only
        streams = puller.streams()
        assert streams == [requests_stream("tiny"), requests_stream("tiny-style")]
        for stream in streams:
            for i in range(4):
                redis_client.xadd(stream, {"n": str(i)})
        puller._reread.update(streams)  # nothing of its own pending: read new entries
        taken = puller._read(2)
        assert sorted(stream for stream, _, _ in taken) == streams
        assert [redis_client.xlen(s) for s in streams] == [4, 4]  # taken, not yet acked or deleted
    finally:
        replica.shutdown()


@pytest.mark.slow
def test_request_without_a_model_is_not_stranded_when_the_model_it_queued_on_goes_away(
    start_router, start_replica, redis_url, redis_client, tiny_ckpt
):
    """A "" request queued on B's stream (B's replica heartbeats but takes nothing: hung) whose
    replica then goes away while A stays live: the router answers UNAVAILABLE after its no-replica
    wait and drops the entry from B's stream; the client's retry (gRPC retries UNAVAILABLE) lands on
    A. Before, A being live kept it waiting on B's stream for its whole 60 s deadline."""
    client, _, _ = start_router(no_replica_timeout_s=2.0)
    start_replica(redis_url, replica_id="a")
    hung = ReplicaInfo("b", "127.0.0.1:1", "other:1", time.time(), tags=["latest"])
    publish_heartbeat(redis_client, hung)  # a replica of B that heartbeats and pulls nothing
    # Both queues empty: the tie goes to the first name, 'other'.
    t, out = in_thread(lambda: client.generate(PROMPTS[0], max_tokens=3, timeout=60, **greedy()))
    wait_for(lambda: redis_client.xlen(OTHER) == 1, 30, "the request to be queued on B's stream")
    redis_client.hdel(REPLICAS, "b")  # B's replica is gone; only A's is live
    t.join(40)
    assert "value" in out, out.get("error", "still waiting on B's stream")
    assert out["value"].replica == "a"
    want = reference_greedy(tiny_ckpt.model, tiny_ckpt.encode(PROMPTS[0]), 3)
    assert list(out["value"].token_ids) == want
    assert redis_client.xlen(OTHER) == 0  # B's replica may have read it while draining: handed back


def test_request_handed_back_to_its_stream_is_dropped_when_its_client_gives_up(start_router, redis_client):
    """A draining replica (or one of another version) hands a taken request back to its stream as a
    new entry; when the client's deadline then passes, the router drops that entry too, so a model
    scaled to zero shows no backlog (and starts no replica) for a request nobody waits for."""
    from tokenmill.common.errors import DeadlineExceeded

    client, _, _ = start_router(no_replica_timeout_s=120.0)
    register_model(redis_client, Served("other:1", ("latest",)))
    ensure_group(redis_client, OTHER)
    t, out = in_thread(lambda: client.generate(PROMPTS[0], max_tokens=2, model="other", timeout=3))
    taken = redis_client.xreadgroup(GROUP, "draining", {OTHER: ">"}, count=1, block=20_000)
    [(entry_id, fields)] = taken[0][1]
    redis_client.xadd(OTHER, fields)  # what ReplicaPuller._process does while draining
    redis_client.xack(OTHER, GROUP, entry_id)
    redis_client.xdel(OTHER, entry_id)
    t.join(30)
    assert isinstance(out.get("error"), DeadlineExceeded), out
    wait_for(lambda: redis_client.xlen(OTHER) == 0, 10, "the router to drop the handed-back entry")
