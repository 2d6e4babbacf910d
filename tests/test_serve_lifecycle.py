"""`tokenmill serve` as a user meets it: replica ports that the platform's own services hold, a
replica that exits or cannot load while an older generation of its model still serves (the reason at
once, not the --timeout), a failed load retried (its real reason, not a metrics-registry clash),
`--remove` (NOT_FOUND afterwards, not a wait for a replica that never comes) and option ranges."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tests.fixtures.grpc import make_test_config
from tests.test_inference_scale_replicas import built  # noqa: F401 - the fixture
from tokenmill.common import errors
from tokenmill.common.cli.main import cli
from tokenmill.common.cli.serve import _forget_stopped, _remove, _wait_serving
from tokenmill.common.config import SERVICE_NAMES
from tokenmill.common.platform.launcher import ProcessSpec, RunDir
from tokenmill.services.inference.dispatch.failover import RouterDispatcher
from tokenmill.services.inference.dispatch.registry import (
    LOAD_ERRORS,
    known_models,
    load_errors,
    publish_load_error,
    register_model,
)
from tokenmill.services.inference.dispatch.selector import Served


def _bindable_base() -> int:
    """An inference port whose replica ports (+100.., +1100..) and service ports are all free."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base < 20000 or base + 2200 > 65535:
            continue
        wanted = [base + o for o in (0, 1000, 2000)] + [base + o + i for o in (100, 1100) for i in range(4)]
        ok = True
        for port in wanted:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
        if ok:
            return base


def test_replica_ports_avoid_the_platforms_own_ports_and_ports_in_use(tmp_path: Path) -> None:
    from tokenmill.common.platform.replicas import ReplicaOptions, platform_ports, replica_specs

    inference = _bindable_base()
    # The trainer's gRPC port is where replica 0 would go; the compress metrics port where replica
    # 1's metrics port would go: a replica started there exits at once, again and again.
    services = {name: {"port": inference - 10 - i} for i, name in enumerate(SERVICE_NAMES)}
    services["inference"] = {"port": inference}
    services["trainer"] = {"port": inference + 100}
    services["compress"] = {"port": inference - 50, "metrics_port": inference + 1101}
    config = make_test_config(tmp_path, services=services)
    with socket.socket() as held:  # another process listening on the next candidate
        held.bind(("127.0.0.1", inference + 102))
        held.listen()
        specs = replica_specs(
            "m",
            2,
            [],
            host="127.0.0.1",
            base_port=inference,
            options=ReplicaOptions(),
            reserved=platform_ports(config),
        )
    ports = [int(s.argv[s.argv.index("--port") + 1]) for s in specs]
    assert ports == [inference + 103, inference + 104]
    metrics = [int(s.argv[s.argv.index("--metrics-port") + 1]) for s in specs]
    assert metrics == [p + 1000 for p in ports]


def _write_state(config, name: str, **state) -> None:
    run_dir = RunDir(config.data_dir)
    run_dir.ensure()
    run_dir.state.write_text(json.dumps({name: state}))


def test_serve_fails_at_once_with_the_log_line_when_a_replica_exits(tmp_path: Path) -> None:
    config = make_test_config(tmp_path)
    name = "inference-replica-m-g1-0"
    started = time.time()
    _write_state(config, name, pid=0, started_at=started + 0.1, restarts=1, last_exit=1)
    (RunDir(config.data_dir).logs / f"{name}.log").write_text(
        "starting\ntokenmill-inference-replica: inference: cannot serve metrics on 127.0.0.1:9: "
        "Address already in use (set services.inference.metrics_port)\n"
    )
    t0 = time.monotonic()
    with pytest.raises(click.ClickException) as info:
        _wait_serving(config, {name: "127.0.0.1:9"}, "m:1", timeout=30, started=started)
    assert time.monotonic() - t0 < 15
    assert "exited with code 1" in info.value.message and "Address already in use" in info.value.message


def test_an_exit_before_this_serve_is_not_blamed_on_it(tmp_path: Path) -> None:
    config = make_test_config(tmp_path)
    name = "inference-replica-m-g1-0"
    _write_state(config, name, pid=0, started_at=time.time() - 100, restarts=0, last_exit=1)
    with pytest.raises(click.ClickException, match="not SERVING after"):
        _wait_serving(config, {name: "127.0.0.1:9"}, "m:1", timeout=0.5, started=time.time())


def test_serve_reports_its_own_replicas_load_error_while_another_generation_serves(
    tmp_path: Path, redis_url: str, redis_client
) -> None:
    """The old generation of a rolling replacement serves the model fine (the router answers for
    it); the new replica's own load error must still end `tokenmill serve` at once."""
    config = make_test_config(tmp_path, redis_url=redis_url)
    name = "inference-replica-m-g2-0"
    started = time.time()
    publish_load_error(redis_client, "inference-replica-other-g1-0", "other", "not mine")
    publish_load_error(redis_client, name, "m:v2", "NOT_FOUND: LoRA adapter 'nope' is not in the store")
    t0 = time.monotonic()
    with pytest.raises(click.ClickException) as info:
        _wait_serving(config, {name: "127.0.0.1:9"}, "m:2", timeout=30, started=started)
    assert time.monotonic() - t0 < 15
    assert f"replica {name} could not load m:v2: NOT_FOUND: LoRA adapter 'nope'" in info.value.message
    # One reported before this serve began (a previous replica of the same name) is not its reason.
    redis_client.delete(LOAD_ERRORS)
    publish_load_error(redis_client, name, "m:v2", "stale")
    with pytest.raises(click.ClickException, match="not SERVING after"):
        _wait_serving(config, {name: "127.0.0.1:9"}, "m:2", timeout=0.5, started=time.time() + 1)


def test_a_retried_failed_load_reports_its_real_reason(built, inference_store, tiny_ckpt, redis_client):  # noqa: F811
    """A replica retries its load; the second attempt registered the latency histograms again, so
    from then on the reason reported was DuplicateTimeseries, not the broken checkpoint."""
    tensors = dict(tiny_ckpt.tensors)
    weight = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[weight] = tensors[weight][:, :-3]
    tiny_ckpt.save_to(inference_store.client, "broken", tensors)
    _app, ready = built("127.0.0.1", model="broken", replica_id="r-retry")
    for _ in range(3):
        with pytest.raises(Exception) as info:  # noqa: PT011 - whatever the engine raises
            ready()
        assert "Duplicated timeseries" not in str(info.value)
        (err,) = [e for e in load_errors(redis_client) if e.replica_id == "r-retry"]
        assert "Duplicated" not in err.message and "size" in err.message, err.message


def _replica(name: str, model: str, *adapters: str) -> ProcessSpec:
    argv = ["python", "-m", "tokenmill.services.inference", "replica", "--model", model]
    for a in adapters:
        argv += ["--adapter", a]
    return ProcessSpec(name, argv)


def test_remove_forgets_the_model_so_requests_are_not_found(tmp_path: Path, redis_url: str, redis_client):
    """Before, a removed model stayed known: a request for it queued for a replica that never came
    (inference_limits.no_replica_wait_seconds, 120 s, on each of the client's retries)."""
    config = make_test_config(tmp_path, redis_url=redis_url)
    run_dir = RunDir(config.data_dir)
    run_dir.ensure()
    run_dir.write_processes(
        [_replica("inference-replica-b-g1-0", "b:v1", "lora-b"), _replica("inference-replica-a-g1-0", "a")]
    )
    for ref in ("b:1", "b:2", "lora-b:1", "a:1"):
        register_model(redis_client, Served(ref, ("latest",)))
    dispatcher = RouterDispatcher(redis_client)
    assert dispatcher.targets("b") == []  # known, no live replica: a request would queue and wait

    _remove(config, "b")

    assert {s.ref for s in known_models(redis_client)} == {"a:1"}
    for model in ("b", "b:1", "lora-b"):
        with pytest.raises(errors.NotFound, match="is not served; the platform serves a:1"):
            dispatcher.targets(model)
    assert [s.name for s in run_dir.read_processes()] == ["inference-replica-a-g1-0"]


def test_a_replacement_forgets_the_versions_and_adapters_it_no_longer_serves(
    tmp_path: Path, redis_url: str, redis_client
) -> None:
    config = make_test_config(tmp_path, redis_url=redis_url)
    run_dir = RunDir(config.data_dir)
    run_dir.ensure()
    old = [_replica("inference-replica-a-g1-0", "a:v1", "lora-1", "lora-2")]
    new = [_replica("inference-replica-a-g2-0", "a:v2", "lora-2"), _replica("inference-replica-c-g1-0", "c")]
    run_dir.write_processes(new)  # the old generation was just removed from the table
    for ref in ("a:1", "a:2", "lora-1:1", "lora-2:1", "c:1"):
        register_model(redis_client, Served(ref, ()))

    _forget_stopped(config, old, keep="a:2")

    assert {s.ref for s in known_models(redis_client)} == {"a:2", "lora-2:1", "c:1"}


@pytest.mark.parametrize(
    ("option", "value"), [("--max-num-seqs", "0"), ("--kv-cache-mb", "0"), ("--kv-cache-mb", "-1")]
)
def test_serve_refuses_options_no_replica_can_start_with(option: str, value: str, tmp_path: Path) -> None:
    """--max-num-seqs 0 loaded, then hung in warm-up (nothing is ever scheduled) until --timeout."""
    result = CliRunner().invoke(cli, ["serve", "m", option, value], env={"TOKENMILL_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 2, result.output
    assert option in result.output


def test_a_draining_replica_takes_no_new_requests_but_stays_live(redis_client) -> None:
    """A removed or replaced replica drains (up to shutdown_grace_seconds): requests it took must
    not fail over (it is live), but a new request for what only it serves must not be queued for
    it either: NOT_FOUND at once once the model is forgotten, not after the drain."""
    from tokenmill.services.inference.dispatch.protocol import ReplicaInfo, publish_heartbeat
    from tokenmill.services.inference.dispatch.registry import MODELS

    for ref in ("a:1", "b:1"):
        register_model(redis_client, Served(ref, ()))
    draining = ReplicaInfo("r-b", "127.0.0.1:1", "b:1", time.time(), draining=True)
    publish_heartbeat(redis_client, draining)
    dispatcher = RouterDispatcher(redis_client)
    assert [r.replica_id for r in dispatcher.replicas()] == ["r-b"]  # live: its requests stay put
    assert dispatcher.targets("b") == []  # known, none taking requests: a replacement may come
    redis_client.hdel(MODELS, "b:1")  # what `serve --remove b` does
    with pytest.raises(errors.NotFound, match="'b' is not served; the platform serves a:1"):
        dispatcher.targets("b")
    publish_heartbeat(redis_client, ReplicaInfo("r-b", "127.0.0.1:1", "b:1", time.time()))
    assert [r.replica_id for r in dispatcher.targets("b")] == ["r-b"]
