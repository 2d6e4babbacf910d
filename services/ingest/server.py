"""IngestService: validates ingest requests, queues them as `ingest` jobs and runs them (a JobWorker
thread calling the engine's pipeline), and serves the dataset registry.

Thin on purpose: the pipeline lives in ``common/ingest/``. Everything that can be
rejected before queueing is rejected by ``SubmitIngest`` (bad names, unknown presets or filter
parameters, missing/unreadable sources, an existing dataset, a missing tokenizer), so a queued job
fails only for reasons found while reading. Run with ``python -m tokenmill.services.ingest``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenmill.common import errors
from tokenmill.common.config import Config
from tokenmill.common.ingest.pipeline import check_input_locations, preflight, run_ingest
from tokenmill.common.ingest.registry import DatasetRegistry, summary
from tokenmill.common.ingest.spec import IngestSpec
from tokenmill.common.jobs import JobContext, JobQueue, JobWorker
from tokenmill.common.runtime import ServiceApp, run_service
from tokenmill.common.runtime.job_rpc import JobRpcMixin, job_to_proto
from tokenmill.common.runtime.proto_struct import dict_to_struct, struct_to_dict, timestamp_from_seconds
from tokenmill.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc

log = logging.getLogger("tokenmill.ingest")

JOB_TYPE = "ingest"
SERVICE_NAME = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name
MAX_IDEMPOTENCY_KEY = 256


def request_to_spec(request: ingest_pb2.SubmitIngestRequest) -> dict[str, Any]:
    """The request as an IngestSpec dict: a proto3 zero value means "the engine's default", so only
    set fields are passed on (``IngestSpec`` holds the defaults and validates every value)."""
    spec: dict[str, Any] = {
        "name": request.name,
        "sources": list(request.sources),
        "include_globs": list(request.include_globs),
        "exclude_globs": list(request.exclude_globs),
        "tokenizer": request.tokenizer,
        "seed": int(request.seed),
        "filter_overrides": struct_to_dict(request.filter_overrides),
        "skip_near_dedup": request.skip_near_dedup,
        "pii": not request.skip_pii,
        "language_threshold": request.language_threshold,
        "num_workers": request.num_workers,
        "max_documents": int(request.max_documents),
    }
    if request.HasField("val_fraction"):
        spec["val_fraction"] = request.val_fraction
    for key in _DEFAULT_WHEN_ZERO:
        value = getattr(request, key)
        if value:
            spec[key] = int(value) if isinstance(value, int) else value
    return spec


# Fields whose zero value (0 or "") cannot be a valid setting, so it means "default".
_DEFAULT_WHEN_ZERO = (
    "preset",
    "text_field",
    "vocab_size",
    "near_dup_threshold",
    "minhash_bands",
    "minhash_rows",
    "minhash_ngram",
    "minhash_hash_family",
    "minhash_word_split",
    "dedup_backend",
    "batch_size",
    "max_doc_bytes",
    "max_tokens_per_shard",
)


def dataset_to_proto(manifest: dict[str, Any], path: Path) -> ingest_pb2.Dataset:
    s = summary(manifest)
    msg = ingest_pb2.Dataset(
        name=s["name"],
        created_at=timestamp_from_seconds(float(s["created_at"])),
        documents=int(s["documents"]),
        train_tokens=int(s["train_tokens"]),
        val_tokens=int(s["val_tokens"]),
        vocab_size=int(s["vocab_size"]),
        token_dtype=s["token_dtype"],
        uri=path.resolve().as_uri(),
        job_id=s["job_id"],
    )
    for st in s["stages"]:
        msg.stages.add(
            stage=st["stage"],
            docs_in=int(st["docs_in"]),
            docs_out=int(st["docs_out"]),
            bytes_in=int(st["bytes_in"]),
            bytes_out=int(st["bytes_out"]),
            reasons={k: int(v) for k, v in st.get("reasons", {}).items()},
        )
    msg.manifest.CopyFrom(dict_to_struct(manifest, what="manifest"))
    return msg


def progress_message(data: dict[str, Any]) -> str:
    phase = data.get("phase", "")
    if phase == "filter":
        return f"read {data.get('docs', 0):,} docs ({data.get('docs_per_s', 0):,.0f} docs/s), kept {data.get('kept_docs', 0):,}"
    if phase == "pack":
        return f"packed {data.get('docs', 0):,}/{data.get('of', 0):,} docs, {data.get('tokens', 0):,} tokens"
    if phase == "near_dedup":
        return f"near-dedup removed {data.get('removed', 0):,} docs"
    return phase


class IngestJobHandler:
    """Runs one ingest job. Idempotent: a retried job whose dataset was already published by an
    earlier attempt of the same job returns that dataset instead of failing."""

    def __init__(self, data_dir: Path, input_roots: Sequence[str] = ()):
        self.registry = DatasetRegistry(data_dir)
        self.data_dir = data_dir
        self.input_roots = list(input_roots)

    def __call__(self, ctx: JobContext) -> dict[str, Any]:
        spec = IngestSpec.from_dict(ctx.job.spec)
        try:
            existing = self.registry.get(spec.name)
        except errors.NotFound:
            existing = None
        if existing is not None and existing.get("job_id") == ctx.job.id:
            ctx.log(f"dataset {spec.name!r} was already published by attempt {ctx.attempt - 1}; reusing it")
            manifest = existing
        else:
            if ctx.attempt > 1:
                ctx.log(
                    f"attempt {ctx.attempt}: restarting from scratch (the previous attempt's temp files are removed)"
                )
            manifest = run_ingest(
                spec,
                self.data_dir,
                job_id=ctx.job.id,
                progress=lambda data: ctx.progress(progress_message(data), **data),
                check_cancel=ctx.raise_if_cancelled,
                input_roots=self.input_roots,
            )
        path = self.registry.path(spec.name)
        ctx.add_artifact("dataset", spec.name, uri=path.resolve().as_uri())
        s = summary(manifest)
        return {
            "dataset": spec.name,
            "uri": path.resolve().as_uri(),
            "documents": s["documents"],
            "train_tokens": s["train_tokens"],
            "val_tokens": s["val_tokens"],
            "vocab_size": s["vocab_size"],
            "stages": s["stages"],
            "seconds": manifest.get("stats", {}).get("seconds", 0.0),
        }


class IngestServicer(JobRpcMixin, ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, queue: JobQueue, data_dir: Path, *, stopping=None, input_roots: Sequence[str] = ()):
        JobRpcMixin.__init__(self, queue, JOB_TYPE, stopping=stopping)
        self.data_dir = data_dir
        self.input_roots = list(input_roots)
        self.registry = DatasetRegistry(data_dir)

    def SubmitIngest(self, request: ingest_pb2.SubmitIngestRequest, context) -> common_pb2.Job:
        if len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise errors.InvalidArgument(f"idempotency_key is longer than {MAX_IDEMPOTENCY_KEY} characters")
        spec = IngestSpec.from_dict(request_to_spec(request))
        if request.idempotency_key:
            # a repeated submit returns the first job, even once its dataset exists
            check_input_locations(spec, self.input_roots)
            job = self.job_queue.submit(JOB_TYPE, spec.to_dict(), idempotency_key=request.idempotency_key)
            if job.spec.get("name") != spec.name:
                raise errors.FailedPrecondition(
                    f"idempotency_key {request.idempotency_key!r} was used for dataset {job.spec.get('name')!r}"
                )
            return job_to_proto(job)
        preflight(spec, self.data_dir, self.input_roots)
        job = self.job_queue.submit(JOB_TYPE, spec.to_dict())
        return job_to_proto(job)

    def ListDatasets(
        self, request: ingest_pb2.ListDatasetsRequest, context
    ) -> ingest_pb2.ListDatasetsResponse:
        manifests, token = self.registry.list(request.page_size, request.page_token)
        out = ingest_pb2.ListDatasetsResponse(next_page_token=token)
        for m in manifests:
            out.datasets.append(dataset_to_proto(m, self.registry.root / m["name"]))
        return out

    def GetDataset(self, request: ingest_pb2.GetDatasetRequest, context) -> ingest_pb2.Dataset:
        if not request.name:
            raise errors.InvalidArgument("name is required")
        return dataset_to_proto(self.registry.get(request.name), self.registry.path(request.name))

    def DeleteDataset(
        self, request: ingest_pb2.DeleteDatasetRequest, context
    ) -> ingest_pb2.DeleteDatasetResponse:
        if not request.name:
            raise errors.InvalidArgument("name is required")
        if not self.registry.delete(request.name):
            raise errors.NotFound(
                f"dataset {request.name!r} not found; list datasets with 'tokenmill data list'"
            )
        return ingest_pb2.DeleteDatasetResponse(deleted=True)


def build(config: Config, app: ServiceApp, *, redis_client=None):
    """Wire the servicer and one job worker; ready once Redis answers."""
    from tokenmill.common.redis_conn import connect

    redis_client = redis_client or connect(config, client_name="tokenmill-ingest")
    queue = JobQueue.from_config(config, redis_client)
    data_dir = Path(config.data_dir)
    DatasetRegistry(data_dir).clean()  # temp dirs of runs killed before this start
    app.add(
        ingest_pb2_grpc.add_IngestServiceServicer_to_server,
        IngestServicer(queue, data_dir, stopping=app.stopping, input_roots=config.input_roots),
        SERVICE_NAME,
    )
    worker = JobWorker(
        queue,
        JOB_TYPE,
        IngestJobHandler(data_dir, config.input_roots),
        heartbeat_seconds=config.jobs.heartbeat_seconds,
    )
    worker.start_in_thread()
    app.on_shutdown(worker.stop)
    app.on_shutdown(redis_client.close)
    log.info("ingest: datasets under %s, %d cores", data_dir / "datasets", os.cpu_count() or 1)
    return redis_client.ping


def main(argv: Sequence[str] | None = None) -> int:
    return run_service("ingest", build, argv)
