"""Run a task against a model: build the requests lm-eval would build, score them, aggregate."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from tokenmill.common.eval import metrics
from tokenmill.common.eval.lm import GenerationOptions, LanguageModel, Pair
from tokenmill.common.eval.sandbox import SandboxLimits, run_python
from tokenmill.common.eval.tasks import Instance, Task

Progress = Callable[[str, int, int], None]  # (task, done, total)


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]
    documents: int
    seconds: float
    samples: list[dict] = field(default_factory=list)  # per-document detail, for reports

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "metrics": self.metrics,
            "documents": self.documents,
            "seconds": self.seconds,
        }


def encode_pairs(lm: LanguageModel, context: str, continuations: Sequence[str]) -> list[Pair]:
    """lm-eval's split: trailing spaces move to the continuation, which is cut from the whole's ids.
    The context is encoded once for all its continuations."""
    if not context:
        return [([lm.prefix_token_id], lm.encode(c)) for c in continuations]
    stripped = context.rstrip()
    moved = context[len(stripped) :]
    ctx = lm.encode(stripped)
    return [(ctx, lm.encode(stripped + moved + c)[len(ctx) :]) for c in continuations]


def encode_pair(lm: LanguageModel, context: str, continuation: str) -> Pair:
    return encode_pairs(lm, context, [continuation])[0]


def evaluate_task(
    task: Task,
    lm: LanguageModel,
    *,
    limit: int | None = None,
    progress: Progress | None = None,
    sandbox: SandboxLimits | None = None,
) -> TaskResult:
    started = time.perf_counter()
    instances = task.instances(limit)
    if task.output_type == "multiple_choice":
        scores, samples = _multiple_choice(instances, lm)
    elif task.output_type == "loglikelihood":
        scores, samples = _loglikelihood(instances, lm)
    else:
        scores, samples = _generate(task, instances, lm, sandbox or SandboxLimits(), progress)
    if progress:
        progress(task.name, len(instances), len(instances))
    wanted = {k: v for k, v in scores.items() if k in task.metrics or k.startswith("pass@")}
    return TaskResult(task.name, wanted, len(instances), time.perf_counter() - started, samples)


def _multiple_choice(instances: Sequence[Instance], lm: LanguageModel) -> tuple[dict[str, float], list[dict]]:
    pairs = [pair for inst in instances for pair in encode_pairs(lm, inst.context, inst.continuations)]
    lls = [ll for ll, _ in lm.loglikelihood(pairs)]
    per_doc, samples, at = [], [], 0
    for inst in instances:
        mine = lls[at : at + len(inst.choices)]
        at += len(inst.choices)
        per_doc.append(metrics.multiple_choice(mine, inst.choices, inst.target))
        samples.append({"loglikelihoods": mine, "gold": inst.target})
    return {k: float(np.mean([d[k] for d in per_doc])) for k in ("acc", "acc_norm")}, samples


def _loglikelihood(instances: Sequence[Instance], lm: LanguageModel) -> tuple[dict[str, float], list[dict]]:
    results = lm.loglikelihood([encode_pair(lm, inst.context, str(inst.target)) for inst in instances])
    lls = [ll for ll, _ in results]
    scores = {"perplexity": metrics.perplexity_of(lls), "acc": float(np.mean([g for _, g in results]))}
    return scores, [{"loglikelihood": ll, "greedy": g} for ll, g in results]


def _generate(
    task: Task,
    instances: Sequence[Instance],
    lm: LanguageModel,
    limits: SandboxLimits,
    progress: Progress | None,
) -> tuple[dict[str, float], list[dict]]:
    code = "pass_at_k" in task.metrics
    samples = max(task.pass_k) if code else 1
    options = GenerationOptions(
        max_tokens=int(task.generation.get("max_gen_toks", 256)),
        until=tuple(task.generation.get("until", ["\n\n"])),
        temperature=float(task.generation.get("temperature", 0.8 if samples > 1 else 0.0)),
        samples=samples,
    )
    outputs = lm.generate([lm.encode(inst.context) for inst in instances], options)
    scores: dict[str, list[float]] = {}
    details = []
    for i, (inst, texts) in enumerate(zip(instances, outputs, strict=True)):
        if code:
            passed = [run_python(f"{inst.context}{text}\n\n{inst.target}\n", limits).passed for text in texts]
            for k in task.pass_k:
                scores.setdefault(f"pass@{k}", []).append(metrics.pass_at_k(len(passed), sum(passed), k))
            details.append({"completions": texts, "passed": passed})
        else:
            scores.setdefault("exact_match", []).append(metrics.exact_match(texts[0], inst.target))
            details.append({"completion": texts[0]})
        if progress:
            progress(task.name, i + 1, len(instances))
    return {k: float(np.mean(v)) for k, v in scores.items()}, details
