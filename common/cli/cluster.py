"""`tokenmill cluster status`: the platform as a Kubernetes cluster runs it.

GPU nodes (allocatable vs. requested GPUs), tokenmill pods per component with their readiness, the
queue backlog in Redis (the inference queue per model) and the live inference replicas. The cluster
comes from the in-cluster config or the current kube context (the trainer's `kubernetes` backend
connects the same way); with neither, or an API server that does not answer, the command prints one
line and exits non-zero.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import click

from tokenmill.common.errors import FailedPrecondition
from tokenmill.common.trainer.backends.k8s_manifests import COMPONENT_LABEL

GPU_RESOURCE = "nvidia.com/gpu"
REQUESTS_PREFIX = "tokenmill:inference:requests:"  # + model name: dispatch/protocol.py requests_stream
REPLICAS_HASH = "tokenmill:inference:replicas"  # ... REPLICAS (a heartbeat per replica)
REPLICA_DEAD_AFTER_S = 3.0  # the router's rule (RouterDispatcher.dead_after_s): live means routable
API_TIMEOUT_S = 5


@dataclass
class GpuNode:
    name: str
    ready: bool
    allocatable: int
    used: int = 0


@dataclass
class ComponentPods:
    total: int = 0
    ready: int = 0
    phases: Counter = field(default_factory=Counter)
    restarts: int = 0


def _gpus(resources: dict[str, Any] | None, resource: str) -> int:
    value = (resources or {}).get(resource)
    return int(str(value)) if value is not None else 0


def gpu_nodes(core: Any, resource: str = GPU_RESOURCE) -> list[GpuNode]:
    """Nodes with GPUs to offer, and how many of them running pods have claimed."""
    nodes = {}
    for node in core.list_node(_request_timeout=API_TIMEOUT_S).items:
        allocatable = _gpus(node.status.allocatable, resource)
        if allocatable:
            ready = any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
            nodes[node.metadata.name] = GpuNode(node.metadata.name, ready, allocatable)
    active = "status.phase!=Succeeded,status.phase!=Failed"
    for pod in core.list_pod_for_all_namespaces(field_selector=active, _request_timeout=API_TIMEOUT_S).items:
        node = nodes.get(pod.spec.node_name or "")
        if node is not None:
            for c in pod.spec.containers:
                res = c.resources
                node.used += _gpus(res.limits, resource) if res else 0
    return sorted(nodes.values(), key=lambda n: n.name)


def component_pods(core: Any, namespace: str, selector: str) -> dict[str, ComponentPods]:
    """tokenmill pods by their component label (train workers included)."""
    out: dict[str, ComponentPods] = defaultdict(ComponentPods)
    pods = core.list_namespaced_pod(namespace, label_selector=selector, _request_timeout=API_TIMEOUT_S)
    for pod in pods.items:
        c = out[(pod.metadata.labels or {}).get(COMPONENT_LABEL, "-")]
        c.total += 1
        c.phases[pod.status.phase or "Unknown"] += 1
        c.ready += any(x.type == "Ready" and x.status == "True" for x in pod.status.conditions or [])
        c.restarts += sum(s.restart_count for s in pod.status.container_statuses or [])
    return dict(sorted(out.items()))


def live_replicas(r: Any, now: float | None = None) -> Counter:
    """Live inference replicas per model (a heartbeat at most REPLICA_DEAD_AFTER_S old)."""
    now = time.time() if now is None else now
    live: Counter = Counter()
    for raw in r.hgetall(REPLICAS_HASH).values():
        try:
            info = json.loads(raw)
            if now - float(info["time"]) <= REPLICA_DEAD_AFTER_S:
                live[str(info["model"])] += 1
        except (ValueError, KeyError, TypeError):
            continue
    return live


def cluster_lines(core: Any, namespace: str, selector: str) -> list[str]:
    lines = [f"{'gpu node':<34}{'ready':<7}{'gpus':<6}used"]
    nodes = gpu_nodes(core)
    lines += [f"{n.name:<34}{'yes' if n.ready else 'no':<7}{n.allocatable:<6}{n.used}" for n in nodes]
    if not nodes:
        lines.append(f"(no node offers {GPU_RESOURCE}: install the device plugin or GPU operator)")
    lines += ["", f"{'component (' + namespace + ')':<34}{'ready':<9}{'restarts':<10}phases"]
    comps = component_pods(core, namespace, selector)
    for name, c in comps.items():
        phases = ", ".join(f"{n} {p.lower()}" for p, n in sorted(c.phases.items()))
        lines.append(f"{name:<34}{f'{c.ready}/{c.total}':<9}{c.restarts:<10}{phases}")
    if not comps:
        lines.append(f"(no pods match {selector} in namespace {namespace})")
    return lines


def redis_lines(r: Any, job_types: tuple[str, ...]) -> list[str]:
    from tokenmill.common.jobs import JobQueue

    queue = JobQueue(r)
    lines = ["", f"{'queue':<34}{'waiting':<9}{'running':<10}dead"]
    for job_type in job_types:
        d = queue.depth(job_type)
        lines.append(f"{job_type:<34}{d['waiting']:<9}{d['running']:<10}{d['dead']}")
    lines += inference_queue_lines(r)
    replicas = live_replicas(r)
    lines += ["", f"live replicas: {sum(replicas.values())}"]
    lines += [f"  {model:<32}{n}" for model, n in sorted(replicas.items())]
    return lines


def inference_queue_lines(r: Any) -> list[str]:
    """Routed requests queued per model: one request stream per model name."""
    streams = sorted(r.scan_iter(match=f"{REQUESTS_PREFIX}*", count=1000, _type="STREAM"))
    if not streams:
        return [f"{'inference requests':<34}0"]
    return [f"{'inference requests ' + s.removeprefix(REQUESTS_PREFIX):<34}{r.xlen(s)}" for s in streams]


def _connect() -> Any:
    from tokenmill.common.trainer.backends.k8s_manifests import connect

    return connect(retries=0)  # a status command answers at once, not after back-offs


@click.group()
def cluster() -> None:
    """The platform on a Kubernetes cluster."""


@cluster.command()
@click.option("-n", "--namespace", default="", help="Where tokenmill runs (default: the context's).")
@click.option("--selector", default="app.kubernetes.io/name=tokenmill", show_default=True)
@click.pass_obj
def status(obj: Any, namespace: str, selector: str) -> None:
    """GPU nodes, tokenmill pods per component, queue backlog and live replicas."""
    try:
        clients = _connect()
    except FailedPrecondition as exc:
        raise click.ClickException(f"no Kubernetes cluster reachable: {exc.message}") from None
    try:
        namespace = namespace or clients.namespace
        lines = cluster_lines(clients.core, namespace, selector)
    except Exception as exc:  # connection refused, TLS, 401/403: one line, not a traceback
        why = getattr(exc, "reason", None) or str(exc).splitlines()[0]
        raise click.ClickException(f"no Kubernetes cluster reachable ({clients.where}): {why}") from None
    click.echo(f"cluster: {clients.where}")
    click.echo("\n".join(lines))
    try:
        from tokenmill.common.cli.platform import JOB_TYPES
        from tokenmill.common.redis_conn import connect_url

        url = obj.config.redis_url
        if not url:
            raise RuntimeError("set redis_url (or REDIS_URL) to the platform's Redis")
        click.echo("\n".join(redis_lines(connect_url(url), JOB_TYPES)))
    except Exception as exc:  # the cluster view stands on its own when Redis is out of reach
        click.echo(f"\nqueues and replicas: unavailable ({exc})")
