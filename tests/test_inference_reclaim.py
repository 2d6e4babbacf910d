"""Routed requests are never lost or stuck: reclaimed from dead replicas, served once, bounded by a
deadline; model selectors resolved exactly (issue 10, items 2 and 9)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import asdict

import pytest

from tests.fixtures.grpc import TEST_TOKEN
from tests.fixtures.inference import greedy, in_thread, reference_greedy, replica_process, wait_for
from tokenmill.common import errors, failpoints
from tokenmill.common.clients.base import NO_DEADLINE
from tokenmill.services.inference.dispatch import puller as puller_mod
from tokenmill.services.inference.dispatch.protocol import (
    GROUP,
    REPLICAS,
    Accepted,
    ReplicaInfo,
    RoutedEntry,
    ensure_group,
    post_acceptance,
    reply_key,
    requests_stream,
)
from tokenmill.services.inference.dispatch.selector import Selector, Served

FAST_RECLAIM = {"dead_after_s": 1.0, "reclaim_every_s": 0.2}
TINY = requests_stream("tiny")  # a request without a model goes to the one live model's stream


@pytest.fixture
def router(start_router, redis_client):
    """A router whose requests without a deadline get 2 s, judging replicas dead after 1 s."""
    return start_router(no_replica_timeout_s=30.0, default_deadline_s=2.0)


def fake_heartbeat(redis_client, replica_id: str, *, model: str = "tiny:1", tags=("latest",)) -> None:
    """A heartbeat as a replica would publish it, for a replica that never serves anything."""
    info = ReplicaInfo(replica_id, "127.0.0.1:1", model, time.time(), tags=list(tags))
    redis_client.hset(REPLICAS, replica_id, json.dumps(asdict(info)))


# -- model selectors ---------------------------------------------------------------------------


def test_selectors_parse_and_match_exactly():
    served = Served("tiny:3", ("latest", "prod"))
    assert Selector.parse("") is None
    for ok in ("tiny", "tiny:3", "tiny:prod", "tiny:latest"):
        assert Selector.parse(ok).matches(served), ok
    for other in ("tiny:2", "tiny:30", "tiny:best", "tinyx", "other:3"):
        assert not Selector.parse(other).matches(served), other
    for bad in ("tiny:../../x", "tiny:", ":3", "a:b:c", "../x", "tiny:03", "tiny:0", "tiny:a/b", "ok\n"):
        with pytest.raises(errors.InvalidArgument):
            Selector.parse(bad)


def test_router_and_replica_serve_only_the_exact_selector(router, start_replica, redis_url, tiny_ckpt):
    client, _, _ = router
    h = start_replica(redis_url)
    prompt = tiny_ckpt.encode("Once upon a time")
    want = reference_greedy(tiny_ckpt.model, prompt, 3)
    for model in ("tiny", "tiny:1", "tiny:latest"):
        assert list(client.generate(prompt, max_tokens=3, model=model, **greedy()).token_ids) == want
    for target in (client, h.client):  # the router, and the replica answering direct gRPC
        for model in ("tiny:2", "tiny:prod"):
            with pytest.raises(errors.NotFound, match=r"tiny:1 \(tags: latest\)"):
                target.generate(prompt, max_tokens=3, model=model)
        with pytest.raises(errors.InvalidArgument, match="tag"):
            target.generate(prompt, max_tokens=3, model="tiny:../../x")


# -- the acceptance fence ------------------------------------------------------------------------


def test_only_one_replica_accepts_a_request(redis_client):
    entry = RoutedEntry("req-1", reply_key("req-1"), None)
    assert post_acceptance(redis_client, entry, Accepted("a", [1, 2]))
    assert not post_acceptance(redis_client, entry, Accepted("b", [1, 2]))
    kinds = [fields["t"] for _id, fields in redis_client.xrange(reply_key("req-1"))]
    assert kinds == ["accepted"]


# -- reclaiming requests a dead replica had taken ------------------------------------------------


@pytest.mark.slow
def test_request_taken_by_a_dead_replica_is_served_by_another(
    router, start_replica, redis_url, redis_client, tiny_ckpt
):
    client, _, _ = router
    fake_heartbeat(redis_client, "ghost")  # live now; it takes the request and never answers
    prompt = tiny_ckpt.encode("Once upon a time")
    ensure_group(redis_client, TINY)
    thread, call = in_thread(lambda: client.generate(prompt, max_tokens=8, timeout=60, **greedy()))
    taken = redis_client.xreadgroup(GROUP, "ghost", {TINY: ">"}, count=1, block=20_000)
    assert taken and taken[0][1], "the request never reached the stream"
    start_replica(redis_url, replica_id="heir", puller_kwargs=FAST_RECLAIM)
    thread.join(60)
    assert "error" not in call, call.get("error")
    resp = call["value"]
    assert list(resp.token_ids) == reference_greedy(tiny_ckpt.model, prompt, 8)
    assert resp.replica == "heir"
    wait_for(lambda: not redis_client.xpending(TINY, GROUP)["pending"], what="the PEL to drain")


@pytest.mark.slow
def test_restarted_replica_serves_what_it_took_before_it_died(
    router, start_replica, redis_url, redis_client, tiny_ckpt
):
    client, _, _ = router
    fake_heartbeat(redis_client, "phoenix")
    ensure_group(redis_client, TINY)
    thread, call = in_thread(lambda: client.generate([5, 6, 7], max_tokens=4, timeout=60, **greedy()))
    taken = redis_client.xreadgroup(GROUP, "phoenix", {TINY: ">"}, count=1, block=20_000)
    assert taken and taken[0][1], "the request never reached the stream"
    start_replica(redis_url, replica_id="phoenix")  # same consumer name, heartbeat live at once
    thread.join(60)
    assert "error" not in call, call.get("error")
    assert list(call["value"].token_ids) == reference_greedy(tiny_ckpt.model, [5, 6, 7], 4)


@pytest.mark.slow
def test_replica_killed_after_taking_requests_they_complete_elsewhere_once(
    router, start_replica, redis_url, redis_client, inference_store, tmp_path, tiny_ckpt, monkeypatch
):
    client, _, _ = router
    env = {failpoints.ENV: failpoints.env_value({"inference.routed_taken": {"action": "kill"}})}
    proc, log = replica_process(tmp_path, redis_url, inference_store.app.port, "victim", env)
    try:
        wait_for(
            lambda: redis_client.hexists(REPLICAS, "victim") or proc.poll() is not None, 90, "victim ready"
        )
        assert proc.poll() is None, log.read_text()[-3000:]
        prompts = [tiny_ckpt.encode(t) for t in ("Once upon a time", "The quick brown fox", "def add(a, b):")]
        calls = [
            in_thread(lambda p=p: client.generate(p, max_tokens=6, timeout=90, **greedy())) for p in prompts
        ]
        assert proc.wait(60) == -signal.SIGKILL  # it took requests and died before accepting them
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    wins: Counter[str] = Counter()
    fence = puller_mod.post_acceptance

    def counted(r, entry, accepted):
        won = fence(r, entry, accepted)
        wins[entry.request_id] += won
        return won

    monkeypatch.setattr(puller_mod, "post_acceptance", counted)
    start_replica(redis_url, replica_id="survivor", puller_kwargs=FAST_RECLAIM)
    for (thread, call), prompt in zip(calls, prompts, strict=True):
        thread.join(90)
        assert "error" not in call, call.get("error")
        assert list(call["value"].token_ids) == reference_greedy(tiny_ckpt.model, prompt, 6)
        assert call["value"].replica == "survivor"
    assert len(wins) == 3 and set(wins.values()) == {1}, wins  # each served exactly once
    wait_for(lambda: not redis_client.xpending(TINY, GROUP)["pending"], what="the PEL to drain")


# -- deadlines -----------------------------------------------------------------------------------


def _keep_alive(redis_client, replica_id: str, stop: threading.Event) -> threading.Thread:
    """A wedged replica: it heartbeats, so it looks live, but never takes work."""

    def beat():
        while not stop.is_set():
            fake_heartbeat(redis_client, replica_id)
            stop.wait(0.2)

    t = threading.Thread(target=beat, daemon=True)
    t.start()
    return t


@pytest.mark.slow
def test_request_without_a_deadline_gets_the_default(router, redis_client):
    client, _, front = router
    stop = threading.Event()
    _keep_alive(redis_client, "wedged", stop)
    try:
        started = time.monotonic()
        thread, call = in_thread(lambda: client.generate([1, 2, 3], max_tokens=4, timeout=NO_DEADLINE))
        thread.join(60)
        assert not thread.is_alive(), "the request hangs: it has no deadline"
        assert isinstance(call.get("error"), errors.DeadlineExceeded), call
        assert "2 s deadline" in call["error"].message
        assert time.monotonic() - started >= 2.0

        body = json.dumps({"prompt": [1, 2, 3], "max_tokens": 4}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{front.port}/v1/completions",
            data=body,
            headers={"Authorization": f"Bearer {TEST_TOKEN}", "Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=60)
        assert info.value.code == 504
        error = json.loads(info.value.read())["error"]
        assert "deadline" in error["message"]
    finally:
        stop.set()
