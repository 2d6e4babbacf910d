"""One attempt of a compress job: load, measure, compress layer by layer, store, report.

Idempotent across attempts: the new version is saved with the job id as the store's idempotency
key, so an attempt that replaces a killed one either finds the committed version or resumes the
same upload; the store publishes a version only at commit, so no half-written version is visible.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from tokenmill.common import failpoints
from tokenmill.common.clients.checkpoint import CheckpointClient
from tokenmill.common.compress import CompressedResult, Progress, compress_model
from tokenmill.common.compress.checks import check_finite
from tokenmill.common.inference.config import model_config_from_dict
from tokenmill.common.jobs import JobContext
from tokenmill.services.compress.measure import decode_tokens_per_second, eval_perplexity
from tokenmill.services.compress.model_job import eval_stream, token_batches
from tokenmill.services.compress.plan import CALIBRATION_SPLIT, EVAL_SPLIT, Plan, preflight

REPORT_FILE = "compression_report.json"
# The parent's files the compressed version keeps: its tokenizer, chat template, generation defaults
# and the HF config.json (the architecture, which compression leaves as it is; the manifest's config
# records the storage format), so it serves, evaluates and teaches (distill) as its parent does.
CARRIED_FILES = {
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
}
EVAL_ROWS_PER_BATCH = 8


class CompressJobHandler:
    """`JobWorker(queue, "compress", CompressJobHandler(client_factory, data_dir, device))`.

    device: where the compression runs (resolve_device of the `compress.device` setting); the
    tensors come back to the CPU to be stored, and the before/after measurements run on the CPU.
    """

    def __init__(self, client_factory: Any, data_dir: str | Path, device: str | torch.device = "cpu"):
        self.client_factory = client_factory  # () -> CheckpointClient (one per attempt, closed after)
        self.data_dir = Path(data_dir)
        self.device = torch.device(device)

    def __call__(self, ctx: JobContext) -> dict[str, Any]:
        began = time.monotonic()
        client: CheckpointClient = self.client_factory()
        try:
            spec = dict(ctx.job.spec)
            earlier = earlier_attempt(client, spec["output_name"], ctx) if ctx.attempt > 1 else None
            if earlier is not None:  # an attempt that died after its commit: that version is the result
                return earlier
            plan = preflight(client, self.data_dir, spec)
            ctx.log(
                f"compressing {plan.model.ref} with {plan.step.method} on {self.device} (attempt {ctx.attempt})"
            )
            tensors = plan.model.load(client)
            check_finite(tensors)  # before any work: a broken checkpoint fails, never retried
            ctx.raise_if_cancelled()
            before = measure(tensors, plan.model.config, plan.eval, plan.eval_seq_len, spec)
            result, seconds = self._compress(ctx, plan, spec, tensors)
            after = measure(result.tensors, plan.model.config, plan.eval, plan.eval_seq_len, spec)
            ctx.raise_if_cancelled()
            report = build_report(plan.model.ref, spec, plan.step.to_dict(), result, before, after, seconds)
            report["wall_seconds"] = time.monotonic() - began  # the stored copy's: all but the store
            ref = self._store(client, ctx, plan, spec, result, report)
            report.update(output=ref, wall_seconds=time.monotonic() - began)
            name, _, version = ref.partition(":")
            ctx.add_artifact("checkpoint", name, version)
            return {"checkpoint": ref, "report": report}
        finally:
            client.close()

    def _compress(self, ctx: JobContext, plan: Plan, spec: dict[str, Any], tensors: dict[str, torch.Tensor]):
        calibration = None
        if plan.calibration is not None:
            calibration = token_batches(
                plan.calibration,
                split=CALIBRATION_SPLIT,
                rows=plan.calibration_rows,
                seq_len=plan.calibration_seq_len,
                vocab_size=plan.model.vocab_size,
            )

        def on_layer(p: Progress) -> None:
            ctx.progress(
                f"layer {p.index}/{p.total} {p.layer} error {p.error:.4g}",
                layer=p.index,
                layers=p.total,
                name=p.layer,
                error=p.error,
                method=p.method,
            )
            failpoints.hit("compress.after_layer", layer=p.index, attempt=ctx.attempt)
            ctx.raise_if_cancelled()  # between layers: a cancel stops within one layer's work

        began = time.monotonic()
        result = compress_model(
            tensors,
            plan.step,
            calibration,
            on_layer,
            config=model_config_from_dict(plan.model.config),
            history=plan.model.compression,
            device=self.device,
        )
        return result, time.monotonic() - began

    def _store(
        self, client: CheckpointClient, ctx: JobContext, plan: Plan, spec: dict[str, Any], result, report
    ) -> str:
        config = {**plan.model.config, **result.manifest_meta}
        if "quantization" not in result.manifest_meta:
            config.pop("quantization", None)
        files = plan.model.files(client, CARRIED_FILES)
        files[REPORT_FILE] = json.dumps(report, indent=2, sort_keys=True).encode()
        scalars = {k: v for k, v in report.items() if isinstance(v, (int, float, str)) and v != ""}
        version = client.save(
            spec["output_name"],
            result.tensors,
            files=files,
            config=config,
            metrics=scalars,
            lineage={
                "parent": plan.model.ref,
                "job_id": ctx.job.id,
                "dataset": spec.get("calibration_dataset", ""),
            },
            idempotency_key=upload_key(ctx),
        )
        return version.ref


def upload_key(ctx: JobContext) -> str:
    """The store's idempotency key of the job's new version: the same for every attempt."""
    return f"compress-{ctx.job.id}"


def earlier_attempt(client: CheckpointClient, name: str, ctx: JobContext) -> dict[str, Any] | None:
    """The result of an earlier attempt of this job that committed its version, or None after
    discarding the upload an earlier attempt left unfinished: this attempt's report (timings,
    tokens/s) differs from the one registered there, and the store never changes an entry, so
    resuming that upload would fail the job instead of finishing it."""
    upload = client.begin(name, idempotency_key=upload_key(ctx))
    ref = upload.session.committed_ref
    if not ref:
        upload.abort()
        return None
    ctx.log(f"an earlier attempt already stored {ref}")
    stored = client.load_files(ref, [REPORT_FILE]).get(REPORT_FILE)
    report = {**json.loads(stored), "output": ref} if stored else {"output": ref}
    version_name, _, version = ref.partition(":")
    ctx.add_artifact("checkpoint", version_name, version)
    return {"checkpoint": ref, "report": report}


def measure(
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    eval_path: Path | None,
    eval_seq_len: int,
    spec: dict[str, Any],
) -> dict[str, float]:
    """Decode tokens/s, and perplexity on the eval split's first `eval_batches` batches when the job
    names an eval dataset: the same measurement before and after, for every method."""
    out = {"tokens_per_second": decode_tokens_per_second(tensors, config)}
    if eval_path is not None:
        rows = int(spec.get("eval_batches") or 1) * EVAL_ROWS_PER_BATCH
        stream = eval_stream(
            eval_path,
            split=EVAL_SPLIT,
            max_tokens=rows * eval_seq_len + 1,
            vocab_size=int(config["vocab_size"]),
        )
        ppl = eval_perplexity(tensors, config, stream, eval_seq_len)
        out.update(perplexity=ppl.perplexity, loss=ppl.loss)
    return out


def build_report(
    source: str,
    spec: dict[str, Any],
    settings: dict[str, Any],
    result: CompressedResult,
    before: dict[str, float],
    after: dict[str, float],
    seconds: float,
) -> dict[str, Any]:
    """The report's fields as compress.proto's CompressionReport names them (`source`: the resolved
    "name:version" compressed; `settings`: what the method ran with)."""
    return {
        "source": source,
        "method": spec["method"],
        "settings": settings,
        "bytes_before": result.bytes_before,
        "bytes_after": result.bytes_after,
        "ratio": result.ratio,
        "eval_dataset": spec.get("eval_dataset", ""),
        "perplexity_before": before.get("perplexity", 0.0),
        "perplexity_after": after.get("perplexity", 0.0),
        "tokens_per_second_before": before["tokens_per_second"],
        "tokens_per_second_after": after["tokens_per_second"],
        "sparsity": result.sparsity or 0.0,
        "notes": list(result.notes),
        "compress_seconds": seconds,
        "per_layer_errors": [
            {"layer": layer, "method": method, "error": err}
            for layer, by_method in result.per_layer_errors.items()
            for method, err in by_method.items()
        ],
    }
