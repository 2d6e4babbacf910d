"""`tokenmill cluster status`: one clear line when no cluster is reachable (the real command, a real
kubeconfig), and the table's content against a simulated API server (real client model objects) and a
real Redis holding the platform's queues and replica heartbeats."""

from __future__ import annotations

import json
import socket
import time

import pytest
from click.testing import CliRunner
from kubernetes.client import (
    V1Container,
    V1ContainerStatus,
    V1Node,
    V1NodeCondition,
    V1NodeList,
    V1NodeStatus,
    V1ObjectMeta,
    V1Pod,
    V1PodCondition,
    V1PodList,
    V1PodSpec,
    V1PodStatus,
    V1ResourceRequirements,
)

from tokenmill.common.cli import cluster
from tokenmill.common.cli.main import cli
from tokenmill.common.jobs import JobQueue
from tokenmill.common.trainer.backends.k8s_manifests import COMPONENT_LABEL


def invoke(monkeypatch: pytest.MonkeyPatch, kubeconfig: str) -> tuple[int, list[str]]:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod
    monkeypatch.setenv("KUBECONFIG", kubeconfig)
    result = CliRunner().invoke(cli, ["cluster", "status"])
    return result.exit_code, result.output.strip().splitlines()


def test_no_kubeconfig_is_one_line_and_a_failure(monkeypatch, tmp_path):
    code, lines = invoke(monkeypatch, str(tmp_path / "missing"))
    assert code != 0 and len(lines) == 1
    assert lines[0].startswith("Error: no Kubernetes cluster reachable: no Kubernetes cluster configured")


def test_api_server_that_does_not_answer_is_one_line_naming_the_context(monkeypatch, tmp_path):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{port}"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "lab", "context": {"cluster": "c", "user": "u", "namespace": "ml"}}],
                "current-context": "lab",
            }
        )
    )
    code, lines = invoke(monkeypatch, str(kubeconfig))
    assert code != 0 and len(lines) == 1
    assert lines[0].startswith("Error: no Kubernetes cluster reachable (lab):") and "refused" in lines[0]


# ------------------------------------------------------------------------------ simulated API server
def node(name: str, gpus: str | None, ready: str = "True") -> V1Node:
    return V1Node(
        metadata=V1ObjectMeta(name=name),
        status=V1NodeStatus(
            allocatable={"cpu": "32", **({"nvidia.com/gpu": gpus} if gpus else {})},
            conditions=[V1NodeCondition(type="Ready", status=ready)],
        ),
    )


def pod(
    name: str,
    component: str,
    *,
    node_name: str = "gpu-a",
    gpus: int = 0,
    ready: bool = True,
    phase: str = "Running",
    restarts: int = 0,
) -> V1Pod:
    limits = {"nvidia.com/gpu": str(gpus)} if gpus else None
    return V1Pod(
        metadata=V1ObjectMeta(
            name=name, labels={"app.kubernetes.io/name": "tokenmill", COMPONENT_LABEL: component}
        ),
        spec=V1PodSpec(
            node_name=node_name,
            containers=[V1Container(name="c", resources=V1ResourceRequirements(limits=limits))],
        ),
        status=V1PodStatus(
            phase=phase,
            conditions=[V1PodCondition(type="Ready", status="True" if ready else "False")],
            container_statuses=[
                V1ContainerStatus(name="c", image="i", image_id="", ready=ready, restart_count=restarts)
            ],
        ),
    )


class SimulatedCore:
    """The three CoreV1Api calls the status makes."""

    def __init__(self) -> None:
        self.pods = [
            pod("tokenmill-inference-0", "inference", gpus=1),
            pod("tokenmill-inference-1", "inference", node_name="gpu-b", gpus=1, ready=False, restarts=2),
            pod("tokenmill-router-0", "router", node_name="cpu-a"),
            pod("tm-train-job1-a1-0-x", "train-worker", gpus=4),
            pod("tm-train-job1-a1-1-x", "train-worker", node_name="", ready=False, phase="Pending"),
        ]
        self.others = [pod("someone-else", "x", node_name="gpu-b", gpus=2)]

    def list_node(self, **kw: object) -> V1NodeList:
        return V1NodeList(
            items=[node("gpu-b", "8"), node("gpu-a", "8"), node("cpu-a", None), node("gpu-c", "4", "False")]
        )

    def list_pod_for_all_namespaces(self, field_selector: str = "", **kw: object) -> V1PodList:
        assert "status.phase!=Succeeded" in field_selector  # finished pods hold no GPU
        return V1PodList(items=self.pods + self.others)

    def list_namespaced_pod(self, namespace: str, label_selector: str = "", **kw: object) -> V1PodList:
        assert (namespace, label_selector) == ("ml", "app.kubernetes.io/name=tokenmill")
        return V1PodList(items=self.pods)


def test_simulated_api_table_shows_gpu_use_and_component_readiness():
    lines = cluster.cluster_lines(SimulatedCore(), "ml", "app.kubernetes.io/name=tokenmill")
    rows = {
        line.split()[0]: line.split()[1:]
        for line in lines
        if line and not line.startswith(("gpu node", "component"))
    }
    assert rows["gpu-a"] == ["yes", "8", "5"]  # 1 inference + 4 train worker GPUs
    assert rows["gpu-b"] == ["yes", "8", "3"]  # other namespaces' GPU pods count too
    assert rows["gpu-c"] == ["no", "4", "0"]
    assert "cpu-a" not in rows
    assert rows["inference"] == ["1/2", "2", "2", "running"]
    assert rows["router"] == ["1/1", "0", "1", "running"]
    assert rows["train-worker"] == ["1/2", "0", "1", "pending,", "1", "running"]


def test_simulated_api_without_gpu_nodes_says_what_to_install():
    core = SimulatedCore()
    core.list_node = lambda **kw: V1NodeList(items=[node("cpu-a", None)])  # type: ignore[method-assign]
    lines = cluster.cluster_lines(core, "ml", "app.kubernetes.io/name=tokenmill")
    assert "(no node offers nvidia.com/gpu: install the device plugin or GPU operator)" in lines


def test_backlog_and_live_replicas_from_redis(redis_client):
    queue = JobQueue(redis_client)
    for i in range(3):
        queue.submit("train", {"i": i})
    for i in range(2):
        redis_client.xadd(cluster.REQUESTS_PREFIX + "llama", {"r": str(i)})
    redis_client.xadd(cluster.REQUESTS_PREFIX + "qwen", {"r": "0"})
    now = time.time()
    beats = {
        "r1": ("llama:3", now - 1),
        "r2": ("llama:3", now - 2),
        "r3": ("qwen:1", now - 2.5),
        "old": ("qwen:1", now - 600),
    }
    for rid, (model, t) in beats.items():
        redis_client.hset(
            cluster.REPLICAS_HASH, rid, json.dumps({"replica_id": rid, "model": model, "time": t})
        )
    redis_client.hset(cluster.REPLICAS_HASH, "garbled", "not json")
    lines = cluster.redis_lines(redis_client, ("ingest", "train"))
    assert "train                             3        0         0" in lines
    assert "inference requests llama          2" in lines and "inference requests qwen           1" in lines
    assert "live replicas: 3" in lines
    assert "  llama:3                         2" in lines and "  qwen:1                          1" in lines
