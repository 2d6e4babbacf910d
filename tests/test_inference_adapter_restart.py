"""A replica serving a base model and a LoRA adapter (two request streams) that dies holding entries
on both and comes back under the same replica id: each taken request is served once, by it, with
the output of the model it named (real Redis, real router, real in-process replicas)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict

import pytest

from tests.fixtures.inference import greedy, in_thread, reference_greedy, save_lora_adapter
from tokenmill.services.inference.dispatch.protocol import (
    GROUP,
    REPLICAS,
    ReplicaInfo,
    ensure_group,
    requests_stream,
)
from tokenmill.services.inference.dispatch.registry import known_models, register_model
from tokenmill.services.inference.dispatch.selector import Served

pytestmark = pytest.mark.slow  # replicas and a router per test
BASE, STYLE = requests_stream("tiny"), requests_stream("tiny-style")
PROMPT = [5, 6, 7, 8]


@pytest.fixture
def serve_tiny(start_puller, inference_store, tiny_ckpt) -> Callable[..., object]:
    """`serve_tiny(replica_id, adapters=())` -> the started puller of a replica of 'tiny' with
    `adapters` preloaded (as `--adapter` does) before it pulls anything; quick to declare the dead."""
    save_lora_adapter(inference_store.client, tiny_ckpt, "tiny-style")
    fast = {"dead_after_s": 1.0, "reclaim_every_s": 0.2}
    return lambda replica_id, adapters=(): start_puller("tiny", replica_id, adapters, **fast)


def heartbeat_serving_adapter(redis_client, replica_id: str) -> None:
    """The heartbeat the replica published before it died: 'tiny' with the adapter loaded."""
    info = ReplicaInfo(
        replica_id,
        "127.0.0.1:1",
        "tiny:1",
        time.time(),
        tags=["latest"],
        adapters={"tiny-style:1": ["latest"]},
    )
    redis_client.hset(REPLICAS, replica_id, json.dumps(asdict(info)))


def take_both(start_router, redis_client, consumer: str):
    """One request per stream, read under `consumer` (which then dies): the calls in flight."""
    client, _, _ = start_router(no_replica_timeout_s=60.0)
    heartbeat_serving_adapter(redis_client, consumer)
    register_model(redis_client, Served("tiny-style:1", ("latest",)))  # as its first life did
    for stream in (BASE, STYLE):
        ensure_group(redis_client, stream)
    calls = {
        model: in_thread(
            lambda m=model: client.generate(PROMPT, max_tokens=5, model=m, timeout=60, **greedy())
        )
        for model in ("tiny", "tiny-style")
    }
    for stream in (BASE, STYLE):
        taken = redis_client.xreadgroup(GROUP, consumer, {stream: ">"}, count=1, block=20_000)
        assert taken and taken[0][1], f"the request never reached {stream}"
    return client, calls


def check_served_once(client, calls, redis_client, tiny_ckpt, replica_id: str) -> None:
    outs = {}
    for model, (t, out) in calls.items():
        t.join(90)
        assert "value" in out, (model, out.get("error", "still waiting"))
        assert out["value"].replica == replica_id
        outs[model] = list(out["value"].token_ids)
    assert outs["tiny"] == reference_greedy(tiny_ckpt.model, PROMPT, 5)
    fresh = client.generate(PROMPT, max_tokens=5, model="tiny-style", timeout=60, **greedy())
    assert outs["tiny-style"] == list(fresh.token_ids) != outs["tiny"]  # the adapter's own output
    for stream in (BASE, STYLE):
        assert redis_client.xpending(stream, GROUP)["pending"] == 0, stream


def test_restart_with_the_adapter_preloaded_serves_what_it_took_on_both_streams(
    start_router, serve_tiny, redis_client, tiny_ckpt
):
    client, calls = take_both(start_router, redis_client, "phoenix")
    serve_tiny("phoenix", adapters=("tiny-style",))
    check_served_once(client, calls, redis_client, tiny_ckpt, "phoenix")


def test_restart_that_loads_the_adapter_later_still_serves_what_it_took_on_its_stream(
    start_router, serve_tiny, redis_client, tiny_ckpt
):
    """Back without the adapter, it re-reads the base stream; once a request loads the adapter again
    (`adapter=` on the base model), the adapter stream's own pending entries are re-read too.
    Before, the backlog pass had ended, so that request waited out its whole deadline."""
    client, calls = take_both(start_router, redis_client, "phoenix")
    puller = serve_tiny("phoenix")
    calls["tiny"][0].join(60)
    assert puller.streams() == [BASE]
    loads = client.generate([9, 10], max_tokens=2, model="tiny", adapter="tiny-style", timeout=60, **greedy())
    assert loads.replica == "phoenix"
    check_served_once(client, calls, redis_client, tiny_ckpt, "phoenix")


def test_entries_a_live_replica_holds_on_a_stream_it_no_longer_serves_go_to_one_that_does(
    start_router, serve_tiny, redis_client, tiny_ckpt
):
    """Back without the adapter (live, heartbeating, but not reading the adapter's stream), its
    entries there are orphans: a replica that serves the adapter claims and serves them.
    Before, its fresh heartbeat kept them from every other replica until the client's deadline."""
    client, calls = take_both(start_router, redis_client, "phoenix")
    serve_tiny("phoenix")
    calls["tiny"][0].join(60)
    serve_tiny("heir", adapters=("tiny-style",))
    t, out = calls["tiny-style"]
    t.join(60)
    assert "value" in out, out.get("error", "still waiting")
    assert out["value"].replica == "heir"
    fresh = client.generate(PROMPT, max_tokens=5, model="tiny-style", timeout=60, **greedy())
    assert list(out["value"].token_ids) == list(fresh.token_ids)
    assert redis_client.xpending(STYLE, GROUP)["pending"] == 0


def test_an_adapter_loaded_at_run_time_is_registered_as_a_served_model(
    start_router, serve_tiny, redis_client, tiny_ckpt
):
    """Loaded by a request (`adapter=`), the adapter is addressable as a model and stays known
    (docs/contracts.md `tokenmill:inference:models`): after its replica restarts without it, a
    request for it queues for a replica instead of failing NOT_FOUND."""
    client, _, _ = start_router(no_replica_timeout_s=60.0)
    serve_tiny("r")
    client.generate(PROMPT, max_tokens=2, model="tiny", adapter="tiny-style", timeout=60, **greedy())
    assert client.generate(PROMPT, max_tokens=2, model="tiny-style", timeout=60).replica == "r"
    assert "tiny-style:1" in {s.ref for s in known_models(redis_client)}
