"""The Kubernetes objects the `kubernetes` backend creates for one attempt, and its client seam.

Plain dicts (the client accepts them as request bodies) so they validate against the Kubernetes
schemas without a cluster. One attempt = an Indexed Job of N worker pods (rank = completion index)
plus a headless Service whose DNS names the rendezvous: ``<job>-0.<svc>`` is rank 0. The Job has
``backoffLimit: 0``: a failed pod fails the attempt, and the job system retries it from the last
checkpoint (one retry policy, not two). ``RBAC_RULES`` is exactly what the backend calls; the chart
grants the same rules to the trainer's ServiceAccount.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.common.config import TrainerKubernetesConfig
from tokenmill.common.errors import FailedPrecondition

WORKER_MODULE = "tokenmill.common.trainer.backends.kubernetes"
EVENT_PREFIX = "@@tokenmill-event "  # a worker's report on its stdout, read back through pods/log
COMPONENT_LABEL = "app.kubernetes.io/component"
JOB_LABEL = "tokenmill.io/train-job"
RUN_LABEL = "tokenmill.io/train-run"
INDEX_KEY = "batch.kubernetes.io/job-completion-index"  # annotation (and label) on each Job pod

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

RBAC_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "watch", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["create", "get", "delete"]},
]


@dataclass(frozen=True)
class Owner:
    """The trainer pod (downward API: POD_NAME, POD_UID): deleting it garbage-collects the Job."""

    name: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid}


@dataclass(frozen=True)
class Attempt:
    """What one attempt's manifests depend on besides the settings."""

    name: str  # the Job's and the Service's name (a DNS-1035 label)
    run: str  # the train job's id: every attempt's objects carry it
    namespace: str
    image: str
    workers: int
    train_config: dict[str, Any]
    io_spec: dict[str, Any]
    io_factory: str
    data_dir: str = ""  # where `data_claim` is mounted (the service's data_dir)
    owner: Owner | None = None


def _dns_label(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "adhoc"


def attempt_name(run_id: str, attempt: int) -> str:
    """``tm-train-<run>-a<attempt>``, cut to fit pod hostnames (63 chars with ``-<index>``)."""
    run = _dns_label(run_id)
    suffix = f"-a{attempt}"
    return f"tm-train-{run}"[: 52 - len(suffix)].rstrip("-") + suffix


def labels(a: Attempt) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "tokenmill",
        COMPONENT_LABEL: "train-worker",
        "app.kubernetes.io/managed-by": "tokenmill-trainer",
        JOB_LABEL: a.name,
        RUN_LABEL: _dns_label(a.run)[:63].rstrip("-"),
    }


def pod_selector(a: Attempt) -> str:
    return f"{JOB_LABEL}={a.name}"


def _metadata(a: Attempt) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": a.name, "namespace": a.namespace, "labels": labels(a)}
    if a.owner is not None:
        meta["ownerReferences"] = [a.owner.reference()]
    return meta


def headless_service(a: Attempt, s: TrainerKubernetesConfig) -> dict[str, Any]:
    """DNS for the rendezvous; published before pods are ready so rank 0 is found while starting."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(a),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {JOB_LABEL: a.name},
            "ports": [{"name": "rendezvous", "port": s.master_port, "targetPort": s.master_port}],
        },
    }


def _env(a: Attempt, s: TrainerKubernetesConfig) -> list[dict[str, Any]]:
    io_spec = {k: v for k, v in a.io_spec.items() if k != "token"}  # the token comes from a Secret
    env: list[dict[str, Any]] = [
        {"name": "LOCAL_RANK", "value": "0"},  # RANK = JOB_COMPLETION_INDEX, set by the worker
        {"name": "WORLD_SIZE", "value": str(a.workers)},
        {"name": "MASTER_ADDR", "value": f"{a.name}-0.{a.name}"},
        {"name": "MASTER_PORT", "value": str(s.master_port)},
        {"name": "TOKENMILL_TRAIN_CONFIG", "value": json.dumps(a.train_config)},
        {"name": "TOKENMILL_TRAIN_IO_SPEC", "value": json.dumps(io_spec)},
        {"name": "TOKENMILL_TRAIN_IO_FACTORY", "value": a.io_factory},
        {"name": "HOME", "value": "/tmp"},
    ]
    if s.token_secret:
        ref = {"name": s.token_secret, "key": s.token_secret_key}
        env.append({"name": "TOKENMILL_TRAIN_TOKEN", "valueFrom": {"secretKeyRef": ref}})
    return env


def _container(a: Attempt, s: TrainerKubernetesConfig) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "worker",
        "image": a.image,
        "command": ["python", "-m", WORKER_MODULE],
        "env": _env(a, s),
        "ports": [{"name": "rendezvous", "containerPort": s.master_port}],
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, {"name": "shm", "mountPath": "/dev/shm"}],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if s.gpus_per_worker:
        container["resources"] = {"limits": {s.gpu_resource: s.gpus_per_worker}}
    if s.data_claim and a.data_dir:
        container["volumeMounts"].append({"name": "data", "mountPath": a.data_dir})
    return container


def _pod_spec(a: Attempt, s: TrainerKubernetesConfig) -> dict[str, Any]:
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {}},
        {"name": "shm", "emptyDir": {"medium": "Memory"}},  # NCCL/gloo need more than 64 MiB of shm
    ]
    if s.data_claim and a.data_dir:
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": s.data_claim}})
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": a.name,  # hostname <job>-<index> resolves as <job>-<index>.<svc>
        "terminationGracePeriodSeconds": s.termination_grace_seconds,
        "containers": [_container(a, s)],
        "volumes": volumes,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,  # the images' USER
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if s.gpus_per_worker:
        spec["nodeSelector"] = dict(s.node_selector)
        spec["tolerations"] = [dict(t) for t in s.tolerations]
    if s.service_account:
        spec["serviceAccountName"] = s.service_account
    return spec


def indexed_job(a: Attempt, s: TrainerKubernetesConfig) -> dict[str, Any]:
    """N worker pods, rank = completion index; no Job-level retries (the job system owns them)."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(a),
        "spec": {
            "completionMode": "Indexed",
            "completions": a.workers,
            "parallelism": a.workers,
            "backoffLimit": 0,
            "template": {"metadata": {"labels": labels(a)}, "spec": _pod_spec(a, s)},
        },
    }


def worker_role(name: str, namespace: str) -> dict[str, Any]:
    """The least-privilege Role the trainer's ServiceAccount needs for this backend."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": namespace},
        "rules": [dict(r) for r in RBAC_RULES],
    }


# ------------------------------------------------------------------------------------------ the client
@dataclass
class KubeClients:
    """The API surface the backend uses: ``CoreV1Api``, ``BatchV1Api`` and ``watch.Watch``."""

    core: Any
    batch: Any
    watch: Callable[[], Any]
    where: str = ""  # "in-cluster" or the kube context's name, for messages
    namespace: str = ""  # this pod's namespace, or the kube context's


def connect(retries: int | None = None) -> KubeClients:
    """In-cluster config, else the current kube context; FailedPrecondition when neither exists.
    ``retries``: connection retries per call (None = the client's default, with back-off)."""
    try:
        from kubernetes import client, config, watch
    except ImportError as exc:
        raise FailedPrecondition(
            "the kubernetes backend needs its client: pip install 'kubernetes>=30'"
        ) from exc
    try:
        config.load_incluster_config()
        where, namespace = "in-cluster", Path(SERVICE_ACCOUNT_NAMESPACE).read_text().strip()
    except config.ConfigException:
        kubeconfig = os.environ.get("KUBECONFIG") or None  # read now: the client reads it at import
        try:
            config.load_kube_config(config_file=kubeconfig)
            context = config.list_kube_config_contexts(config_file=kubeconfig)[1]
            where, namespace = context["name"], context.get("context", {}).get("namespace", "")
        except (config.ConfigException, OSError, TypeError, KeyError) as exc:
            raise FailedPrecondition(
                f"no Kubernetes cluster configured (not in a pod, no usable kubeconfig: {exc})"
            ) from None
    configuration = client.Configuration.get_default_copy()
    if retries is not None:
        configuration.retries = retries
    api = client.ApiClient(configuration)
    return KubeClients(
        client.CoreV1Api(api), client.BatchV1Api(api), watch.Watch, where, namespace or "default"
    )


def api_status(exc: BaseException) -> int:
    """The HTTP status of a client ApiException (0 for anything else, e.g. a connection error)."""
    return int(getattr(exc, "status", 0) or 0)
