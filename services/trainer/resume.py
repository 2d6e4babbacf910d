"""Elastic resume: turn a SubmitTrain spec with ``resume`` (a train job id or a checkpoint ref) into
the spec of a run that continues it, on any worker count.

The continued run takes the resumed run's spec; fields the request sets override it. It starts from
the resumed run's last checkpoint (``resume_from``, a concrete ``name:version``), which the engine
reshards to the new worker count and whose sampler state holds the global number of samples drawn.
Unless the request sets the batch itself, the global batch (sequences per optimizer step) is kept:
it is split over the new workers, with gradient accumulation where one micro-batch would grow past
the original one, so the loss curve continues as if nothing had changed.
"""

from __future__ import annotations

import json
from typing import Any

from tokenmill.common.errors import FailedPrecondition, InvalidArgument, NotFound
from tokenmill.common.jobs import JobQueue
from tokenmill.common.jobs.model import JobState
from tokenmill.common.trainer.checkpoint_io import CheckpointIO
from tokenmill.common.trainer.config import TrainConfig, run_tag
from tokenmill.services.trainer.planner import DIRECT_FIELDS

TRAIN_STATE = "train_state.json"
# Fields that define what the samples and the model are: a continued run must keep them.
FIXED_FIELDS = ("seq_len", "seed", "mode", "dataset")
# TrainConfig fields that travel back into a spec under their own name.
SPEC_FIELDS = (*DIRECT_FIELDS, "model_overrides", "init_checkpoint", "output_name")
DEFAULTS = TrainConfig()


def _num(spec: dict[str, Any], name: str) -> int:
    """A batch field of a spec, or TrainConfig's default (a spec leaves it out when the request did)."""
    return int(spec.get(name) or getattr(DEFAULTS, name))


def config_to_spec(cfg: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's recorded TrainConfig (train_state.json) as a SubmitTrain spec."""
    spec = {k: cfg[k] for k in SPEC_FIELDS if cfg.get(k) not in (None, "", {})}
    if cfg.get("dataset_name"):
        spec["dataset"] = cfg["dataset_name"]
    if cfg.get("sft_path"):
        spec["sft_data"] = cfg["sft_path"]
    if cfg.get("dpo_path"):
        spec["dpo_data"] = cfg["dpo_path"]
        spec["dpo_beta"] = cfg["dpo_beta"]
    for name in ("reference_checkpoint", "use_lora"):
        if cfg.get(name):
            spec[name] = cfg[name]
    if cfg.get("mode") == "lora" or cfg.get("use_lora"):
        spec["lora"] = dict(cfg["lora"])
    return spec


def split_batch(sequences: int, workers: int, max_micro: int) -> tuple[int, int, str]:
    """(micro_batch_size, grad_accum_steps, warning) giving ``sequences`` per step on ``workers``,
    each micro-batch at most ``max_micro`` sequences; when ``workers`` does not divide the global
    batch, the nearest larger one is used and the warning says so."""
    per_worker = -(-sequences // workers)
    warning = ""
    if per_worker * workers != sequences:
        warning = (
            f"the global batch changes from {sequences} to {per_worker * workers} sequences per step: "
            f"{workers} workers do not divide {sequences}; set micro_batch_size/grad_accum_steps to choose"
        )
    accum = next(a for a in range(1, per_worker + 1) if per_worker % a == 0 and per_worker // a <= max_micro)
    return per_worker // accum, accum, warning


class ResumeResolver:
    """Expands ``resume`` using the job queue (job ids) and the checkpoint store (refs)."""

    def __init__(self, queue: JobQueue, io: CheckpointIO | None, job_type: str):
        self.queue, self.io, self.job_type = queue, io, job_type

    def expand(self, request: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """(the spec of the continuing run, warnings); a spec without ``resume`` comes back as is."""
        target = str(request.get("resume") or "")
        if not target:
            return request, []
        base, ref = self._source(target)
        for name in FIXED_FIELDS:
            was = base.get(name, getattr(DEFAULTS, name, None))
            if name in request and str(request[name]) != str(was):
                raise InvalidArgument(
                    f"{name} cannot change when resuming ({was!r} in the resumed run, {request[name]!r} "
                    "requested): the checkpoint's sampler position counts in its units"
                )
        spec = {**base, **request}
        if request.get("model_overrides"):  # a shape check follows: name only what changes
            spec["model_overrides"] = {**(base.get("model_overrides") or {}), **request["model_overrides"]}
        spec["resume_from"] = ref
        warnings = []
        if "micro_batch_size" not in request and "grad_accum_steps" not in request:
            sequences = (
                _num(base, "workers") * _num(base, "micro_batch_size") * _num(base, "grad_accum_steps")
            )
            micro, accum, warning = split_batch(
                sequences, _num(spec, "workers"), _num(base, "micro_batch_size")
            )
            spec["micro_batch_size"], spec["grad_accum_steps"] = micro, accum
            warnings += [warning] if warning else []
        return spec, warnings

    def _source(self, target: str) -> tuple[dict[str, Any], str]:
        """(the resumed run's spec, the checkpoint to continue from) for a job id or a ref."""
        try:
            job = self.queue.get(target)
        except (NotFound, InvalidArgument):
            job = None
        if job is not None and job.type == self.job_type:
            return self._from_job(job)
        if self.io is None or (ref := self.io.resolve(target)) is None:
            raise NotFound(
                f"resume {target!r}: no train job or checkpoint by that name; list them with "
                "'tokenmill jobs list' or 'tokenmill ckpt list'"
            )
        try:
            state = json.loads(self.io.read_files(ref, [TRAIN_STATE])[TRAIN_STATE])
        except NotFound:
            raise FailedPrecondition(
                f"checkpoint {ref} holds no training state (it was not written by a training run); "
                "start a new run from its weights with init_checkpoint instead"
            ) from None
        return config_to_spec(state.get("config", {})), ref

    def _from_job(self, job: Any) -> tuple[dict[str, Any], str]:
        if job.state not in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
            raise FailedPrecondition(
                f"job {job.id} is {job.state.value}; cancel it (or wait for it to end) before resuming it"
            )
        spec = {k: v for k, v in job.spec.items() if k not in ("resume", "resume_from")}
        output = spec.get("output_name", "")
        ref = self.io.resolve(f"{output}:{run_tag(job.id)}") if self.io is not None else None
        if ref is None:
            raise FailedPrecondition(
                f"job {job.id} wrote no checkpoint to resume from; submit it again instead "
                "(set checkpoint_every to make long runs resumable)"
            )
        return spec, ref
