"""Inference replicas in the launcher's process table: which model each serves, their names and ports.

`tokenmill serve` keeps any number of models on the platform. Each serve of a model starts a new
generation of replicas (`inference-replica-<name>-g<gen>-<i>`) beside the old one, so a replacement
rolls: the new generation becomes SERVING before the old one is removed (and drains). Ports are
the lowest free ones from the inference port + 100 (metrics: that port + 1000), so replicas of
different models never collide.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tokenmill.common.config import host_port
from tokenmill.common.platform.launcher import ProcessSpec

REPLICA_PREFIX = "inference-replica-"
PORT_OFFSET = 100
METRICS_OFFSET = 1000
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


def replicas_of(specs: Iterable[ProcessSpec], name: str) -> list[ProcessSpec]:
    """The replica specs serving any version or tag of model `name`."""
    return [s for s in specs if is_replica(s) and model_name(served_model(s)) == name]


def next_generation(specs: Iterable[ProcessSpec]) -> int:
    gens = [int(m.group(1)) for s in specs if (m := _GENERATION.search(s.name))]
    return max(gens, default=0) + 1


def free_ports(specs: Iterable[ProcessSpec], base: int, count: int) -> list[int]:
    """`count` ports from `base` that no replica spec in the table uses."""
    used = {_flag(s.argv, "--port") for s in specs if is_replica(s)}
    ports: list[int] = []
    port = base
    while len(ports) < count:
        if str(port) not in used:
            ports.append(port)
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
) -> list[ProcessSpec]:
    """A new generation of `count` replicas of `model`, on ports free in `table`."""
    gen = next_generation(replicas_of(table, model_name(model)))
    specs = []
    for i, port in enumerate(free_ports(table, base_port + PORT_OFFSET, count)):
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
