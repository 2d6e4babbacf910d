"""The `kubernetes` trainer backend without a cluster.

Manifests validate against the Kubernetes OpenAPI schemas (kubernetes-validate, strict). The
watch / retry / cancel logic runs against a simulated API server (tests named ``simulated``): real
client model objects (V1Pod, ...) replayed as recorded watch events, injected at the backend's
client seam (`KubeClients`). Every call the backend makes is recorded and checked against the RBAC
rules the chart grants.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import threading
from contextlib import redirect_stdout
from typing import Any

import kubernetes_validate
import pytest
from kubernetes.client import (
    ApiException,
    V1Container,
    V1ContainerState,
    V1ContainerStateTerminated,
    V1ContainerStateWaiting,
    V1ContainerStatus,
    V1JobList,
    V1ListMeta,
    V1ObjectMeta,
    V1Pod,
    V1PodCondition,
    V1PodList,
    V1PodSpec,
    V1PodStatus,
)

from tokenmill.common.config import TrainerKubernetesConfig
from tokenmill.common.errors import FailedPrecondition, InvalidArgument
from tokenmill.common.trainer.backends import k8s_manifests as m
from tokenmill.common.trainer.backends.kubernetes import (
    KubeClients,
    PodTracker,
    parse_event,
    run_kubernetes,
    worker_main,
)
from tokenmill.common.trainer.backends.local import WorkerFailed
from tokenmill.common.trainer.config import TrainConfig
from tokenmill.common.trainer.errors_wire import error_from_wire

pytestmark = pytest.mark.timeout(60)  # a wrong verdict would otherwise wait forever

KUBE_VERSION = "1.35.0"
JOB = "tm-train-job1-a1"
IO_FACTORY = "tokenmill.services.trainer.io_factory:make_checkpoint_io"
SETTINGS = TrainerKubernetesConfig(image="registry.example/tokenmill-trainer:1.0")


def attempt(workers: int = 2, **kw: Any) -> m.Attempt:
    base: dict[str, Any] = dict(
        name=JOB,
        run="job1",
        namespace="ml",
        image=SETTINGS.image,
        workers=workers,
        train_config=TrainConfig(workers=workers, dataset_path="/data/ds").to_dict(),
        io_spec={"kind": "store", "address": "tokenmill-checkpoint:50053", "token": "secret"},
        io_factory=IO_FACTORY,
        data_dir="/data",
        owner=m.Owner("tokenmill-trainer-7d9f", "0f7c2a4e-1111-2222-3333-444455556666"),
    )
    return m.Attempt(**(base | kw))


def validate(doc: dict) -> None:
    try:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{doc['kind']}: {exc.message} at {list(exc.path)}")


# ------------------------------------------------------------------------------------------ manifests
def test_indexed_job_validates_and_carries_gpu_placement():
    settings = SETTINGS.model_copy(update={"data_claim": "tokenmill-data", "token_secret": "tokenmill-auth"})
    job = m.indexed_job(attempt(workers=4), settings)
    validate(job)
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == (
        "Indexed",
        4,
        4,
        0,
    )
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    worker = pod["containers"][0]
    assert worker["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert worker["command"] == ["python", "-m", "tokenmill.common.trainer.backends.kubernetes"]
    env = {e["name"]: e for e in worker["env"]}
    assert env["MASTER_ADDR"]["value"] == f"{JOB}-0.{JOB}" and pod["subdomain"] == JOB
    assert env["WORLD_SIZE"]["value"] == "4"
    assert "token" not in json.loads(env["TOKENMILL_TRAIN_IO_SPEC"]["value"])  # never in the pod spec
    assert env["TOKENMILL_TRAIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "tokenmill-auth"
    assert TrainConfig.from_dict(json.loads(env["TOKENMILL_TRAIN_CONFIG"]["value"])).workers == 4
    assert {"name": "data", "mountPath": "/data"} in worker["volumeMounts"]
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"]) == ("Pod", "tokenmill-trainer-7d9f")


def test_cpu_workers_ask_for_no_gpu_and_no_gpu_nodes():
    job = m.indexed_job(attempt(), SETTINGS.model_copy(update={"gpus_per_worker": 0}))
    validate(job)
    pod = job["spec"]["template"]["spec"]
    assert "resources" not in pod["containers"][0] and "nodeSelector" not in pod


def test_headless_service_and_role_validate():
    svc = m.headless_service(attempt(), SETTINGS)
    validate(svc)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {m.JOB_LABEL: JOB}
    validate(m.worker_role("tokenmill-trainer-workers", "ml"))


@pytest.mark.parametrize("run_id", ["job1", "J0B_with.odd/chars", "x" * 200, "---"])
def test_attempt_names_are_dns_labels_that_fit_pod_hostnames(run_id):
    name = m.attempt_name(run_id, 12)
    assert len(f"{name}-1023") <= 63 and name.endswith("-a12")
    validate(m.headless_service(attempt(name=name, run=run_id), SETTINGS))


# ---------------------------------------------------------------------------- simulated API server
WAIT_FOR_DELETE = object()  # in a log script: the rest is written once the Job is deleted (SIGTERM)


def pod(index: int, phase: str, **status: Any) -> V1Pod:
    """A worker pod as the API server reports it; status keys: reason, message, unschedulable,
    waiting=(reason, message), terminated=(exit_code, reason)."""
    state = V1ContainerState()
    if "waiting" in status:
        reason, message = status["waiting"]
        state.waiting = V1ContainerStateWaiting(reason=reason, message=message)
    if "terminated" in status:
        code, reason = status["terminated"]
        state.terminated = V1ContainerStateTerminated(exit_code=code, reason=reason)
    conditions = None
    if "unschedulable" in status:
        conditions = [
            V1PodCondition(
                type="PodScheduled", status="False", reason="Unschedulable", message=status["unschedulable"]
            )
        ]
    return V1Pod(
        metadata=V1ObjectMeta(name=f"{JOB}-{index}-x7k2p", annotations={m.INDEX_KEY: str(index)}),
        spec=V1PodSpec(containers=[V1Container(name="worker", image=SETTINGS.image)], node_name="gpu-a"),
        status=V1PodStatus(
            phase=phase,
            reason=status.get("reason"),
            message=status.get("message"),
            conditions=conditions,
            container_statuses=[
                V1ContainerStatus(
                    name="worker",
                    image=SETTINGS.image,
                    image_id="",
                    ready=False,
                    restart_count=0,
                    state=state,
                )
            ],
        ),
    )


def line(kind: str, data: dict[str, Any]) -> str:
    return m.EVENT_PREFIX + json.dumps({"kind": kind, "data": data})


RESULT = {
    "status": "completed",
    "reason": "",
    "checkpoint": "model:3",
    "step": 10,
    "final_loss": 2.0,
    "val_loss": None,
    "parameters": 1,
    "trainable_parameters": 1,
    "workers": 2,
    "history": [],
}


class SimulatedApi:
    """Core, batch and watch in one: replays pod events (with the time they happened) and logs."""

    def __init__(self, events: list[tuple[float, str, V1Pod]], logs: dict[int, list[Any]] | None = None):
        self.events, self.logs = events, logs or {}
        self.calls: list[tuple[str, str]] = []  # (how: call|watch, method)
        self.now = 0.0
        self.deleted = threading.Event()
        self.create_error: ApiException | None = None
        self.service_error: ApiException | None = None
        self.delete_kwargs: list[dict[str, Any]] = []
        self.jobs: list[dict] = []

    def clients(self) -> KubeClients:
        return KubeClients(core=self, batch=self, watch=lambda: self, where="simulated")

    def clock(self) -> float:
        return self.now

    # BatchV1Api / CoreV1Api
    def create_namespaced_job(self, namespace: str, body: dict) -> Any:
        self.calls.append(("call", "create_namespaced_job"))
        if self.create_error:
            raise self.create_error
        self.jobs.append(body)
        return body

    def create_namespaced_service(self, namespace: str, body: dict) -> Any:
        self.calls.append(("call", "create_namespaced_service"))
        if self.service_error:
            raise self.service_error
        return body

    def list_namespaced_job(self, namespace: str, label_selector: str = "") -> V1JobList:
        self.calls.append(("call", "list_namespaced_job"))
        return V1JobList(items=[])

    def list_namespaced_pod(self, namespace: str, label_selector: str = "", **kw: Any) -> V1PodList:
        self.calls.append(("call", "list_namespaced_pod"))
        assert label_selector == f"{m.JOB_LABEL}={JOB}"
        return V1PodList(items=[], metadata=V1ListMeta(resource_version="1"))

    def read_namespaced_pod(self, name: str, namespace: str) -> V1Pod:
        self.calls.append(("call", "read_namespaced_pod"))
        return pod(0, "Running")

    def read_namespaced_pod_log(self, name: str, namespace: str, **kw: Any) -> str:
        self.calls.append(("call", "read_namespaced_pod_log"))
        return "\n".join(x for x in self.logs.get(int(name.split("-")[-2]), []) if isinstance(x, str))

    def delete_namespaced_job(self, name: str, namespace: str, **kw: Any) -> None:
        self.calls.append(("call", "delete_namespaced_job"))
        self.delete_kwargs.append(kw)
        self.deleted.set()

    def delete_namespaced_service(self, name: str, namespace: str, **kw: Any) -> None:
        self.calls.append(("call", "delete_namespaced_service"))
        self.delete_kwargs.append(kw)

    # watch.Watch
    def stream(self, func: Any, *args: Any, **kw: Any) -> Any:
        self.calls.append(("watch", func.__name__))
        if func.__name__ == "read_namespaced_pod_log":
            yield from self._log(int(args[0].split("-")[-2]))
            return
        for t, kind, obj in self.events:
            self.now = t
            yield {"type": kind, "object": obj}
        self.events = []
        self.deleted.wait(5)

    def _log(self, index: int) -> Any:
        for item in self.logs.get(index, []):
            if item is WAIT_FOR_DELETE:
                self.deleted.wait(5)
            else:
                yield item


def run(
    api: SimulatedApi, seen: list[tuple[str, dict]] | None = None, **kw: Any
) -> tuple[dict[str, Any], list[tuple[str, dict]]]:
    seen = [] if seen is None else seen
    cfg = TrainConfig(workers=2, dataset_path="/data/ds", run_id="job1", attempt=1)
    result = run_kubernetes(
        cfg,
        {"kind": "store", "address": "tokenmill-checkpoint:50053", "token": ""},
        settings=kw.pop("settings", SETTINGS),
        io_factory=IO_FACTORY,
        on_event=lambda kind, data: seen.append((kind, data)),
        clients=api.clients(),
        poll_s=0.01,
        clock=api.clock,
        **kw,
    )
    return result, seen


SUCCESS: tuple[list, dict] = (
    [
        (
            0,
            "ADDED",
            pod(0, "Pending", unschedulable="0/3 nodes are available: 3 Insufficient nvidia.com/gpu."),
        ),
        (1, "ADDED", pod(1, "Pending")),
        (60, "MODIFIED", pod(0, "Running")),
        (61, "MODIFIED", pod(1, "Running")),
        (90, "MODIFIED", pod(1, "Succeeded")),
        (91, "MODIFIED", pod(0, "Succeeded")),
    ],
    {0: ["plain log output", line("progress", {"step": 5, "loss": 2.5}), line("result", RESULT)]},
)
WORKER_ERROR: tuple[list, dict] = (
    [(0, "ADDED", pod(0, "Running")), (1, "ADDED", pod(1, "Failed", terminated=(1, "Error")))],
    {
        1: [
            "Traceback ...",
            line("error", {"rank": 1, "class": "InvalidArgument", "message": "dataset /data/ds not found"}),
        ]
    },
)


def test_simulated_success_reports_progress_returns_result_and_deletes_job():
    api = SimulatedApi(*SUCCESS)
    result, seen = run(api)
    assert result == RESULT
    assert ("progress", {"step": 5, "loss": 2.5}) in seen
    messages = [d["message"] for k, d in seen if k == "log"]
    assert any("Insufficient nvidia.com/gpu" in msg for msg in messages)  # why pods wait, as it happens
    assert ("call", "delete_namespaced_job") in api.calls and (
        "call",
        "delete_namespaced_service",
    ) in api.calls
    assert all(kw == {"propagation_policy": "Foreground"} for kw in api.delete_kwargs)


@pytest.mark.parametrize(
    ("failed", "expected"),
    [
        (
            pod(1, "Failed", terminated=(137, "OOMKilled")),
            "worker 1 (pod tm-train-job1-a1-1-x7k2p on node gpu-a) was OOM-killed",
        ),
        (
            pod(0, "Failed", reason="Evicted", message="The node was low on resource: memory."),
            "was evicted: The node was low",
        ),
        (pod(1, "Failed", terminated=(139, "Error")), "exited with code 139 (Error)"),
    ],
)
def test_simulated_pod_failure_is_retried_with_an_actionable_message(failed, expected):
    api = SimulatedApi(
        [(0, "ADDED", pod(0, "Running")), (1, "ADDED", pod(1, "Running")), (5, "MODIFIED", failed)]
    )
    with pytest.raises(WorkerFailed, match="resumes from its last checkpoint") as info:
        run(api)
    assert expected in str(info.value)
    assert ("call", "delete_namespaced_job") in api.calls


def test_simulated_deleted_pod_fails_the_attempt():
    api = SimulatedApi(
        [(0, "ADDED", pod(0, "Running")), (1, "ADDED", pod(1, "Running")), (2, "DELETED", pod(1, "Running"))]
    )
    with pytest.raises(WorkerFailed, match="worker 1 .* was deleted before it finished"):
        run(api)


def test_simulated_unschedulable_past_timeout_names_the_scheduler_reason():
    why = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    api = SimulatedApi(
        [
            (0, "ADDED", pod(0, "Pending", unschedulable=why)),
            (901, "MODIFIED", pod(0, "Pending", unschedulable=why)),
        ]
    )
    with pytest.raises(
        WorkerFailed, match="could not be scheduled for 901s: 0/4 nodes .*Insufficient nvidia.com/gpu"
    ):
        run(api)


def test_simulated_image_pull_backoff_past_deadline_names_the_image_setting():
    waiting = ("ImagePullBackOff", 'Back-off pulling image "registry.example/tokenmill-trainer:1.0"')
    api = SimulatedApi(
        [
            (0, "ADDED", pod(1, "Pending", waiting=waiting)),
            (301, "MODIFIED", pod(1, "Pending", waiting=waiting)),
        ]
    )
    with pytest.raises(
        WorkerFailed, match="could not pull its image for 301s .*check trainer.kubernetes.image"
    ):
        run(api)


def test_tracker_forgets_a_wait_that_cleared_before_its_deadline():
    tracker = PodTracker(1, SETTINGS)
    tracker.observe("ADDED", pod(0, "Pending", unschedulable="no GPU"), 0)
    tracker.observe("MODIFIED", pod(0, "Running"), 800)
    tracker.observe("MODIFIED", pod(0, "Pending", unschedulable="no GPU"), 850)  # a new wait starts here
    assert tracker.failure(1700) is None
    assert tracker.failure(1750) is not None


def test_simulated_worker_error_in_its_log_keeps_its_class():
    """A worker that raised InvalidArgument fails the job at once (not retried): its pod log says why."""
    api = SimulatedApi(*WORKER_ERROR)
    with pytest.raises(InvalidArgument, match="worker 1: dataset /data/ds not found"):
        run(api)


def test_simulated_cancel_deletes_the_job_and_keeps_the_cancel_checkpoint():
    cancelled = RESULT | {"status": "cancelled", "reason": "cancelled", "checkpoint": "model:2"}
    api = SimulatedApi(
        [(0, "ADDED", pod(0, "Running")), (1, "ADDED", pod(1, "Running"))],
        {0: [line("progress", {"step": 1}), WAIT_FOR_DELETE, line("result", cancelled)]},
    )
    seen: list[tuple[str, dict]] = []
    result, _ = run(api, seen, should_stop=lambda: ("progress", {"step": 1}) in seen)
    assert result["status"] == "cancelled" and result["checkpoint"] == "model:2"
    assert api.delete_kwargs[0] == {"propagation_policy": "Foreground"}


def test_simulated_forbidden_create_says_which_rbac_is_missing():
    api = SimulatedApi([])
    api.create_error = ApiException(status=403, reason="Forbidden")
    with pytest.raises(FailedPrecondition, match="may not manage Jobs/Services in namespace 'default'"):
        run(api)


def test_simulated_failed_service_create_deletes_the_job_it_created():
    api = SimulatedApi([])
    api.service_error = ApiException(status=500, reason="etcdserver: request timed out")
    with pytest.raises(
        WorkerFailed,
        match="could not create the worker Job tm-train-job1-a1: HTTP 500 etcdserver: request timed out$",
    ):
        run(api)
    assert api.calls[-2:] == [("call", "delete_namespaced_job"), ("call", "delete_namespaced_service")]


def test_simulated_auth_token_without_a_secret_fails_before_creating_anything():
    api = SimulatedApi([])
    cfg = TrainConfig(workers=1, dataset_path="/d", run_id="job1")
    with pytest.raises(FailedPrecondition, match="trainer.kubernetes.token_secret"):
        run_kubernetes(
            cfg,
            {"kind": "store", "token": "t"},
            settings=SETTINGS,
            io_factory=IO_FACTORY,
            clients=api.clients(),
        )
    assert not [c for c in api.calls if c[1].startswith("create")]


def test_simulated_owner_and_image_come_from_the_trainer_pod(monkeypatch):
    monkeypatch.setenv("POD_NAME", "tokenmill-trainer-7d9f")
    monkeypatch.setenv("POD_UID", "uid-1")
    monkeypatch.setenv("POD_NAMESPACE", "ml")
    from tokenmill.common.trainer.backends.kubernetes import prepare

    a = prepare(
        TrainConfig(run_id="job1"),
        {},
        TrainerKubernetesConfig(),
        SimulatedApi([]).clients(),
        io_factory=IO_FACTORY,
    )
    assert a.owner == m.Owner("tokenmill-trainer-7d9f", "uid-1")
    assert (a.namespace, a.image) == ("ml", SETTINGS.image)


def test_kubernetes_is_a_train_config_backend():
    TrainConfig(backend="kubernetes", dataset_path="/data/ds").validate()


def test_simulated_trainer_service_launches_the_kubernetes_backend():
    from tokenmill.services.trainer.server import TrainJobHandler

    settings = SETTINGS.model_copy(update={"data_claim": "tokenmill-data"})
    handler = TrainJobHandler(None, {}, kubernetes=settings, data_dir="/srv/tokenmill")  # type: ignore[arg-type]
    api = SimulatedApi(*SUCCESS)
    cfg = TrainConfig(backend="kubernetes", workers=2, dataset_path="/d", run_id="job1")
    result = handler._backend("kubernetes")(
        cfg, {"kind": "store"}, clients=api.clients(), poll_s=0.01, clock=api.clock
    )
    assert result == RESULT
    worker = api.jobs[0]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["TOKENMILL_TRAIN_IO_FACTORY"] == IO_FACTORY  # the pods import the service's factory
    assert {"name": "data", "mountPath": "/srv/tokenmill"} in worker["volumeMounts"]


# --------------------------------------------------------------------------------------------- RBAC
def _needs(how: str, method: str) -> tuple[str, str, str]:
    """(apiGroup, resource, verb) an official-client call needs, from its name."""
    verb, _, kind = method.partition("_namespaced_")
    verb = {"read": "get"}.get(verb, verb)
    if how == "watch" and kind != "pod_log":
        verb = "watch"
    resource = {"job": "jobs", "pod": "pods", "service": "services", "pod_log": "pods/log"}[kind]
    return ("batch" if kind == "job" else ""), resource, verb


def test_simulated_rbac_rules_cover_every_call_the_backend_makes(monkeypatch):
    monkeypatch.setenv("POD_NAME", "tokenmill-trainer-7d9f")  # the owner lookup: get pods
    apis = [SimulatedApi(*SUCCESS), SimulatedApi(*WORKER_ERROR)]
    run(apis[0])
    with pytest.raises(InvalidArgument):  # a failed pod: its log is read
        run(apis[1])
    granted = {
        (g, r, v)
        for rule in m.RBAC_RULES
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    needed = {_needs(how, method) for api in apis for how, method in api.calls}
    assert needed <= granted, needed - granted
    # least privilege: nothing granted that no call uses, except get on jobs/services (kubectl-style reads)
    assert granted - needed <= {("batch", "jobs", "get"), ("batch", "jobs", "watch"), ("", "services", "get")}


# ------------------------------------------------------------------------------------- worker entry
def test_worker_entry_reports_its_error_as_a_log_line(monkeypatch):
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "3")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("TOKENMILL_TRAIN_CONFIG", json.dumps({"workers": 1, "no_such_field": 1}))
    monkeypatch.setenv("TOKENMILL_TRAIN_IO_SPEC", "{}")
    monkeypatch.setenv("TOKENMILL_TRAIN_IO_FACTORY", IO_FACTORY)
    previous = signal.getsignal(signal.SIGTERM)
    out = io.StringIO()
    try:
        with redirect_stdout(out):
            code = worker_main()
    finally:
        signal.signal(signal.SIGTERM, previous)
    events = [e for e in map(parse_event, out.getvalue().splitlines()) if e]
    assert code == 1 and events[0][0] == "error"
    err = error_from_wire(events[0][1])
    assert isinstance(
        err, InvalidArgument
    ) and "worker 3: unknown train config field(s) ['no_such_field']" in str(err)


@pytest.mark.slow  # a fresh interpreter importing torch
def test_backend_imports_without_the_kubernetes_client():
    code = "import sys; sys.modules['kubernetes'] = None; import tokenmill.common.trainer.backends.kubernetes"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
