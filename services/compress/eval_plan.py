"""SubmitEval's checks: the request's fields (`validate_eval`), then everything knowable from the
store, the datasets and the task files (`eval_preflight`), so a job that would fail is refused with
a precise status before it is queued. The worker runs the preflight again (the store may change).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.common.checkpoint.recorded import check_path
from tokenmill.common.clients.checkpoint import CheckpointClient
from tokenmill.common.errors import FailedPrecondition, InvalidArgument, NotFound
from tokenmill.common.eval.tasks import SUITES, Task, load_suite
from tokenmill.common.names import validate_name
from tokenmill.services.compress.model_job import (
    MAX_EVAL_SEQ_LEN,
    StoredModel,
    check_dataset,
    dataset_path,
    find_model,
)
from tokenmill.services.compress.plan import EVAL_SPLIT
from tokenmill.v1 import compress_pb2

DEFAULT_BATCHES = 8
MAX_BATCHES = 1000
MAX_LIMIT = 100_000
MAX_PASS_K = 100
MAX_TASKS = 100
TOKENIZER = "tokenizer.json"
SUITES_DIR = "eval"  # <data_dir>/eval/<suite>/*.yaml: suites an operator adds


@dataclass
class EvalPlan:
    model: StoredModel
    tasks: list[Task]
    perplexity: Path | None
    seq_len: int


def validate_eval(request: compress_pb2.SubmitEvalRequest, check_source: Any) -> dict[str, Any]:
    """Check every field on its own; return the job spec (defaults filled in, kind "eval")."""
    check_source(request.source)
    if request.tasks and not request.suite:
        raise InvalidArgument("tasks names tasks of a suite, but suite is not set")
    if not request.suite and not request.perplexity_dataset:
        raise InvalidArgument(
            "nothing to evaluate: give suite (e.g. 'python') and/or perplexity_dataset (an ingested dataset)"
        )
    spec: dict[str, Any] = {"kind": "eval", "source": request.source, "suite": request.suite}
    if request.suite:
        validate_name(request.suite, what="suite", field="suite")
    if len(request.tasks) > MAX_TASKS or len(set(request.tasks)) != len(request.tasks):
        raise InvalidArgument(f"tasks must be distinct task names, at most {MAX_TASKS}")
    spec["tasks"] = list(request.tasks)
    if request.perplexity_dataset:
        validate_name(request.perplexity_dataset, what="dataset", field="perplexity_dataset")
        batches = request.perplexity_batches or DEFAULT_BATCHES
        if batches > MAX_BATCHES:
            raise InvalidArgument(f"perplexity_batches={batches} is above the limit of {MAX_BATCHES}")
        spec.update(perplexity_dataset=request.perplexity_dataset, perplexity_batches=batches)
        if request.perplexity_seq_len:
            spec["perplexity_seq_len"] = request.perplexity_seq_len
    elif request.perplexity_batches or request.perplexity_seq_len:
        raise InvalidArgument(
            "perplexity_batches/perplexity_seq_len is set but perplexity_dataset is not; name the dataset"
        )
    if request.HasField("limit"):
        if not 1 <= request.limit <= MAX_LIMIT:
            raise InvalidArgument(
                f"limit={request.limit}: give 1 to {MAX_LIMIT} instances per task, or leave it unset for all"
            )
        spec["limit"] = request.limit
    if request.pass_k:
        if any(not 1 <= k <= MAX_PASS_K for k in request.pass_k) or len(set(request.pass_k)) != len(
            request.pass_k
        ):
            raise InvalidArgument(f"pass_k={list(request.pass_k)}: give distinct k from 1 to {MAX_PASS_K}")
        spec["pass_k"] = sorted(request.pass_k)
    return spec


def suite_dir(data_dir: str | Path, suite: str) -> Path:
    """An operator's suite under <data_dir>/eval/ first, else a shipped one; NOT_FOUND naming both."""
    for root in (Path(data_dir) / SUITES_DIR, SUITES):
        if (root / suite).is_dir():
            return root / suite
    known = sorted({p.name for root in (Path(data_dir) / SUITES_DIR, SUITES) if root.is_dir()
                    for p in root.iterdir() if p.is_dir()})  # fmt: skip
    raise NotFound(
        f"suite {suite!r} not found: use one of {known}, or put lm-eval task files in "
        f"{Path(data_dir) / SUITES_DIR / suite}/"
    )


def select_tasks(spec: dict[str, Any], data_dir: str | Path) -> list[Task]:
    """The suite's tasks (INVALID_ARGUMENT for a bad task file), narrowed to `tasks`, with pass_k."""
    if not spec.get("suite"):
        return []
    tasks = load_suite(suite_dir(data_dir, spec["suite"]))
    for task in tasks:
        try:
            check_path("task name", task.name)
        except InvalidArgument as exc:
            raise InvalidArgument(f"suite {spec['suite']!r}: {exc.message}") from None
    if spec.get("tasks"):
        by_name = {t.name: t for t in tasks}
        unknown = [name for name in spec["tasks"] if name not in by_name]
        if unknown:
            raise NotFound(f"suite {spec['suite']!r} has no task {unknown}; its tasks: {sorted(by_name)}")
        tasks = [by_name[name] for name in spec["tasks"]]
    if spec.get("pass_k"):
        if not any("pass_at_k" in t.metrics for t in tasks):
            raise InvalidArgument(
                f"pass_k applies to code tasks (metric pass_at_k); none of {[t.name for t in tasks]} is one"
            )
        ks = tuple(spec["pass_k"])
        tasks = [dataclasses.replace(t, pass_k=ks) if "pass_at_k" in t.metrics else t for t in tasks]
    return tasks


def eval_preflight(client: CheckpointClient, data_dir: str | Path, spec: dict[str, Any]) -> EvalPlan:
    """Model, tasks, tokenizer, dataset: in the order a person would fix them."""
    model = find_model(client, spec["source"])
    tasks = select_tasks(spec, data_dir)
    if tasks and TOKENIZER not in {f.name for f in model.version.manifest.files}:
        raise FailedPrecondition(
            f"checkpoint {model.ref} has no {TOKENIZER}; tasks are text and need the model's tokenizer "
            "(perplexity on a packed dataset does not)"
        )
    limit = model.eval_window
    seq_len = int(spec.get("perplexity_seq_len") or limit)
    if seq_len > limit:
        raise InvalidArgument(
            f"perplexity_seq_len={seq_len} is above {limit}, the most this model is evaluated with "
            f"(its context, capped at {MAX_EVAL_SEQ_LEN})"
        )
    path = None
    if spec.get("perplexity_dataset"):
        path = dataset_path(data_dir, spec["perplexity_dataset"], "perplexity_dataset")
        check_dataset(path, model, split=EVAL_SPLIT, min_tokens=seq_len + 1, field="perplexity_dataset")
    return EvalPlan(model, tasks, path, seq_len)
