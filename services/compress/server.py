"""CompressService, the model-jobs service: SubmitCompress validates a request, checks it against the
store and the datasets (plan.preflight), and queues a "compress" job that this service's worker runs
(job.py); SubmitEval does the same for an evaluation (eval_plan.py, eval_job.py), queued on the same
queue with spec kind "eval" (why eval lives here: compress.proto). The job RPCs come from the job
system. Method "distill" queues a job of kind "distill" (distill_job.py) that has the trainer
service train the student (address: `services.trainer` in the config).

Run with `python -m tokenmill.services.compress [--config PATH]`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from tokenmill.common.clients.checkpoint import CheckpointClient
from tokenmill.common.clients.trainer import TrainerClient
from tokenmill.common.compress.device import resolve_device
from tokenmill.common.compress.spec import CALIBRATED, PRUNE_METHODS
from tokenmill.common.config import Config
from tokenmill.common.errors import InvalidArgument
from tokenmill.common.jobs import JobContext, JobQueue, JobWorker
from tokenmill.common.names import HINT, validate_name, validate_tag
from tokenmill.common.redis_conn import connect
from tokenmill.common.runtime import ServiceApp, run_service
from tokenmill.common.runtime.job_rpc import JobRpcMixin, job_to_proto
from tokenmill.services.compress.distill_job import (
    DistillJobHandler,
    distill_preflight,
    trainer_call,
    trainer_fields,
)
from tokenmill.services.compress.eval_job import EvalJobHandler
from tokenmill.services.compress.eval_plan import eval_preflight, validate_eval
from tokenmill.services.compress.job import CompressJobHandler
from tokenmill.services.compress.model_job import MAX_EVAL_SEQ_LEN
from tokenmill.services.compress.plan import (
    DEFAULT_CALIBRATION_SAMPLES,
    ENGINE_METHODS,
    TWO_FOUR_SCORES,
    engine_settings,
    preflight,
)
from tokenmill.v1 import common_pb2, compress_pb2, compress_pb2_grpc

SERVICE_NAME = compress_pb2.DESCRIPTOR.services_by_name["CompressService"].full_name
JOB_TYPE = "compress"

# The API's method names, and what each needs, derived from the engine method each one runs.
METHODS = (*ENGINE_METHODS, "distill")
INT4 = {m for m, body in ENGINE_METHODS.items() if body["method"].startswith("int4-")}
PRUNE_FRACTION = {  # 2:4 fixes the sparsity at one half
    m
    for m, body in ENGINE_METHODS.items()
    if body["method"] in PRUNE_METHODS and body.get("pattern") != "2:4"
}
DEFAULT_GROUP_SIZE = 128
GROUP_SIZES = (32, 64, 128, 256, 512, 1024)
MAX_CALIBRATION_SAMPLES = 4096
DEFAULT_EVAL_BATCHES = 8
MAX_EVAL_BATCHES = 1000
MAX_DISTILL_STEPS = 1_000_000
MAX_IDEMPOTENCY_KEY = 256


def _check_name(field: str, value: str, what: str) -> None:
    validate_name(value, what=what, field=field)


def _check_source(source: str) -> None:
    if not source:
        raise InvalidArgument(
            "source is required: the checkpoint to compress or evaluate, as 'name', 'name:version' or 'name:tag'"
        )
    name, sep, selector = source.partition(":")
    _check_name("source", name, "checkpoint")
    if sep and not selector.isdigit():
        try:
            validate_tag(selector, allow_reserved=True)
        except InvalidArgument:
            raise InvalidArgument(
                f"source {source!r}: after ':' give a version number or a tag ({HINT}), e.g. 'demo-model:3'"
            ) from None


def _unused(request: compress_pb2.SubmitCompressRequest, method: str, fields: Sequence[str]) -> None:
    """Fields that do not apply to `method` must be left unset, so a typo'd method is not silently
    run with defaults while the caller believes their settings took effect."""
    for field in fields:
        if getattr(request, field):
            raise InvalidArgument(f"{field} does not apply to method '{method}'; leave it unset")


def _fraction(field: str, value: float, method: str) -> None:
    if not math.isfinite(value) or not 0.0 < value < 1.0:
        raise InvalidArgument(
            f"{field}={value} for method '{method}': give a fraction strictly between 0 and 1"
        )


def _svd_rank(request: compress_pb2.SubmitCompressRequest) -> dict[str, float]:
    """svd keeps a rank fraction or the rank that holds an energy fraction: exactly one of them."""
    given = {f: getattr(request, f) for f in ("rank_fraction", "energy") if getattr(request, f)}
    if len(given) != 1:
        raise InvalidArgument(
            "method 'svd' needs exactly one of rank_fraction (kept rank / full rank) or energy (the "
            f"fraction of squared singular values kept, e.g. 0.95); got {sorted(given) or 'neither'}"
        )
    for field, value in given.items():
        if not (field == "energy" and value == 1.0):  # all the energy (the full rank) is allowed
            _fraction(field, value, "svd")
    return given


def validate_submit(request: compress_pb2.SubmitCompressRequest) -> dict[str, Any]:
    """Check every field; return the normalised job spec (defaults filled in)."""
    if len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY:
        raise InvalidArgument(f"idempotency_key is longer than {MAX_IDEMPOTENCY_KEY} characters")
    _check_source(request.source)
    if not request.output_name:
        raise InvalidArgument(
            "output_name is required: the checkpoint name to store the compressed model under"
        )
    _check_name("output_name", request.output_name, "checkpoint")
    method = request.method
    if method not in METHODS:
        raise InvalidArgument(f"method {method!r} is not supported; use one of {list(METHODS)}")

    spec: dict[str, Any] = {"source": request.source, "output_name": request.output_name, "method": method}
    if method in INT4:
        group_size = request.group_size or DEFAULT_GROUP_SIZE
        if group_size not in GROUP_SIZES:
            raise InvalidArgument(f"group_size={group_size}: use one of {list(GROUP_SIZES)} (default 128)")
        spec["group_size"] = group_size
    else:
        _unused(request, method, ["group_size"])

    if method in PRUNE_FRACTION:
        _fraction("sparsity", request.sparsity, method)
        spec["sparsity"] = request.sparsity
    elif method == "prune_2_4":
        if request.sparsity not in (0.0, 0.5):
            raise InvalidArgument(
                f"sparsity={request.sparsity}: 2:4 pruning is always 0.5 sparse; leave sparsity unset or 0.5"
            )
        spec["sparsity"] = 0.5
    else:
        _unused(request, method, ["sparsity"])
    if method == "prune_2_4":
        spec["score"] = request.score or "magnitude"
        if spec["score"] not in TWO_FOUR_SCORES:
            raise InvalidArgument(
                f"score={request.score!r} for method 'prune_2_4': use one of {list(TWO_FOUR_SCORES)}"
            )
    else:
        _unused(request, method, ["score"])

    if method == "svd":
        spec.update(_svd_rank(request))
    else:
        _unused(request, method, ["rank_fraction", "energy"])

    if method in ENGINE_METHODS and engine_settings(method, spec.get("score", ""))["method"] in CALIBRATED:
        if not request.calibration_dataset:
            scored = f" with score '{spec['score']}'" if "score" in spec else ""
            raise InvalidArgument(
                f"method '{method}'{scored} needs calibration_dataset (an ingested dataset name)"
            )
        _check_name("calibration_dataset", request.calibration_dataset, "dataset")
        samples = request.calibration_samples or DEFAULT_CALIBRATION_SAMPLES
        if samples > MAX_CALIBRATION_SAMPLES:
            raise InvalidArgument(
                f"calibration_samples={samples} is above the limit of {MAX_CALIBRATION_SAMPLES}"
            )
        spec.update(calibration_dataset=request.calibration_dataset, calibration_samples=samples)
    else:
        _unused(request, method, ["calibration_dataset", "calibration_samples"])

    if request.eval_dataset:
        _check_name("eval_dataset", request.eval_dataset, "dataset")
        batches = request.eval_batches or DEFAULT_EVAL_BATCHES
        if batches > MAX_EVAL_BATCHES:
            raise InvalidArgument(f"eval_batches={batches} is above the limit of {MAX_EVAL_BATCHES}")
        spec.update(eval_dataset=request.eval_dataset, eval_batches=batches)
    elif request.eval_batches or request.eval_seq_len:
        raise InvalidArgument(
            "eval_batches/eval_seq_len is set but eval_dataset is not; name the dataset to evaluate on"
        )
    if request.eval_seq_len:
        if request.eval_seq_len > MAX_EVAL_SEQ_LEN:
            raise InvalidArgument(
                f"eval_seq_len={request.eval_seq_len} is above the limit of {MAX_EVAL_SEQ_LEN}"
            )
        spec["eval_seq_len"] = request.eval_seq_len
    if method == "int4_gptq":
        spec["act_order"] = request.act_order
    else:
        _unused(request, method, ["act_order"])
    if request.keep_dense:
        for pattern in request.keep_dense:
            if not pattern or len(pattern) > 200:
                raise InvalidArgument("keep_dense patterns must be 1 to 200 characters")
        spec["keep_dense"] = list(request.keep_dense)

    if method == "distill":
        spec.update(_distill_settings(request))
    else:
        _unused(request, method, ["student_preset", "distill_steps", "train_dataset"])
        for field in ("distill_temperature", "distill_alpha"):
            if request.HasField(field):
                raise InvalidArgument(f"{field} does not apply to method '{method}'; leave it unset")
    return spec


def _distill_settings(request: compress_pb2.SubmitCompressRequest) -> dict[str, Any]:
    """The distill fields of the spec (kind "distill": the worker hands the training to the trainer)."""
    _check_student(request.student_preset)
    if not request.distill_steps:
        raise InvalidArgument("method 'distill' needs distill_steps (the number of student training steps)")
    if request.distill_steps > MAX_DISTILL_STEPS:
        raise InvalidArgument(
            f"distill_steps={request.distill_steps} is above the limit of {MAX_DISTILL_STEPS}"
        )
    if not request.train_dataset:
        raise InvalidArgument(
            "method 'distill' needs train_dataset (the ingested dataset the student learns the teacher on)"
        )
    _check_name("train_dataset", request.train_dataset, "dataset")
    if request.keep_dense:
        raise InvalidArgument("keep_dense does not apply to method 'distill'; leave it unset")
    out: dict[str, Any] = {
        "kind": "distill",
        "student_preset": request.student_preset,
        "distill_steps": request.distill_steps,
        "train_dataset": request.train_dataset,
    }
    if request.HasField("distill_temperature"):
        t = request.distill_temperature
        if not math.isfinite(t) or t <= 0:
            raise InvalidArgument(f"distill_temperature={t}: give a temperature > 0 (unset = 2.0)")
        out["distill_temperature"] = t
    if request.HasField("distill_alpha"):
        a = request.distill_alpha
        if not math.isfinite(a) or not 0.0 <= a <= 1.0:
            raise InvalidArgument(f"distill_alpha={a}: give the hard-label weight in [0, 1] (unset = 0.0)")
        out["distill_alpha"] = a
    return out


def _check_student(preset: str) -> None:
    if not preset:
        raise InvalidArgument("method 'distill' needs student_preset (a model preset for the student)")
    from tokenmill.common.model.transformer import PRESETS  # torch import; only distill requests pay for it

    if preset not in PRESETS:
        raise InvalidArgument(f"student_preset {preset!r} is unknown; use one of {sorted(PRESETS)}")


class CompressServicer(JobRpcMixin, compress_pb2_grpc.CompressServiceServicer):
    """GetJob/ListJobs/CancelJob/WatchJob from the job system; SubmitCompress validates, checks the
    request against the store and datasets, then queues."""

    def __init__(
        self,
        queue: JobQueue,
        client: CheckpointClient,
        data_dir: str,
        trainer: TrainerClient,
        *,
        stopping=None,
    ):
        JobRpcMixin.__init__(self, queue, JOB_TYPE, stopping=stopping)
        self.client = client
        self.data_dir = data_dir
        self.trainer = trainer

    def SubmitCompress(
        self, request: compress_pb2.SubmitCompressRequest, context: grpc.ServicerContext
    ) -> common_pb2.Job:
        spec = validate_submit(request)
        if spec["method"] == "distill":
            self._check_distill(spec)
        else:  # NOT_FOUND / INVALID_ARGUMENT / FAILED_PRECONDITION; the source pinned to the version checked
            spec["source"] = preflight(self.client, self.data_dir, spec).model.ref
        job = self.job_queue.submit(JOB_TYPE, spec, idempotency_key=request.idempotency_key)
        return job_to_proto(job)

    def _check_distill(self, spec: dict[str, Any]) -> None:
        """The store's and datasets' checks, then the trainer's own (ValidateTrain: shapes, memory);
        the teacher is pinned to its version so every attempt trains from the same one."""
        plan = distill_preflight(self.client, self.data_dir, spec)
        spec["teacher"] = plan.teacher.ref
        trainer_call(
            self.trainer.target, self.trainer.validate, spec["output_name"], **trainer_fields(spec, plan)
        )

    def SubmitEval(
        self, request: compress_pb2.SubmitEvalRequest, context: grpc.ServicerContext
    ) -> common_pb2.Job:
        if len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise InvalidArgument(f"idempotency_key is longer than {MAX_IDEMPOTENCY_KEY} characters")
        spec = validate_eval(request, _check_source)
        eval_preflight(self.client, self.data_dir, spec)  # NOT_FOUND / INVALID_ARGUMENT / FAILED_PRECONDITION
        job = self.job_queue.submit(JOB_TYPE, spec, idempotency_key=request.idempotency_key)
        return job_to_proto(job)


class ModelJobs:
    """The queue's one worker handler: a spec's kind picks the job ("compress" when absent, as every
    spec queued before eval existed)."""

    def __init__(self, client_factory: Any, trainer_factory: Any, data_dir: str, device: str = "cpu"):
        self.handlers: dict[str, Callable[[JobContext], dict[str, Any]]] = {
            "compress": CompressJobHandler(client_factory, data_dir, device),
            "eval": EvalJobHandler(client_factory, data_dir),
            "distill": DistillJobHandler(client_factory, trainer_factory, data_dir),
        }

    def __call__(self, ctx: JobContext) -> dict[str, Any]:
        kind = ctx.job.spec.get("kind", "compress")
        if kind not in self.handlers:
            raise InvalidArgument(
                f"job kind {kind!r} is not one this worker runs; use {sorted(self.handlers)}"
            )
        return self.handlers[kind](ctx)


def build(config: Config, app: ServiceApp, *, run_worker: bool = True):
    """Wire the servicer and (unless `run_worker` is False: a front end only) one job worker to the
    queue; ready once Redis answers."""
    redis_client = connect(config, client_name="tokenmill-compress")
    queue = JobQueue.from_config(config, redis_client)
    client = CheckpointClient.from_config(config)
    trainer = TrainerClient.from_config(config)  # distill; a channel only: dialled on first use
    app.add(
        compress_pb2_grpc.add_CompressServiceServicer_to_server,
        CompressServicer(queue, client, str(config.data_dir), trainer, stopping=app.stopping),
        SERVICE_NAME,
    )
    if run_worker:
        device = str(resolve_device(config.compress.device))  # a missing GPU fails the start, clearly
        handler = ModelJobs(
            lambda: CheckpointClient.from_config(config),
            lambda: TrainerClient.from_config(config),
            str(config.data_dir),
            device,
        )
        worker = JobWorker(queue, JOB_TYPE, handler, heartbeat_seconds=config.jobs.heartbeat_seconds)
        worker.start_in_thread()
        app.on_shutdown(worker.stop)
    app.on_shutdown(client.close)
    app.on_shutdown(trainer.close)
    app.on_shutdown(redis_client.close)
    return redis_client.ping


def main(argv: Sequence[str] | None = None) -> int:
    return run_service("compress", build, argv)
