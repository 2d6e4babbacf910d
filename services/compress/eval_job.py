"""One attempt of an eval job: load the stored model, score perplexity and the suite's tasks, record
the numbers with the checkpoint version, return the report (compress.proto's EvalReport).

Perplexity is tokenmill.common.eval.perplexity over the same token stream compression's report
reads (the first `batches * 8` windows of the val split); tasks run through the in-process harness
(LocalLM: the training model scores, the inference engine generates). Re-running an attempt is
safe: nothing is written before the end, and recording the same metrics again changes nothing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from tokenmill.common.clients.checkpoint import CheckpointClient
from tokenmill.common.compress import build_model
from tokenmill.common.compress.checks import check_finite
from tokenmill.common.eval.harness import evaluate_task
from tokenmill.common.eval.lm import LocalLM
from tokenmill.common.eval.perplexity import perplexity
from tokenmill.common.inference.config import model_config_from_dict
from tokenmill.common.inference.tokenizer import Tokenizer
from tokenmill.common.jobs import JobContext
from tokenmill.common.model.quant import dequantize_state_dict
from tokenmill.services.compress.eval_plan import TOKENIZER, EvalPlan, eval_preflight
from tokenmill.services.compress.job import EVAL_ROWS_PER_BATCH
from tokenmill.services.compress.model_job import eval_stream
from tokenmill.services.compress.plan import EVAL_SPLIT

NAMESPACE = "eval"  # recorded as eval/<suite>/<task>/<metric> and eval/perplexity/<dataset>/<metric>


class EvalJobHandler:
    """Runs the compress queue's jobs of kind "eval" (see server.ModelJobs)."""

    def __init__(self, client_factory: Any, data_dir: str | Path):
        self.client_factory = client_factory  # () -> CheckpointClient (one per attempt, closed after)
        self.data_dir = Path(data_dir)

    def __call__(self, ctx: JobContext) -> dict[str, Any]:
        began = time.monotonic()
        client: CheckpointClient = self.client_factory()
        try:
            spec = dict(ctx.job.spec)
            plan = eval_preflight(client, self.data_dir, spec)
            ctx.log(f"evaluating {plan.model.ref} (attempt {ctx.attempt})")
            tensors = plan.model.load(client)
            check_finite(tensors)  # a broken checkpoint fails at once, never retried
            tokenizer = plan.model.files(client, {TOKENIZER}).get(TOKENIZER)
            lm = None
            if plan.tasks:  # the preflight made sure the tasks have a tokenizer to read them with
                assert tokenizer is not None
                lm = LocalLM.from_checkpoint(tensors, plan.model.config, tokenizer)
            report: dict[str, Any] = {"source": plan.model.ref, "suite": spec.get("suite", ""), "tasks": []}
            if plan.perplexity is not None:
                model = lm.model if lm is not None else _scorer(tensors, plan.model.config)
                decode = Tokenizer.from_json(tokenizer).decode if tokenizer else None
                report["perplexity"] = self._perplexity(ctx, plan, spec, model, decode)
            for index, task in enumerate(plan.tasks, start=1):
                assert lm is not None  # tasks imply a tokenizer, so the scorer was built
                report["tasks"].append(_run_task(ctx, task, lm, spec.get("limit"), index, len(plan.tasks)))
            ctx.raise_if_cancelled()
            client.record_metrics(plan.model.ref, NAMESPACE, recorded_metrics(report))
            report.update(wall_seconds=time.monotonic() - began, tokens_scored=lm.tokens_scored if lm else 0)
            return report
        finally:
            client.close()

    def _perplexity(
        self, ctx: JobContext, plan: EvalPlan, spec: dict[str, Any], model: torch.nn.Module, decode: Any
    ) -> dict[str, Any]:
        assert plan.perplexity is not None
        rows = int(spec["perplexity_batches"]) * EVAL_ROWS_PER_BATCH
        stream = eval_stream(plan.perplexity, split=EVAL_SPLIT, max_tokens=rows * plan.seq_len + 1)
        ctx.progress(
            f"perplexity on {spec['perplexity_dataset']}: {len(stream) - 1} tokens", stage="perplexity"
        )
        result = perplexity(model, stream, seq_len=plan.seq_len, batch_size=8, decode=decode)
        ctx.raise_if_cancelled()
        return {
            "dataset": spec["perplexity_dataset"],
            "perplexity": result.perplexity,
            "loss": result.loss,
            "bits_per_byte": result.bits_per_byte or 0.0,
            "tokens": result.tokens,
            "seq_len": plan.seq_len,
        }


def _scorer(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> torch.nn.Module:
    """The training model over the dequantized weights (what compression measures perplexity with)."""
    return build_model(dequantize_state_dict(tensors), model_config_from_dict(config))


def _run_task(
    ctx: JobContext, task: Any, lm: LocalLM, limit: int | None, index: int, count: int
) -> dict[str, Any]:
    """One task through the harness, with progress events (task i of n, instances done) and cancel."""
    total = len(task.docs[:limit])
    ctx.progress(f"task {index}/{count} {task.name}: 0/{total}", task=task.name, index=index, tasks=count,
                 done=0, total=total)  # fmt: skip

    def on_progress(name: str, done: int, of: int) -> None:
        ctx.progress(f"task {index}/{count} {name}: {done}/{of}", task=name, index=index, tasks=count,
                     done=done, total=of)  # fmt: skip
        ctx.raise_if_cancelled()

    result = evaluate_task(task, lm, limit=limit, progress=on_progress)
    scores = " ".join(f"{k}={v:.4g}" for k, v in sorted(result.metrics.items()))
    ctx.log(f"task {index}/{count} {task.name}: {scores}")
    return result.to_dict()


def recorded_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The report as the keys stored with the version (under NAMESPACE)."""
    out = {
        f"{report['suite']}/{t['task']}/{metric}": float(value)
        for t in report["tasks"]
        for metric, value in t["metrics"].items()
    }
    ppl = report.get("perplexity")
    if ppl:
        for metric in ("perplexity", "loss", "bits_per_byte"):
            if metric != "bits_per_byte" or ppl[metric]:
                out[f"perplexity/{ppl['dataset']}/{metric}"] = float(ppl[metric])
    return out
