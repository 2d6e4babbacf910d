"""Replicas as the service entry point builds them (`server.build_replica`): the address they
advertise, the load errors they report through the router, the quantization they report."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fixtures.grpc import TEST_TOKEN, make_test_config
from tests.fixtures.inference import greedy, wait_for
from tokenmill.common import errors
from tokenmill.common.clients.inference import InferenceClient
from tokenmill.common.model.quant import quantize_state_dict
from tokenmill.common.runtime import ServiceApp
from tokenmill.services.inference.dispatch.protocol import live_replicas
from tokenmill.services.inference.loader import load_model
from tokenmill.services.inference.replica import Replica
from tokenmill.services.inference.server import advertised_host, build_replica, parse_args


@pytest.fixture
def built(inference_store, redis_url, redis_client, tmp_path) -> Iterator[Any]:
    """`built(host, model="tiny", replica_id=...)` -> (app, ready): a replica wired exactly as
    `python -m tokenmill.services.inference replica` wires it, bound to `host`."""
    apps: list[ServiceApp] = []

    def build(host: str, model: str = "tiny", replica_id: str = "") -> tuple[ServiceApp, Any]:
        config = make_test_config(
            tmp_path,
            redis_url=redis_url,
            services={
                "checkpoint": {"port": inference_store.app.port},
                "inference": {"port": 1, "host": host},
            },
        )
        argv = ["replica", "--model", model, "--device", "cpu", "--kv-cache-mb", "1", "--block-size", "4"]
        args = parse_args([*argv, "--replica-id", replica_id or f"r-{host}"])
        app = ServiceApp("inference", config, port=0, metrics=False)
        ready = build_replica(config, app, args)
        app.start()
        apps.append(app)
        return app, ready

    yield build
    for app in apps:
        app.stop(0)


def _heartbeat_address(redis_client, replica_id: str) -> str:
    wait_for(lambda: any(i.replica_id == replica_id for i in live_replicas(redis_client, 5)), 30, "heartbeat")
    return next(i.address for i in live_replicas(redis_client, 5) if i.replica_id == replica_id)


def test_replicas_on_two_loopback_addresses_are_each_reached_at_their_own(built, redis_client):
    for host in ("127.0.0.2", "127.0.0.3"):
        app, ready = built(host)
        assert ready()
        address = _heartbeat_address(redis_client, f"r-{host}")
        assert address == f"{host}:{app.port}"
        with InferenceClient(address, token=TEST_TOKEN) as client:
            assert client.stats(timeout=10).replica == f"r-{host}"


def test_replica_bound_to_all_interfaces_advertises_a_routable_address(built, redis_client, monkeypatch):
    monkeypatch.delenv("POD_IP", raising=False)
    app, ready = built("0.0.0.0", replica_id="wide")
    assert ready()
    address = _heartbeat_address(redis_client, "wide")
    host, _, port = address.rpartition(":")
    assert not ipaddress.ip_address(host).is_loopback and port == str(app.port)
    with InferenceClient(address, token=TEST_TOKEN) as client:
        assert client.stats(timeout=10).replica == "wide"


def test_advertised_host_order():
    assert advertised_host("0.0.0.0", "tm.example", {"POD_IP": "10.1.2.3"}) == "tm.example"
    assert advertised_host("0.0.0.0", "", {"POD_IP": "10.1.2.3"}) == "10.1.2.3"
    assert advertised_host("127.0.0.2", "", {}) == "127.0.0.2"
    assert not ipaddress.ip_address(advertised_host("0.0.0.0", "", {})).is_loopback


def test_a_checkpoint_that_cannot_load_is_reported_through_the_router(
    built, inference_store, tiny_ckpt, start_router, redis_client
):
    tensors = dict(tiny_ckpt.tensors)
    name = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[name] = tensors[name][:, :-3]  # a weight of the wrong shape
    tiny_ckpt.save_to(inference_store.client, "broken", tensors)
    client, _, _ = start_router(no_replica_timeout_s=60.0)
    _app, ready = built("127.0.0.1", model="broken", replica_id="r-broken")
    with pytest.raises(Exception):  # noqa: B017 - whatever the engine raises, it is reported below
        ready()
    with pytest.raises(errors.FailedPrecondition, match=r"replica r-broken could not load broken: .*size"):
        client.model_info(model="broken")
    with pytest.raises(errors.FailedPrecondition, match="could not load broken"):
        client.generate("hi", max_tokens=2, model="broken", **greedy())


@pytest.mark.parametrize(("method", "kwargs"), [("int8", {}), ("int4", {"group_size": 32})])
def test_model_info_reports_the_real_quantization(inference_store, tiny_ckpt, method, kwargs):
    from tokenmill.common.inference import EngineConfig

    tiny_ckpt.save_to(
        inference_store.client, f"tiny-{method}", quantize_state_dict(tiny_ckpt.tensors, method, **kwargs)
    )
    loaded = load_model(inference_store.client, f"tiny-{method}")
    replica = Replica(loaded, EngineConfig(num_blocks=32, block_size=4), "q")
    try:
        assert replica.model_info().quantization == method
    finally:
        replica.shutdown()
