"""Inference replicas in the launcher's process table: which model each serves, their names and ports.

`tokenmill serve` keeps any number of models on the platform. Each serve of a model starts a new
generation of replicas (`inference-replica-<name>-g<gen>-<i>`) beside the old one, so a replacement
rolls: the new generation becomes SERVING before the old one is removed (and drains). Ports are
the lowest free ones from the inference port + 100 (metrics: that port + 1000): used by no other
replica, by none of the platform's own ports (`reserved`: each service's gRPC and metrics port, the
router's HTTP port) and bindable now, so a replica never starts on a port it cannot hold.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from tokenmill.common.config import SERVICE_NAMES, Config, host_port
from tokenmill.common.platform.launcher import ProcessSpec
from tokenmill.common.platform.redis_embedded import port_bindable

REPLICA_PREFIX = "inference-replica-"
PORT_OFFSET = 100
METRICS_OFFSET = 1000
HTTP_OFFSET = 2000  # the router's OpenAI HTTP port, from the inference port
_GENERATION = re.compile(r"-g(\d+)-\d+$")


@dataclass(frozen=True)
class ReplicaOptions:
    """What every replica of one `tokenmill serve` gets on its command line."""

    device: str = "auto"
    kv_cache_mb: float = 256.0
    gpu_memory_utilization: float = 0.0
    max_num_seqs: int = 64
    adapters: tuple[str, ...] = ()


def _flag(argv: Sequence[str], flag: str) -> str:
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else ""


def is_replica(spec: ProcessSpec) -> bool:
    return spec.name.startswith(REPLICA_PREFIX)


def served_model(spec: ProcessSpec) -> str:
    """The model ref a replica spec was started with (`--model`)."""
    return _flag(spec.argv, "--model")


def model_name(ref: str) -> str:
    return ref.partition(":")[0]


def served_names(spec: ProcessSpec) -> set[str]:
    """The model names a replica spec serves: its model's and each preloaded adapter's (`--adapter`)."""
    argv = spec.argv
    adapters = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--adapter"]
    return {model_name(ref) for ref in (served_model(spec), *adapters)}


def replicas_of(specs: Iterable[ProcessSpec], name: str) -> list[ProcessSpec]:
    """The replica specs serving any version or tag of model `name`."""
    return [s for s in specs if is_replica(s) and model_name(served_model(s)) == name]


def next_generation(specs: Iterable[ProcessSpec]) -> int:
    gens = [int(m.group(1)) for s in specs if (m := _GENERATION.search(s.name))]
    return max(gens, default=0) + 1


def platform_ports(config: Config) -> set[int]:
    """The ports the platform's services hold: each one's gRPC and metrics port, and the router's
    OpenAI HTTP port (inference port + 2000)."""
    ports = {config.service("inference").port + HTTP_OFFSET}
    for name in SERVICE_NAMES:
        svc = config.service(name)
        ports |= {svc.port, svc.effective_metrics_port}
    return ports


def free_ports(
    specs: Iterable[ProcessSpec], base: int, count: int, reserved: Collection[int] = (), host: str = ""
) -> list[int]:
    """`count` ports from `base` that no replica spec in the table uses, neither they nor their
    metrics port (+1000) in `reserved`, both bindable on `host` now (when given)."""
    used = {int(p) for s in specs if is_replica(s) and (p := _flag(s.argv, "--port")).isdigit()}
    used |= {p + METRICS_OFFSET for p in used}
    taken = used | set(reserved)
    ports: list[int] = []
    port = base
    while len(ports) < count:
        if port + METRICS_OFFSET > 65535:
            raise RuntimeError(
                f"no free port pair for a replica from {base} (port and port + {METRICS_OFFSET})"
            )
        pair = (port, port + METRICS_OFFSET)
        if not taken.intersection(pair) and (not host or all(port_bindable(host, p) for p in pair)):
            ports.append(port)
            taken |= set(pair)
        port += 1
    return ports


def replica_specs(
    model: str,
    count: int,
    table: Sequence[ProcessSpec],
    *,
    host: str,
    base_port: int,
    options: ReplicaOptions,
    config_path: str | None = None,
    reserved: Collection[int] = (),
) -> list[ProcessSpec]:
    """A new generation of `count` replicas of `model`, on ports free in `table`, outside
    `reserved` (platform_ports) and bindable on `host`."""
    gen = next_generation(replicas_of(table, model_name(model)))
    specs = []
    for i, port in enumerate(free_ports(table, base_port + PORT_OFFSET, count, reserved, host)):
        name = f"{REPLICA_PREFIX}{model_name(model)}-g{gen}-{i}"
        argv = [sys.executable, "-m", "tokenmill.services.inference"]
        if config_path:
            argv += ["--config", config_path]
        argv += ["replica", "--model", model, "--replica-id", name, "--port", str(port)]
        argv += ["--metrics-port", str(port + METRICS_OFFSET), "--device", options.device]
        argv += ["--kv-cache-mb", str(options.kv_cache_mb), "--max-num-seqs", str(options.max_num_seqs)]
        argv += ["--gpu-memory-utilization", str(options.gpu_memory_utilization)]
        for a in options.adapters:
            argv += ["--adapter", a]
        specs.append(ProcessSpec(name=name, argv=argv, health_address=host_port(host, port)))
    return specs
