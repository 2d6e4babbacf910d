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
import logging
import os
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

from tokenmill.common.config import Config
from tokenmill.common.inference import EngineConfig
from tokenmill.common.runtime import ReadyCheck, ServiceApp, config_parser, load_or_exit, serve_service
from tokenmill.services.inference.convert import SERVICE_NAME, add_inference_servicer

log = logging.getLogger("tokenmill.inference")

# Handler threads at least: each open stream holds one while it waits on the engine or Redis (no CPU).
MIN_WORKERS = 64
MODEL_ENV = "TOKENMILL_SERVE_MODEL"  # without a subcommand: run a replica of this model


def _dial_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


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
    and, unless --no-redis, the puller takes routed work."""
    from tokenmill.common.clients.checkpoint import CheckpointClient
    from tokenmill.common.redis_conn import connect
    from tokenmill.common.telemetry import register_gpu_collector
    from tokenmill.services.inference.dispatch.puller import ReplicaPuller, default_replica_id
    from tokenmill.services.inference.loader import load_model
    from tokenmill.services.inference.metrics import EngineCollector
    from tokenmill.services.inference.replica import Replica, ReplicaServicer

    replica_id = args.replica_id or default_replica_id()
    engine_config = engine_config_from_args(args)
    state: dict[str, Any] = {}
    app.add(add_inference_servicer, ReplicaServicer(lambda: state.get("replica")), SERVICE_NAME)

    def ready() -> bool:
        if "replica" not in state:
            store = state.setdefault("store", CheckpointClient.from_config(config))
            loaded = load_model(
                store, args.model, max_prompt_bytes=config.inference_limits.max_prompt_bytes or None
            )
            replica = Replica(loaded, engine_config, replica_id, store_client=store, registry=app.registry)
            app.registry.register(EngineCollector(replica.aengine.stats, replica.labels))
            register_gpu_collector(app.registry)
            replica.warmup()
            for ref in args.adapter or []:
                replica.ensure_adapter(ref)
            state["replica"] = replica
            log.info("replica %s serving %s on port %d", replica_id, loaded.ref, app.port)
        if args.no_redis:
            return True
        if "puller" not in state:
            address = f"{_dial_host(app.host)}:{app.port}"
            puller = ReplicaPuller(state["replica"], connect(config, client_name=replica_id), address)
            puller.start()
            state["puller"] = puller
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

    app.on_shutdown(shutdown)
    return ready


def build_router(config: Config, app: ServiceApp, args: argparse.Namespace) -> ReadyCheck:
    """Route through Redis, with the OpenAI HTTP front beside the gRPC port; ready once Redis answers."""
    from tokenmill.common.redis_conn import connect
    from tokenmill.services.inference.dispatch.failover import RouterDispatcher
    from tokenmill.services.inference.http_api import HttpFront
    from tokenmill.services.inference.router import RouterServicer

    r = connect(config, client_name="inference-router")
    dispatcher = RouterDispatcher(r, default_deadline_s=config.inference_limits.deadline_seconds)
    client_kwargs = {}
    if not config.auth.disabled and config.auth.tokens:
        client_kwargs["token"] = config.auth.tokens[0]
    app.add(add_inference_servicer, RouterServicer(dispatcher, client_kwargs=client_kwargs), SERVICE_NAME)
    http_port = args.http_port if args.http_port is not None else config.service("inference").port + 2000
    front = HttpFront(dispatcher, config, app.host, http_port)
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
