"""`python -m tokenmill.services.inference`: the router (default) or one replica (`replica --model REF`).

Without a subcommand it runs the router (how the Helm chart's router pods and docker-compose start it),
unless TOKENMILL_SERVE_MODEL=REF is in the environment: then a replica of REF on the configured
inference port (how the Helm chart's inference pods start).

The router is the platform's inference endpoint (config.services.inference: gRPC, plus the
OpenAI-compatible HTTP front on --http-port, default gRPC port + 2000). Replicas are started by
`tokenmill serve MODEL --replicas N`, each on its own port; they load the model from the
checkpoint store, warm up with a real forward pass (health SERVING only then), answer gRPC
directly and pull routed work from Redis.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import psutil
import redis

from tokenmill.common.config import Config, host_port
from tokenmill.common.errors import FailedPrecondition, TokenmillError
from tokenmill.common.inference import EngineConfig
from tokenmill.common.runtime import ReadyCheck, ServiceApp, config_parser, load_or_exit, serve_service
from tokenmill.services.inference.convert import SERVICE_NAME, add_inference_servicer

log = logging.getLogger("tokenmill.inference")

# Handler threads at least: each open stream holds one while it waits on the engine or Redis (no CPU).
MIN_WORKERS = 64
MODEL_ENV = "TOKENMILL_SERVE_MODEL"  # without a subcommand: run a replica of this model


ALL_INTERFACES = ("0.0.0.0", "::", "")
# A store that is down or slow is a reason to retry, not a broken model.
TRANSIENT_LOAD_ERRORS = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def advertised_host(bind_host: str, advertise_host: str = "", env: Mapping[str, str] = os.environ) -> str:
    """The host a router dials to reach this replica: the `advertise_host` setting, else $POD_IP
    (the Helm chart sets it), else the bound host, else (bound to all interfaces) a non-loopback
    address of this host. Never loopback for all interfaces: in a pod that is the router itself."""
    if advertise_host:
        return advertise_host
    if env.get("POD_IP"):
        return env["POD_IP"]
    if bind_host not in ALL_INTERFACES:
        return bind_host
    return routable_address(ipv6=bind_host == "::")


def routable_address(*, ipv6: bool = False) -> str:
    """The first address of an interface that is up and neither loopback nor link-local."""
    families = (socket.AF_INET6, socket.AF_INET) if ipv6 else (socket.AF_INET, socket.AF_INET6)
    up = {name for name, st in psutil.net_if_stats().items() if st.isup}
    addrs = [a for name, entries in psutil.net_if_addrs().items() if name in up for a in entries]
    for family in families:
        for a in addrs:
            if a.family != family:
                continue
            ip = ipaddress.ip_address(a.address.split("%")[0])
            if not (ip.is_loopback or ip.is_link_local or ip.is_unspecified):
                return str(ip)
    raise FailedPrecondition(
        "the replica is bound to all interfaces but this host has no non-loopback address to advertise; "
        "set services.inference.advertise_host (or POD_IP)"
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    from tokenmill.services.inference.replica import parse_dtype

    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return EngineConfig(
        block_size=args.block_size,
        kv_cache_memory_bytes=int(args.kv_cache_mb * 1024 * 1024),
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len or None,
        enable_prefix_caching=not args.no_prefix_caching,
        device=device,
        dtype=parse_dtype(dtype),
    )


def build_replica(config: Config, app: ServiceApp, args: argparse.Namespace) -> ReadyCheck:
    """Serve gRPC at once (UNAVAILABLE while loading); ready once the model loaded and warmed up
    and, unless --no-redis, the puller takes routed work. A model that cannot load is reported in
    Redis (dispatch.registry) so the router and `tokenmill serve` can say why."""
    from tokenmill.common.redis_conn import connect
    from tokenmill.services.inference.dispatch.puller import ReplicaPuller, default_replica_id
    from tokenmill.services.inference.dispatch.registry import clear_load_error
    from tokenmill.services.inference.replica import ReplicaServicer

    replica_id = args.replica_id or default_replica_id()
    state: dict[str, Any] = {}
    app.add(add_inference_servicer, ReplicaServicer(lambda: state.get("replica")), SERVICE_NAME)

    def redis_client() -> Any:
        if "redis" not in state:
            state["redis"] = connect(config, client_name=replica_id)
        return state["redis"]

    def ready() -> bool:
        if "replica" not in state:
            try:
                state["replica"] = _load_replica(config, app, args, replica_id, state)
            except Exception as exc:
                if not args.no_redis:
                    _report_load_error(redis_client(), replica_id, args.model, exc)
                raise
        if args.no_redis:
            return True
        if "puller" not in state:
            svc = config.service("inference")
            address = host_port(advertised_host(app.host, svc.advertise_host), app.port)
            replica = state["replica"]
            clear_load_error(redis_client(), replica_id)
            puller = ReplicaPuller(replica, redis_client(), address)
            puller.start()
            state["puller"] = puller
            log.info("replica %s advertises %s", replica_id, address)
        return True

    def shutdown() -> None:
        if "puller" in state:
            if not state["puller"].drain(config.shutdown_grace_seconds):
                log.warning(
                    "routed requests still running after the grace period; the router will retry them"
                )
            state["puller"].stop()
        if "replica" in state:
            state["replica"].shutdown()
        if "redis" in state:
            with contextlib.suppress(redis.RedisError):
                clear_load_error(state["redis"], replica_id)

    app.on_shutdown(shutdown)
    return ready


def _load_replica(
    config: Config, app: ServiceApp, args: argparse.Namespace, replica_id: str, state: dict[str, Any]
) -> Any:
    """Load the model from the store, build the engine, warm it up, preload adapters."""
    from tokenmill.common.clients.checkpoint import CheckpointClient
    from tokenmill.common.telemetry import register_gpu_collector
    from tokenmill.services.inference.loader import load_model
    from tokenmill.services.inference.metrics import EngineCollector
    from tokenmill.services.inference.replica import Replica

    store = state.setdefault("store", CheckpointClient.from_config(config))
    max_prompt = config.inference_limits.max_prompt_bytes or None
    loaded = load_model(store, args.model, max_prompt_bytes=max_prompt)
    engine_config = engine_config_from_args(args)
    replica = Replica(loaded, engine_config, replica_id, store_client=store, registry=app.registry)
    try:
        replica.warmup()
        for ref in args.adapter or []:
            replica.ensure_adapter(ref)
    except BaseException:
        replica.shutdown()  # the next attempt builds a new engine
        raise
    app.registry.register(EngineCollector(replica.aengine.stats, replica.labels))
    register_gpu_collector(app.registry)
    log.info("replica %s serving %s on port %d", replica_id, loaded.ref, app.port)
    return replica


def _report_load_error(r: Any, replica_id: str, model: str, exc: BaseException) -> None:
    """Publish why `model` did not load, unless the cause is transient (the store briefly down)."""
    from tokenmill.services.inference.dispatch.registry import publish_load_error

    if isinstance(exc, TokenmillError):
        if exc.code in TRANSIENT_LOAD_ERRORS:
            return
        reason = f"{exc.code}: {exc.message}"
    else:
        reason = f"{type(exc).__name__}: {exc}"
    log.error("replica %s cannot load %s: %s", replica_id, model, reason)
    try:
        publish_load_error(r, replica_id, model, reason)
    except redis.RedisError:
        log.warning("could not report the load error to Redis", exc_info=True)


def build_router(config: Config, app: ServiceApp, args: argparse.Namespace) -> ReadyCheck:
    """Route through Redis, with the OpenAI HTTP front beside the gRPC port; ready once Redis answers."""
    from tokenmill.common.redis_conn import connect
    from tokenmill.services.inference.dispatch.failover import RouterDispatcher
    from tokenmill.services.inference.http_api import HttpFront
    from tokenmill.services.inference.metrics import RouterCollector, RouterMetrics
    from tokenmill.services.inference.router import RouterServicer

    r = connect(config, client_name="inference-router")
    limits = config.inference_limits
    dispatcher = RouterDispatcher(
        r,
        default_deadline_s=limits.deadline_seconds,
        no_replica_timeout_s=limits.no_replica_wait_seconds,
        metrics=RouterMetrics(app.registry),
    )
    app.registry.register(RouterCollector(dispatcher.backlog, dispatcher.replicas))
    client_kwargs = {}
    if not config.auth.disabled and config.auth.tokens:
        client_kwargs["token"] = config.auth.tokens[0]
    app.add(add_inference_servicer, RouterServicer(dispatcher, client_kwargs=client_kwargs), SERVICE_NAME)
    http_port = args.http_port if args.http_port is not None else config.service("inference").port + 2000
    front = HttpFront(dispatcher, config, app.host, http_port, registry=app.registry)
    front.start()
    log.info("OpenAI-compatible HTTP front on %s:%d", app.host, front.port)
    app.on_shutdown(front.stop)
    return lambda: bool(r.ping())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = config_parser("tokenmill-inference", "tokenmill inference router / replica")
    sub = parser.add_subparsers(dest="role")
    router = sub.add_parser("router", help="the routing endpoint (default)")
    router.add_argument(
        "--http-port", type=int, default=None, help="OpenAI HTTP port (default: gRPC port + 2000)"
    )
    rep = sub.add_parser("replica", help="one model replica")
    rep.add_argument("--model", required=True, help="checkpoint ref: NAME, NAME:VERSION or NAME:TAG")
    rep.add_argument("--replica-id", default="")
    rep.add_argument("--port", type=int, default=0, help="gRPC port (0 = any free port)")
    rep.add_argument("--metrics-port", type=int, default=0)
    rep.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    rep.add_argument(
        "--dtype", default="", help="float32 | bfloat16 | float16 (default: bf16 on GPU, fp32 on CPU)"
    )
    rep.add_argument("--kv-cache-mb", type=float, default=256.0, help="KV-cache memory budget")
    rep.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.0,
        help="on CUDA: size the KV cache to use this fraction of GPU memory (overrides --kv-cache-mb)",
    )
    rep.add_argument("--block-size", type=int, default=16)
    rep.add_argument("--max-num-seqs", type=int, default=64)
    rep.add_argument("--max-num-batched-tokens", type=int, default=512)
    rep.add_argument("--max-model-len", type=int, default=0)
    rep.add_argument("--no-prefix-caching", action="store_true")
    rep.add_argument("--adapter", action="append", help="LoRA adapter ref to preload (repeatable)")
    rep.add_argument("--no-redis", action="store_true", help="direct gRPC only; do not pull routed work")
    args = parser.parse_args(argv)
    if args.role is None:
        model = os.environ.get(MODEL_ENV, "")
        if model:  # a replica configured through the environment (the Helm chart's inference pods)
            args = parser.parse_args([*(argv or sys.argv[1:]), "replica", "--model", model])
            args.port = None  # the config's inference port
            args.metrics_port = None
            args.replica_id = args.replica_id or os.environ.get("HOSTNAME", "")
        else:
            args.role = "router"
            args.http_port = None
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the role, then start like every service (`serve_service`)."""
    args = parse_args(argv)
    prog = f"tokenmill-inference-{args.role}"
    config = load_or_exit(args.config, prog)
    if args.role == "router":
        build = partial(build_router, args=args)
        return serve_service("inference", build, config, prog=prog, min_workers=MIN_WORKERS)
    return serve_service(
        "inference",
        partial(build_replica, args=args),
        config,
        prog=prog,
        port=args.port,
        metrics_port=args.metrics_port,
        min_workers=MIN_WORKERS,
    )
