"""TrainerService: the coordinator. Validates train requests, queues them as `train` jobs, and runs
them (a JobWorker thread) by launching the `local` or `ray` backend; progress goes to the job's
event stream, the final checkpoint to the job's artifacts. Run with `python -m tokenmill.services.trainer`.

Thin on purpose: validation lives in planner.py, training in tokenmill.common.trainer, storage in
store_io.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from google.protobuf.json_format import MessageToDict

from tokenmill.common import errors
from tokenmill.common.config import Config, TrainerConfig, TrainerKubernetesConfig
from tokenmill.common.jobs import JobCancelled, JobContext, JobQueue, JobWorker
from tokenmill.common.runtime import ServiceApp, run_service
from tokenmill.common.runtime.job_rpc import JobRpcMixin, job_to_proto
from tokenmill.services.trainer.io_factory import DOTTED as IO_FACTORY_PATH
from tokenmill.services.trainer.io_factory import make_checkpoint_io
from tokenmill.services.trainer.metrics import TrainerMetrics, register_gpu_metrics
from tokenmill.services.trainer.planner import Plan, Planner
from tokenmill.services.trainer.resume import ResumeResolver
from tokenmill.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc

JOB_TYPE = "train"
SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name
HISTORY_POINTS = 500  # loss-curve points kept in a job result


class TrainingDiverged(errors.FailedPrecondition):
    """NaN/Inf loss: the job fails at once (retrying the same config diverges again)."""


def request_to_spec(request: trainer_pb2.SubmitTrainRequest) -> dict[str, Any]:
    """The request as the job spec (proto field names; 64-bit ints arrive as strings, planner casts)."""
    return MessageToDict(request, preserving_proto_field_name=True)


class TrainerServicer(JobRpcMixin, trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, queue: JobQueue, planner: Planner, *, stopping=None):
        JobRpcMixin.__init__(self, queue, JOB_TYPE, stopping=stopping)
        self.planner = planner
        self.resumer = ResumeResolver(queue, planner.io, JOB_TYPE)

    def _spec(self, request: trainer_pb2.SubmitTrainRequest) -> tuple[dict[str, Any], list[str]]:
        """The job spec (a resume expanded into the continued run's spec) and its resume warnings."""
        spec = request_to_spec(request)
        spec.pop("idempotency_key", None)
        return self.resumer.expand(spec)

    def SubmitTrain(self, request: trainer_pb2.SubmitTrainRequest, context) -> common_pb2.Job:
        spec, _ = self._spec(request)
        self.planner.plan(spec)  # every INVALID_ARGUMENT / NOT_FOUND before anything is queued
        job = self.job_queue.submit(JOB_TYPE, spec, idempotency_key=request.idempotency_key)
        return job_to_proto(job)

    def ValidateTrain(
        self, request: trainer_pb2.SubmitTrainRequest, context
    ) -> trainer_pb2.ValidateTrainResponse:
        spec, warnings = self._spec(request)
        plan = self.planner.plan(spec)
        return trainer_pb2.ValidateTrainResponse(
            ok=True,
            parameters=plan.parameters,
            estimated_bytes_per_worker=plan.estimated_bytes_per_worker,
            flops_per_token=plan.flops_per_token,
            warnings=warnings + plan.warnings,
        )


def _downsample(history: list[dict[str, Any]], n: int = HISTORY_POINTS) -> list[dict[str, Any]]:
    """Keep at most n points (always the last), preferring points that carry a val loss."""
    if len(history) <= n:
        return history
    stride = len(history) / n
    keep = {int(i * stride) for i in range(n)} | {len(history) - 1}
    keep |= {i for i, h in enumerate(history) if "val_loss" in h}
    return [history[i] for i in sorted(keep)]


def _progress_message(d: dict[str, Any]) -> str:
    msg = f"step {d['step']}/{d['steps']} loss {d['loss']:.4f} lr {d['lr']:.2e} {d['tokens_per_s']:.0f} tok/s"
    if d.get("val_loss") is not None:
        msg += f" val {d['val_loss']:.4f}"
    if d.get("kl") is not None:  # distill
        msg += f" kl {d['kl']:.4f} ce {d['ce']:.4f} teacher_ce {d['teacher_ce']:.4f}"
    if d.get("reward_margin") is not None:  # dpo
        msg += f" margin {d['reward_margin']:.3f} acc {d['reward_accuracy']:.2f}"
    return msg


class TrainJobHandler:
    """Runs one attempt of a train job: plan, launch the backend, relay progress, record outputs."""

    def __init__(
        self,
        planner: Planner,
        io_spec: dict[str, Any],
        *,
        work_dir: str = "",
        ray_address: str = "",
        kubernetes: TrainerKubernetesConfig | None = None,
        data_dir: str = "",
        ray_start: TrainerConfig | None = None,
        metrics: TrainerMetrics | None = None,
    ):
        self.planner = planner
        self.io_spec = io_spec
        self.work_dir = work_dir
        self.ray_address = ray_address
        self.kubernetes = kubernetes or TrainerKubernetesConfig()
        self.data_dir = data_dir
        self.ray_start = ray_start or TrainerConfig()  # its ray_start_* bound the service's Ray start
        self.metrics = metrics

    def __call__(self, ctx: JobContext) -> dict[str, Any]:
        plan: Plan = self.planner.plan(dict(ctx.job.spec))
        cfg = plan.config
        cfg.run_id, cfg.attempt = ctx.job.id, ctx.attempt
        if ctx.attempt > 1:
            ctx.log(f"attempt {ctx.attempt}: resuming from the last checkpoint of this job, if any")

        if self.metrics is not None:
            self.metrics.start_job(ctx.job.id)

        def on_event(kind: str, data: dict[str, Any]) -> None:
            if kind == "progress":
                ctx.progress(_progress_message(data), **data)
                if self.metrics is not None:
                    self.metrics.observe(ctx.job.id, data)
            elif kind == "checkpoint":
                ctx.log(f"checkpoint {data['ref']} at step {data['step']} ({data['reason']})")
            elif kind == "start":
                ctx.log(
                    f"training {data['parameters']:,} parameters ({data['trainable_parameters']:,} trainable) on "
                    f"{data['workers']} {cfg.backend} worker(s), device {data['device']}, from step {data['start_step']}"
                )
            elif kind == "log":
                ctx.log(data.get("message", ""))

        launch = self._backend(cfg.backend)
        result = launch(cfg, self.io_spec, on_event=on_event, should_stop=lambda: ctx.cancelled)
        ref = result.get("checkpoint") or ""
        if ref:
            name, _, version = ref.partition(":")
            ctx.add_artifact("checkpoint", name, version)
        if result["status"] == "failed":
            raise TrainingDiverged(result["reason"])
        if result["status"] == "cancelled":
            ctx.raise_if_cancelled()
            raise JobCancelled(result["reason"])
        return {
            "checkpoint": ref,
            "steps": result["step"],
            "final_loss": result["final_loss"],
            "val_loss": result["val_loss"],
            "parameters": result["parameters"],
            "trainable_parameters": result["trainable_parameters"],
            "workers": result["workers"],
            "history": _downsample(result["history"]),
        }

    def _backend(self, name: str) -> Callable[..., dict[str, Any]]:
        if name == "kubernetes":
            from tokenmill.common.trainer.backends.kubernetes import run_kubernetes

            return lambda *a, **kw: run_kubernetes(
                *a, settings=self.kubernetes, io_factory=IO_FACTORY_PATH, data_dir=self.data_dir, **kw
            )
        if name == "ray":
            from tokenmill.common.trainer.backends.ray_backend import run_ray

            return lambda *a, **kw: run_ray(
                *a,
                ray_address=self.ray_address,
                ray_start_timeout_s=self.ray_start.ray_start_timeout_seconds,
                ray_start_attempts=self.ray_start.ray_start_attempts,
                io_factory=make_checkpoint_io,
                **kw,
            )
        from tokenmill.common.trainer.backends.local import run_local

        return lambda *a, **kw: run_local(*a, io_factory=make_checkpoint_io, **kw)


def store_io_spec(config: Config) -> dict[str, Any]:
    """How worker processes reach the checkpoint store (they build their own clients)."""
    from tokenmill.common.clients.checkpoint import CheckpointClient

    client = CheckpointClient.from_config(config)
    try:
        spec: dict[str, Any] = {"kind": "store", "address": client.target, "token": ""}
        if not config.auth.disabled and config.auth.tokens:
            spec["token"] = config.auth.tokens[0]
        if config.tls.enabled:
            mtls = config.tls.client_ca_file is not None
            spec["tls"] = {
                "ca_file": str(config.tls.server_ca_file) if config.tls.server_ca_file else None,
                "cert_file": str(config.tls.cert_file) if mtls else None,
                "key_file": str(config.tls.key_file) if mtls else None,
            }
        return spec
    finally:
        client.close()


def build(config: Config, app: ServiceApp, *, redis_client=None, io_spec: dict[str, Any] | None = None):
    """Wire the servicer and one job worker; ready once Redis answers."""
    from tokenmill.common.redis_conn import connect

    redis_client = redis_client or connect(config, client_name="tokenmill-trainer")
    queue = JobQueue.from_config(config, redis_client)
    io_spec = io_spec or store_io_spec(config)
    planner = Planner(
        config.data_dir, make_checkpoint_io(io_spec), config.input_roots, config.trainer.max_workers
    )
    app.add(
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server,
        TrainerServicer(queue, planner, stopping=app.stopping),
        SERVICE_NAME,
    )
    handler = TrainJobHandler(
        planner,
        io_spec,
        ray_address=os.environ.get("RAY_ADDRESS", ""),
        kubernetes=config.trainer.kubernetes,
        data_dir=str(config.data_dir),
        ray_start=config.trainer,
        metrics=TrainerMetrics(app.registry),
    )
    register_gpu_metrics(app.registry)
    worker = JobWorker(queue, JOB_TYPE, handler, heartbeat_seconds=config.jobs.heartbeat_seconds)
    worker.start_in_thread()
    app.on_shutdown(worker.stop)
    app.on_shutdown(redis_client.close)
    return redis_client.ping


def main(argv: Sequence[str] | None = None) -> int:
    return run_service("trainer", build, argv)
