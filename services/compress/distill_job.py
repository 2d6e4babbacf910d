"""Compression by distillation: a compress job whose work is a trainer job in mode "distill".

The compress service does not train: it submits the student's training to the trainer service
(TrainerClient, address from `services.trainer` in the config) with the idempotency key
`distill-<compress job id>`, so an attempt that replaces a killed one re-attaches to the same
trainer job instead of starting a second. It relays the trainer's progress (step i of n, loss, kl)
as this job's progress, cancels the trainer job when this job is cancelled, and once the student is
stored measures teacher (before) and student (after) exactly as every compress job does (job.measure,
job.build_report), records the report on the student version (RecordMetrics) and returns it.
The student's checkpoint is the trainer's: lineage parent = the teacher, manifest config
`distillation` = the settings it was taught with.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.common import errors
from tokenmill.common.clients.base import TERMINAL_STATES
from tokenmill.common.clients.checkpoint import CheckpointClient
from tokenmill.common.clients.trainer import TrainerClient
from tokenmill.common.compress import CompressedResult, tensor_bytes
from tokenmill.common.jobs import JobContext
from tokenmill.common.runtime.proto_struct import struct_to_dict
from tokenmill.services.compress.job import build_report, measure
from tokenmill.services.compress.model_job import (
    StoredModel,
    check_dataset,
    dataset_path,
    find_model,
)
from tokenmill.services.compress.plan import EVAL_SPLIT
from tokenmill.v1 import common_pb2

TRAIN_SPLIT = "train"
TRAIN_SEQ_LEN = 128  # the student's training window, lowered to the teacher's or student's context
NAMESPACE = "compress"  # the report is recorded on the student as compress/<field>
POLL_SECONDS = 1.0


@dataclass
class DistillPlan:
    teacher: StoredModel
    train: Path
    seq_len: int
    eval: Path | None
    eval_seq_len: int


def distill_preflight(client: CheckpointClient, data_dir: str | Path, spec: dict[str, Any]) -> DistillPlan:
    """Every check the store and the dataset manifests allow, before the trainer is asked:
    NOT_FOUND teacher or dataset, FAILED_PRECONDITION foreign vocabulary or too small a split."""
    from tokenmill.common.model.transformer import preset  # torch import: only distill jobs pay it

    teacher = find_model(client, spec.get("teacher") or spec["source"])
    window = min(teacher.eval_window, preset(spec["student_preset"]).max_seq_len)
    seq_len = min(TRAIN_SEQ_LEN, window)
    train = dataset_path(data_dir, spec["train_dataset"], "train_dataset")
    check_dataset(train, teacher, split=TRAIN_SPLIT, min_tokens=seq_len + 1, field="train_dataset")
    eval_seq_len = int(spec.get("eval_seq_len") or window)
    if eval_seq_len > window:
        raise errors.InvalidArgument(
            f"eval_seq_len={eval_seq_len} is above {window}, the longest window both the teacher and "
            f"student preset {spec['student_preset']!r} take; use at most {window}"
        )
    evaluation = None
    if spec.get("eval_dataset"):
        evaluation = dataset_path(data_dir, spec["eval_dataset"], "eval_dataset")
        check_dataset(
            evaluation, teacher, split=EVAL_SPLIT, min_tokens=eval_seq_len + 1, field="eval_dataset"
        )
    return DistillPlan(teacher, train, seq_len, evaluation, eval_seq_len)


def trainer_fields(spec: dict[str, Any], plan: DistillPlan) -> dict[str, Any]:
    """The SubmitTrainRequest fields of a compress spec: a pure function of the spec and the
    manifests, so every attempt submits the same request (the trainer's idempotency needs that)."""
    fields: dict[str, Any] = {
        "mode": "distill",
        "model_preset": spec["student_preset"],
        "dataset": spec["train_dataset"],
        "teacher_checkpoint": plan.teacher.ref,
        "steps": int(spec["distill_steps"]),
        "seq_len": plan.seq_len,
    }
    for key in ("distill_temperature", "distill_alpha"):
        if key in spec:
            fields[key] = float(spec[key])
    return fields


def trainer_call(target: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`call(*args, **kwargs)`, with an unreachable trainer named for what it is."""
    try:
        return call(*args, **kwargs)
    except errors.Unavailable as exc:
        raise errors.Unavailable(
            f"the trainer service at {target} is unreachable ({exc.message}); distillation runs as a "
            "trainer job: start the trainer or point services.trainer in the config at it"
        ) from None


class DistillJobHandler:
    """Runs the compress queue's jobs of kind "distill" (see server.ModelJobs)."""

    def __init__(
        self,
        client_factory: Callable[[], CheckpointClient],
        trainer_factory: Callable[[], TrainerClient],
        data_dir: str | Path,
        poll_seconds: float = POLL_SECONDS,
    ):
        self.client_factory = client_factory  # one client of each per attempt, closed after
        self.trainer_factory = trainer_factory
        self.data_dir = Path(data_dir)
        self.poll_seconds = poll_seconds

    def __call__(self, ctx: JobContext) -> dict[str, Any]:
        began = time.monotonic()
        client, trainer = self.client_factory(), self.trainer_factory()
        try:
            spec = dict(ctx.job.spec)
            plan = distill_preflight(client, self.data_dir, spec)
            key = f"distill-{ctx.job.id}"
            fields = trainer_fields(spec, plan)
            job = trainer_call(
                trainer.target, trainer.submit, spec["output_name"], idempotency_key=key, **fields
            )
            ctx.log(f"distilling {plan.teacher.ref} into {spec['student_preset']} as trainer job {job.id} "
                    f"(attempt {ctx.attempt})")  # fmt: skip
            done = self._follow(ctx, trainer, job.id)
            student = find_model(client, str(struct_to_dict(done.result)["checkpoint"]))
            report = self._report(ctx, client, plan, spec, student, done)
            report.update(trainer_job=job.id, wall_seconds=time.monotonic() - began)
            name, _, version = student.ref.partition(":")
            ctx.add_artifact("checkpoint", name, version)
            return {"checkpoint": student.ref, "report": report}
        finally:
            client.close()
            trainer.close()

    def _follow(self, ctx: JobContext, trainer: TrainerClient, job_id: str) -> common_pb2.Job:
        """Relay the trainer job's progress until it ends; cancel it when this job is cancelled (not
        when this attempt merely lost its lease: the attempt that took over follows it on)."""
        offset = ""
        while True:
            job = trainer_call(trainer.target, trainer.get_job, job_id)
            events = trainer_call(
                trainer.target, lambda after: list(trainer.watch_job(job_id, after, False)), offset
            )
            for event in events:
                offset = event.offset
                if event.kind == "progress":
                    ctx.progress(event.message, trainer_job=job_id, **struct_to_dict(event.data))
            if job.state in TERMINAL_STATES:
                return _finished(job)
            if ctx.cancelled:
                if not ctx.lease_lost:
                    reason = f"compress job {ctx.job.id} was cancelled"
                    trainer_call(trainer.target, trainer.cancel_job, job_id, reason)
                ctx.raise_if_cancelled()
            time.sleep(self.poll_seconds)

    def _report(
        self,
        ctx: JobContext,
        client: CheckpointClient,
        plan: DistillPlan,
        spec: dict[str, Any],
        student: StoredModel,
        done: common_pb2.Job,
    ) -> dict[str, Any]:
        """Teacher and student measured alike; the report recorded on the student version."""
        teacher_tensors, student_tensors = plan.teacher.load(client), student.load(client)
        ctx.raise_if_cancelled()
        before = measure(teacher_tensors, plan.teacher.config, plan.eval, plan.eval_seq_len, spec)
        after = measure(student_tensors, student.config, plan.eval, plan.eval_seq_len, spec)
        sizes = CompressedResult(
            tensors={},
            manifest_meta={},
            bytes_before=tensor_bytes(teacher_tensors),
            bytes_after=tensor_bytes(student_tensors),
        )
        settings = {**dict(student.config.get("distillation") or {}), "train_dataset": spec["train_dataset"]}
        seconds = done.finished_at.ToSeconds() - done.started_at.ToSeconds()
        report = build_report(plan.teacher.ref, spec, settings, sizes, before, after, float(seconds))
        report["output"] = student.ref
        scalars = {k: float(v) for k, v in report.items() if isinstance(v, (int, float))}
        client.record_metrics(student.ref, NAMESPACE, scalars)
        return report


def _finished(job: common_pb2.Job) -> common_pb2.Job:
    """The succeeded trainer job; a failed or cancelled one fails this job for good (the trainer
    already retried it, and a retry here would re-attach to the same ended job)."""
    if job.state == common_pb2.JOB_STATE_SUCCEEDED:
        return job
    state = common_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")
    raise errors.FailedPrecondition(
        f"the student's trainer job {job.id} ended {state}: {job.error or 'no error recorded'}; "
        "its log is the trainer service's GetJob/WatchJob of that id"
    )
