"""A validated job spec -> what the worker runs: the engine's MethodSpec and the datasets it reads.

`preflight` is every check that needs only the store's manifest and the dataset manifests, so
SubmitCompress can refuse a job that would fail (NOT_FOUND, INVALID_ARGUMENT, FAILED_PRECONDITION)
before it is queued; the worker runs it again (the store may have changed while the job waited).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.common.clients.checkpoint import CheckpointClient
from tokenmill.common.compress import MIN_CALIBRATION_TOKENS, MethodSpec
from tokenmill.common.compress.checks import check_composition, check_shapes, target_linears
from tokenmill.common.errors import InvalidArgument
from tokenmill.services.compress.model_job import (
    MAX_EVAL_SEQ_LEN,
    StoredModel,
    check_dataset,
    dataset_path,
    find_model,
)

# Request method (proto spelling) -> engine settings.
ENGINE_METHODS: dict[str, dict[str, Any]] = {
    "int8": {"method": "int8"},
    "int4_rtn": {"method": "int4-rtn"},
    "int4_gptq": {"method": "int4-gptq"},
    "int4_awq": {"method": "int4-awq"},
    "prune_magnitude": {"method": "prune-magnitude"},
    "prune_wanda": {"method": "prune-wanda"},
    "prune_sparsegpt": {"method": "prune-sparsegpt"},
    "prune_2_4": {"method": "prune-magnitude", "pattern": "2:4"},
    "svd": {"method": "svd"},
}
# prune_2_4's `score` -> the engine method that scores the weights (each keeps 2 of every 4).
TWO_FOUR_SCORES: dict[str, str] = {
    "magnitude": "prune-magnitude",
    "wanda": "prune-wanda",
    "sparsegpt": "prune-sparsegpt",
}
EVAL_SPLIT = "val"
DEFAULT_CALIBRATION_SAMPLES = 128
CALIBRATION_SPLIT = "train"


@dataclass
class Plan:
    model: StoredModel
    step: MethodSpec
    calibration: Path | None
    calibration_seq_len: int
    calibration_rows: int
    eval: Path | None
    eval_seq_len: int


def engine_settings(method: str, score: str = "") -> dict[str, Any]:
    """The engine settings a request method runs with (prune_2_4's score picks the engine method)."""
    body = dict(ENGINE_METHODS[method])
    if method == "prune_2_4" and score:
        body["method"] = TWO_FOUR_SCORES[score]
    return body


def calibration_floor(seq_len: int) -> int:
    """The fewest tokens a calibration split needs: whole `seq_len` rows (the worker reads no
    partial row) holding at least MIN_CALIBRATION_TOKENS, so a split the submit accepts is one
    the engine accepts."""
    return -(-MIN_CALIBRATION_TOKENS // seq_len) * seq_len


def method_spec(spec: dict[str, Any]) -> MethodSpec:
    """The engine step a job spec asks for (settings only where the method reads them)."""
    body = engine_settings(spec["method"], spec.get("score", ""))
    for key in ("group_size", "sparsity", "rank_fraction", "energy", "act_order"):
        if spec.get(key):
            body[key] = spec[key]
    if spec.get("keep_dense"):
        body["keep_dense"] = tuple(spec["keep_dense"])
    return MethodSpec.from_dict(body)


def preflight(client: CheckpointClient, data_dir: str | Path, spec: dict[str, Any]) -> Plan:
    """Everything knowable from manifests, in the order a person would fix it."""
    step = method_spec(spec)
    model = find_model(client, spec["source"])
    meta = model.meta_tensors()
    check_composition([step], meta, model.compression.get("steps", ()))
    check_shapes(step, meta, target_linears(meta, step.keep_dense))
    seq_len = model.eval_window
    calibration = None
    rows = int(spec.get("calibration_samples") or DEFAULT_CALIBRATION_SAMPLES)
    if spec.get("calibration_dataset"):
        if rows * seq_len < MIN_CALIBRATION_TOKENS:
            raise InvalidArgument(
                f"calibration_samples={rows} rows of {seq_len} tokens (this model's window) are "
                f"{rows * seq_len} tokens; {step.method} needs at least {MIN_CALIBRATION_TOKENS}: use "
                f"calibration_samples >= {-(-MIN_CALIBRATION_TOKENS // seq_len)}"
            )
        calibration = dataset_path(data_dir, spec["calibration_dataset"], "calibration_dataset")
        check_dataset(
            calibration,
            model,
            split=CALIBRATION_SPLIT,
            min_tokens=calibration_floor(seq_len),
            field="calibration_dataset",
        )
    evaluation = None
    eval_seq_len = int(spec.get("eval_seq_len") or seq_len)
    if eval_seq_len > seq_len:
        raise InvalidArgument(
            f"eval_seq_len={eval_seq_len} is above {seq_len}, the most this model is evaluated with "
            f"(its context, capped at {MAX_EVAL_SEQ_LEN}); use at most {seq_len}"
        )
    if spec.get("eval_dataset"):
        evaluation = dataset_path(data_dir, spec["eval_dataset"], "eval_dataset")
        check_dataset(evaluation, model, split=EVAL_SPLIT, min_tokens=eval_seq_len + 1, field="eval_dataset")
    return Plan(model, step, calibration, seq_len, rows, evaluation, eval_seq_len)
