"""`kubernetes` backend: one attempt = an Indexed Job of N worker pods + a headless Service.

The trainer service creates them (k8s_manifests.py), watches the pods and follows rank 0's log, where
the worker prints its reports (``EVENT_PREFIX`` lines). Any pod failure fails the attempt with a
message a person can act on (OOM kill, eviction, an image that cannot be pulled, pods the scheduler
cannot place for ``unschedulable_timeout_seconds``), raised as :class:`WorkerFailed` so the job
system retries it from the run's last checkpoint. Cancel and finish delete the Job and Service
(foreground), and owner references to the trainer pod clean up after a trainer that died.

The client is imported lazily (the engine stays importable without it), and every API call goes
through :class:`KubeClients`, the seam tests fill with a simulated API server. Run as a module, this
file is the worker pods' entry point.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tokenmill.common.config import TrainerKubernetesConfig
from tokenmill.common.errors import FailedPrecondition
from tokenmill.common.trainer.backends import k8s_manifests as m
from tokenmill.common.trainer.backends.k8s_manifests import KubeClients, api_status, connect
from tokenmill.common.trainer.backends.local import WorkerFailed
from tokenmill.common.trainer.config import TrainConfig

Event = tuple[str, dict[str, Any]]
WATCH_TIMEOUT_S = 60  # the pod watch is re-listed this often (also bounds its thread at close)
RESULT_WAIT_S = 30.0  # after every pod succeeded, how long rank 0's log may lag behind


def parse_event(line: str) -> Event | None:
    """A worker's report from one log line; None for any other output."""
    if not line.startswith(m.EVENT_PREFIX):
        return None
    try:
        doc = json.loads(line[len(m.EVENT_PREFIX) :])
        return str(doc["kind"]), dict(doc["data"])
    except (ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------------------------ pod verdicts
STUCK_WAITING = {  # container waiting reasons that do not fix themselves -> the stuck-state key
    "ErrImagePull": "image",
    "ImagePullBackOff": "image",
    "InvalidImageName": "image",
    "CreateContainerConfigError": "config",
    "CreateContainerError": "config",
}


def pod_index(pod: Any) -> int:
    meta = pod.metadata
    value = (meta.annotations or {}).get(m.INDEX_KEY) or (meta.labels or {}).get(m.INDEX_KEY, "-1")
    return int(value)


def _who(pod: Any) -> str:
    node = f" on node {pod.spec.node_name}" if pod.spec and pod.spec.node_name else ""
    return f"worker {pod_index(pod)} (pod {pod.metadata.name}{node})"


def _terminated(pod: Any) -> Any:
    for cs in pod.status.container_statuses or []:
        if cs.state is not None and cs.state.terminated is not None:
            return cs.state.terminated
    return None


def failed_message(pod: Any) -> str | None:
    """Why a Failed pod failed, in words a person can act on; None when it has not failed."""
    st = pod.status
    if st.phase != "Failed":
        return None
    if st.reason == "Evicted":
        return f"{_who(pod)} was evicted: {st.message}"
    term = _terminated(pod)
    if term is not None and term.reason == "OOMKilled":
        return (
            f"{_who(pod)} was OOM-killed (exit {term.exit_code}): give the workers more memory "
            "or lower micro_batch_size / seq_len"
        )
    if term is not None:
        why = ": ".join(x for x in (term.reason, term.message) if x)
        return f"{_who(pod)} exited with code {term.exit_code}" + (f" ({why})" if why else "")
    return f"{_who(pod)} failed: {st.reason or 'no reason given'}: {st.message or ''}".rstrip(": ")


def stuck_states(pod: Any) -> dict[str, str]:
    """A Pending pod's states that need a person: ``Unschedulable`` (the scheduler's message),
    ``image`` / ``config`` (the kubelet's waiting reason and message)."""
    st = pod.status
    if st.phase != "Pending":
        return {}
    out: dict[str, str] = {}
    for c in st.conditions or []:
        if c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable":
            out["Unschedulable"] = c.message or "no node fits"
    for cs in st.container_statuses or []:
        waiting = cs.state.waiting if cs.state is not None else None
        if waiting is not None and waiting.reason in STUCK_WAITING:
            out[STUCK_WAITING[waiting.reason]] = f"{waiting.reason}: {waiting.message or ''}".rstrip(": ")
    return out


class PodTracker:
    """The attempt's pods as the watch last saw them, and the verdict on them."""

    def __init__(self, workers: int, settings: TrainerKubernetesConfig):
        self.workers, self.settings = workers, settings
        self.pods: dict[str, Any] = {}
        self.deleted: set[str] = set()
        self.stuck_since: dict[tuple[str, str], float] = {}

    def observe(self, event_type: str, pod: Any, now: float) -> None:
        name = pod.metadata.name
        self.pods[name] = pod
        if event_type == "DELETED":
            self.deleted.add(name)
        states = stuck_states(pod)
        for key in [k for k in self.stuck_since if k[0] == name and k[1] not in states]:
            del self.stuck_since[key]
        for state in states:
            self.stuck_since.setdefault((name, state), now)

    def failure(self, now: float) -> tuple[str, str] | None:
        """(pod, message) of the first pod that fails the attempt, or None."""
        for name, pod in self.pods.items():
            message = failed_message(pod)
            if message:
                return name, message
            if name in self.deleted and pod.status.phase != "Succeeded":
                return (
                    name,
                    f"{_who(pod)} was deleted before it finished (node drained, preempted or by hand)",
                )
        for (name, state), since in self.stuck_since.items():
            s = self.settings
            limit = (
                s.unschedulable_timeout_seconds if state == "Unschedulable" else s.image_pull_timeout_seconds
            )
            if now - since >= limit:
                return name, self._stuck_message(name, state, now - since)
        return None

    def _stuck_message(self, name: str, state: str, waited: float) -> str:
        pod, why = self.pods[name], stuck_states(self.pods[name])[state]
        if state == "Unschedulable":
            return (
                f"{_who(pod)} could not be scheduled for {waited:.0f}s: {why}. Add GPU nodes (a cluster "
                "autoscaler adds them for pending pods) or lower workers / trainer.kubernetes.gpus_per_worker"
            )
        if state == "image":
            return f"{_who(pod)} could not pull its image for {waited:.0f}s ({why}); check trainer.kubernetes.image"
        return f"{_who(pod)} could not start its container for {waited:.0f}s ({why})"

    def succeeded(self) -> bool:
        done = {pod_index(p) for p in self.pods.values() if p.status.phase == "Succeeded"}
        return len(done) >= self.workers

    def rank0_started(self) -> str | None:
        """Rank 0's pod once its container has started (its log can be read), else None."""
        for name, pod in self.pods.items():
            started = pod.status.phase in ("Running", "Succeeded", "Failed")
            if pod_index(pod) == 0 and started:
                return name
        return None

    def summary(self) -> str:
        phases: dict[str, int] = {}
        for pod in self.pods.values():
            phases[pod.status.phase or "Unknown"] = phases.get(pod.status.phase or "Unknown", 0) + 1
        text = ", ".join(f"{n} {phase.lower()}" for phase, n in sorted(phases.items()))
        reasons = {why for pod in self.pods.values() for why in stuck_states(pod).values()}
        return text + (f" ({'; '.join(sorted(reasons))})" if reasons else "")


# ------------------------------------------------------------------------------------- the session
@dataclass
class _Session:
    """One attempt's objects on the cluster and the threads that watch them."""

    clients: KubeClients
    attempt: m.Attempt
    settings: TrainerKubernetesConfig
    on_event: Callable[[str, dict[str, Any]], None]
    clock: Callable[[], float]
    inbox: queue.Queue = field(default_factory=queue.Queue)
    closed: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    log_done: bool = False
    _log_started: bool = False
    _summary: str = ""

    def __post_init__(self) -> None:
        self.tracker = PodTracker(self.attempt.workers, self.settings)

    # -- lifecycle
    def create(self) -> None:
        ns = self.attempt.namespace
        try:
            self._reap_stale()
            self.clients.batch.create_namespaced_job(ns, m.indexed_job(self.attempt, self.settings))
            self.clients.core.create_namespaced_service(ns, m.headless_service(self.attempt, self.settings))
        except Exception as exc:
            if api_status(exc) == 403:
                raise FailedPrecondition(
                    f"the trainer may not manage Jobs/Services in namespace {ns!r}: grant its ServiceAccount "
                    "the kubernetes backend's Role (the chart does when trainer.backend is kubernetes)"
                ) from None
            why = f"HTTP {api_status(exc)} {exc.reason}" if api_status(exc) else str(exc)  # type: ignore[attr-defined]
            raise WorkerFailed(f"could not create the worker Job {self.attempt.name}: {why}") from None
        threading.Thread(target=self._watch_pods, name="k8s-pod-watch", daemon=True).start()

    def _reap_stale(self) -> None:
        """Jobs of earlier attempts of this run (a restarted trainer container leaves them running)."""
        ns, run = self.attempt.namespace, m.labels(self.attempt)[m.RUN_LABEL]
        jobs = self.clients.batch.list_namespaced_job(ns, label_selector=f"{m.RUN_LABEL}={run}")
        for job in jobs.items:
            if job.metadata.name != self.attempt.name:
                self.on_event(
                    "log", {"message": f"deleting worker Job {job.metadata.name} of an earlier attempt"}
                )
                self._delete(job.metadata.name)

    def delete(self) -> None:
        self.closed.set()
        self._delete(self.attempt.name)

    def _delete(self, name: str) -> None:
        ns = self.attempt.namespace
        for call in (self.clients.batch.delete_namespaced_job, self.clients.core.delete_namespaced_service):
            try:
                call(name, ns, propagation_policy="Foreground")
            except Exception as exc:
                if api_status(exc) != 404:
                    self.on_event("log", {"message": f"could not delete {name}: {exc}; delete it by hand"})

    # -- threads feeding the inbox
    def _watch_pods(self) -> None:
        core, ns, selector = self.clients.core, self.attempt.namespace, m.pod_selector(self.attempt)
        while not self.closed.is_set():
            try:
                listed = core.list_namespaced_pod(ns, label_selector=selector)
                for pod in listed.items:
                    self.inbox.put(("pod", "ADDED", (pod, self.clock())))
                stream = self.clients.watch().stream(
                    core.list_namespaced_pod,
                    ns,
                    label_selector=selector,
                    resource_version=listed.metadata.resource_version,
                    timeout_seconds=WATCH_TIMEOUT_S,
                )
                for ev in stream:
                    if self.closed.is_set():
                        return
                    self.inbox.put(("pod", ev["type"], (ev["object"], self.clock())))  # when seen
            except Exception as exc:  # API server away or 410 Gone: re-list after a pause
                if not self.closed.is_set():
                    self.inbox.put(("note", f"pod watch interrupted ({exc}); re-listing", None))
                    self.closed.wait(2.0)

    def _follow_log(self, pod: str) -> None:
        try:
            lines: Iterable[str] = self.clients.watch().stream(
                self.clients.core.read_namespaced_pod_log, pod, self.attempt.namespace, container="worker"
            )
            for line in lines:
                event = parse_event(line)
                if event is not None:
                    self.inbox.put(("report", event[0], event[1]))
        except Exception as exc:
            self.inbox.put(("note", f"lost rank 0's log ({exc}); its result is read when it ends", None))
        finally:
            self.inbox.put(("log_end", "", None))

    # -- the loop
    def supervise(self, should_stop: Callable[[], bool], poll_s: float) -> dict[str, Any]:
        result_deadline: float | None = None
        while True:
            if should_stop():
                return self._cancel(poll_s)
            self._drain(poll_s)
            if self.error is not None:
                from tokenmill.common.trainer.errors_wire import error_from_wire

                raise error_from_wire(self.error)
            failure = self.tracker.failure(self.clock())
            if failure is not None:
                self._raise_failure(*failure)
            if not self.tracker.succeeded():
                continue
            if self.result is not None:
                return self.result
            result_deadline = result_deadline or self.clock() + RESULT_WAIT_S
            if self.log_done or self.clock() >= result_deadline:
                return self._result_from_full_log()

    def _drain(self, poll_s: float) -> None:
        try:
            item = self.inbox.get(timeout=poll_s)
        except queue.Empty:
            return
        while True:
            self._handle(*item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, a: Any, b: Any) -> None:
        if kind == "pod":
            self.tracker.observe(a, *b)
            self._maybe_follow()
            summary = self.tracker.summary()
            if summary != self._summary:
                self._summary = summary
                self.on_event("log", {"message": f"worker pods of {self.attempt.name}: {summary}"})
        elif kind == "report":
            if a == "result":
                self.result = b
            elif a == "error":
                self.error = self.error or b
            else:
                self.on_event(a, b)
        elif kind == "log_end":
            self.log_done = True
        elif kind == "note":
            self.on_event("log", {"message": a})

    def _maybe_follow(self) -> None:
        pod = self.tracker.rank0_started()
        if pod and not self._log_started:
            self._log_started = True
            threading.Thread(target=self._follow_log, args=(pod,), name="k8s-rank0-log", daemon=True).start()

    def _read_log(self, pod: str, tail: int | None = None) -> list[Event]:
        kw: dict[str, Any] = {"container": "worker"}
        if tail:
            kw["tail_lines"] = tail
        try:
            text = self.clients.core.read_namespaced_pod_log(pod, self.attempt.namespace, **kw)
        except Exception:  # a pod that never started has no log
            return []
        return [e for e in map(parse_event, str(text).splitlines()) if e is not None]

    def _raise_failure(self, pod: str, message: str) -> None:
        """The worker's own error when its log has one (precise, may be non-retryable), else ours."""
        errors = [data for kind, data in self._read_log(pod, tail=200) if kind == "error"]
        if errors:
            from tokenmill.common.trainer.errors_wire import error_from_wire

            raise error_from_wire(errors[-1])
        raise WorkerFailed(f"{message}; the job resumes from its last checkpoint")

    def _result_from_full_log(self) -> dict[str, Any]:
        pod = self.tracker.rank0_started() or ""
        results = [data for kind, data in self._read_log(pod) if kind == "result"]
        if not results:
            raise WorkerFailed(
                f"every worker of {self.attempt.name} finished but rank 0 reported no result; "
                "the job resumes from its last checkpoint"
            )
        return results[-1]

    def _cancel(self, poll_s: float) -> dict[str, Any]:
        """Delete the Job (SIGTERM: the workers checkpoint and stop), then wait for rank 0's result."""
        self._delete(self.attempt.name)
        deadline = self.clock() + self.settings.termination_grace_seconds + 10
        while self._log_started and not self.log_done and self.result is None and self.clock() < deadline:
            self._drain(poll_s)
        if self.result is not None:
            return self.result
        return {"status": "cancelled", "reason": "cancelled; the worker pods were deleted", "checkpoint": ""}


# ------------------------------------------------------------------------------------- the backend
def _own_pod(clients: KubeClients, namespace: str) -> tuple[m.Owner | None, str]:
    """(owner reference, image) of the trainer pod, from the downward API; (None, "") outside one."""
    name, uid = os.environ.get("POD_NAME", ""), os.environ.get("POD_UID", "")
    if not name:
        return None, ""
    pod = clients.core.read_namespaced_pod(name, namespace)
    return m.Owner(name, uid or pod.metadata.uid), pod.spec.containers[0].image


def _namespace(settings: TrainerKubernetesConfig, clients: KubeClients) -> str:
    return settings.namespace or os.environ.get("POD_NAMESPACE", "") or clients.namespace or "default"


def prepare(
    cfg: TrainConfig,
    io_spec: dict[str, Any],
    settings: TrainerKubernetesConfig,
    clients: KubeClients,
    *,
    io_factory: str,
    data_dir: str = "",
) -> m.Attempt:
    """The attempt's identity and everything its manifests need; fails before creating anything."""
    if io_spec.get("token") and not settings.token_secret:
        raise FailedPrecondition(
            "auth is on: set trainer.kubernetes.token_secret to the Secret holding the API token, "
            "so worker pods can reach the checkpoint service"
        )
    namespace = _namespace(settings, clients)
    owner, own_image = _own_pod(clients, namespace)
    image = settings.image or own_image
    if not image:
        raise FailedPrecondition("set trainer.kubernetes.image (the trainer is not running in a pod)")
    return m.Attempt(
        name=m.attempt_name(cfg.run_id, cfg.attempt),
        run=cfg.run_id,
        namespace=namespace,
        image=image,
        workers=cfg.workers,
        train_config=cfg.to_dict(),
        io_spec=dict(io_spec),
        io_factory=io_factory,
        data_dir=data_dir,
        owner=owner,
    )


def run_kubernetes(
    cfg: TrainConfig,
    io_spec: dict[str, Any],
    *,
    settings: TrainerKubernetesConfig,
    io_factory: str,
    on_event: Callable[[str, dict[str, Any]], None] = lambda kind, data: None,
    should_stop: Callable[[], bool] = lambda: False,
    data_dir: str = "",
    clients: KubeClients | None = None,
    poll_s: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Run one attempt as worker pods; returns rank 0's result dict. ``io_factory`` is a
    ``"module:function"`` path (the pods import it)."""
    clients = clients or connect()
    attempt = prepare(cfg, io_spec, settings, clients, io_factory=io_factory, data_dir=data_dir)
    session = _Session(clients, attempt, settings, on_event, clock)
    try:
        session.create()  # inside: a Job whose Service could not be created is deleted too
        return session.supervise(should_stop, poll_s)
    finally:
        session.delete()


# ---------------------------------------------------------------------------- the worker pod's entry
class _StdoutChannel:
    """Reports as log lines (read back through pods/log); SIGTERM (Job deleted) asks to stop."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())

    def report(self, kind: str, data: dict[str, Any]) -> None:
        print(m.EVENT_PREFIX + json.dumps({"kind": kind, "data": data}), flush=True)

    def stop_requested(self) -> bool:
        return self.stop.is_set()


def worker_main() -> int:
    """One rank: RANK from the Job's completion index, config and IO spec from the environment."""
    rank = int(os.environ.setdefault("RANK", os.environ.get("JOB_COMPLETION_INDEX", "0")))
    from tokenmill.common.trainer.checkpoint_io import resolve_io_factory
    from tokenmill.common.trainer.errors_wire import error_to_wire
    from tokenmill.common.trainer.worker import train

    channel = _StdoutChannel()
    try:
        cfg = TrainConfig.from_dict(json.loads(os.environ["TOKENMILL_TRAIN_CONFIG"]))
        io_spec = json.loads(os.environ["TOKENMILL_TRAIN_IO_SPEC"])
        tokens = os.environ.get("TOKENMILL_TRAIN_TOKEN", "").split()
        if tokens:
            io_spec["token"] = tokens[0]
        io = resolve_io_factory(os.environ["TOKENMILL_TRAIN_IO_FACTORY"])(io_spec)
        result = train(cfg, io, channel)
    except BaseException as exc:
        channel.report("error", {"rank": rank, **error_to_wire(exc)})
        return 1
    if rank == 0:
        channel.report("result", result)
    return 0


if __name__ == "__main__":
    code = worker_main()
    sys.stdout.flush()
    os._exit(code)  # skip interpreter teardown under live gloo/NCCL threads (see local.py)
