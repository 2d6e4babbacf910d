"""Turn a SubmitTrain request (as a JSON spec) into a validated TrainConfig, before any worker starts.

Every check that can fail without running anything happens here, so a bad job is rejected at
submit time with a precise status: unknown dataset / checkpoint / SFT file -> NOT_FOUND; a model the
tokenizer does not fit, heads that do not divide the hidden size, a batch that cannot fit the memory
budget -> INVALID_ARGUMENT. The job handler runs it again at start (the world may have changed).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.common.data.dataset import read_manifest
from tokenmill.common.errors import FailedPrecondition, InvalidArgument, NotFound
from tokenmill.common.inputs import check_input_allowed
from tokenmill.common.model.transformer import ModelConfig
from tokenmill.common.names import validate_name
from tokenmill.common.trainer.checkpoint_io import CheckpointIO
from tokenmill.common.trainer.config import LoraSettings, TrainConfig
from tokenmill.common.trainer.distill import student_config, teacher_config
from tokenmill.common.trainer.metrics import estimate_bytes_per_worker
from tokenmill.common.trainer.preference import check_reference, read_preference_jsonl
from tokenmill.common.trainer.worker import resolve_model_config

# SubmitTrainRequest field -> TrainConfig field (same meaning); zero/empty means "use the default".
DIRECT_FIELDS = (
    "mode", "model_preset", "backend", "workers", "device", "steps", "micro_batch_size", "seq_len",
    "grad_accum_steps", "lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "eval_every",
    "eval_batches", "checkpoint_every", "seed", "activation_checkpointing", "compile", "precision",
    "memory_budget_bytes",
)  # fmt: skip


FLOAT_FIELDS = ("lr", "min_lr", "weight_decay", "grad_clip")


def _finite(name: str, value: Any) -> float:
    """A float hyperparameter as a finite float. The spec is JSON, where NaN and infinity arrive as
    the strings "NaN" / "Infinity": a later comparison would raise TypeError, not say which field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass
class Plan:
    config: TrainConfig
    model: ModelConfig
    parameters: int
    trainable_parameters: int
    estimated_bytes_per_worker: int
    budget_bytes: int
    flops_per_token: float
    warnings: list[str] = field(default_factory=list)


def default_budget(device: str, workers: int) -> int:
    """Per-worker memory when the request gives none: the GPU's memory, or this host's RAM / workers."""
    try:
        import torch

        if device in ("cuda", "auto") and torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory)
    except ImportError:  # pragma: no cover
        pass
    import psutil

    return int(psutil.virtual_memory().total // max(1, workers))


class Planner:
    """`input_roots` (config.input_roots) limits where client-named files (sft_data) may be read."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        io: CheckpointIO | None,
        input_roots: Sequence[str] = (),
        max_workers: int = 64,
    ):
        self.data_dir = Path(data_dir)
        self.io = io
        self.input_roots = list(input_roots)
        self.max_workers = max_workers

    def dataset_path(self, name: str) -> Path:
        validate_name(name, what="dataset", field="dataset")
        path = self.data_dir / "datasets" / name
        if not (path / "manifest.json").is_file():
            raise NotFound(f"dataset {name!r} not found; list datasets with 'tokenmill data list'")
        return path

    def sft_path(self, value: str, field: str = "sft_data") -> Path:
        """A relative path is taken under data_dir; the result is resolved (symlinks, '..') and must
        lie under input_roots, checked before existence so nothing about other locations leaks."""
        p = Path(value)
        if not p.is_absolute():
            p = self.data_dir / p
        p = Path(check_input_allowed(str(p), self.input_roots, what=field))
        if not p.is_file():
            kind = "SFT data" if field == "sft_data" else "preference data"
            fmt = "prompt/response" if field == "sft_data" else "prompt/chosen/rejected"
            raise NotFound(f"{kind} {value!r} not found (looked at {p}); give a {fmt} JSONL file")
        return p

    def plan(self, spec: dict[str, Any]) -> Plan:
        cfg = self.to_config(spec)
        model = cfg.validate()
        if cfg.init_checkpoint and cfg.mode != "distill":  # the checkpoint's model, as the workers build it
            model = resolve_model_config(cfg, self.io)
        vocab = self._data_vocab(cfg)
        warnings: list[str] = []
        teacher_bytes = 0
        if cfg.mode == "distill":
            model, teacher_bytes = self._plan_student(cfg, vocab)
        elif vocab and not cfg.init_checkpoint and "vocab_size" not in cfg.model_overrides:
            # From scratch, the tokenizer defines the vocabulary: size the embedding to it (padded to a
            # multiple of 64 for matmul efficiency) unless the request pinned vocab_size explicitly.
            padded = -(-vocab // 64) * 64
            if padded != model.vocab_size:
                warnings.append(f"vocab_size set to {padded} from the tokenizer's {vocab} tokens")
                cfg.model_overrides = {**cfg.model_overrides, "vocab_size": padded}
                model = cfg.validate()
        if vocab and vocab > model.vocab_size:
            raise InvalidArgument(
                f"vocab mismatch: the tokenizer has {vocab} tokens but the model's vocab_size is "
                f'{model.vocab_size}; set model_overrides {{"vocab_size": {vocab}}} or more'
            )
        if cfg.resume_from:
            self._check_resume_shape(cfg.resume_from, model)
        if cfg.mode == "dpo":
            read_preference_jsonl(cfg.dpo_path)  # a bad line is rejected now, not after workers start
            check_reference(self.io, cfg.reference_checkpoint or cfg.init_checkpoint, model)
        total = model.num_params()
        trainable = total
        if cfg.lora_active:
            per_target = {
                "q_proj": (model.hidden_size, model.num_heads * model.dim_head),
                "k_proj": (model.hidden_size, model.num_kv_heads * model.dim_head),
                "v_proj": (model.hidden_size, model.num_kv_heads * model.dim_head),
                "o_proj": (model.num_heads * model.dim_head, model.hidden_size),
                "gate_proj": (model.hidden_size, model.intermediate_size),
                "up_proj": (model.hidden_size, model.intermediate_size),
                "down_proj": (model.intermediate_size, model.hidden_size),
            }
            trainable = sum(
                cfg.lora.rank * (a + b) * model.num_layers
                for t, (a, b) in per_target.items()
                if t in cfg.lora.target_modules
            )
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cfg.device == "cuda")
        estimate = estimate_bytes_per_worker(
            model,
            workers=cfg.workers,
            micro_batch_size=cfg.micro_batch_size * (2 if cfg.mode == "dpo" else 1),  # chosen + rejected
            seq_len=cfg.seq_len,
            bf16=bf16,
            activation_checkpointing=cfg.activation_checkpointing,
            trainable_fraction=trainable / max(1, total),
        )
        estimate += teacher_bytes  # a distillation teacher is held whole (fp32) on every worker
        budget = cfg.memory_budget_bytes or default_budget(cfg.device, cfg.workers)
        if estimate > budget:
            raise InvalidArgument(
                f"micro_batch_size={cfg.micro_batch_size} x seq_len={cfg.seq_len} needs about "
                f"{estimate / 2**30:.2f} GiB per worker, over the {budget / 2**30:.2f} GiB budget; lower "
                "micro_batch_size (raise grad_accum_steps to keep the batch), enable activation_checkpointing "
                "or add workers"
            )
        return Plan(
            cfg, model, total, trainable, estimate, budget, model.flops_per_token(cfg.seq_len), warnings
        )

    def _plan_student(self, cfg: TrainConfig, data_vocab: int) -> tuple[ModelConfig, int]:
        """The student's config (the teacher's vocabulary) and the teacher's weight bytes; the
        teacher ref is pinned to its version so every attempt and resume learns from the same one."""
        student = student_config(cfg, self.io)  # NOT_FOUND teacher, FAILED_PRECONDITION vocab/seq_len
        assert self.io is not None
        cfg.teacher_checkpoint = self.io.resolve(cfg.teacher_checkpoint) or cfg.teacher_checkpoint
        if data_vocab > student.vocab_size:
            raise FailedPrecondition(
                f"dataset {cfg.dataset_name!r} was tokenized with {data_vocab} tokens but teacher "
                f"{cfg.teacher_checkpoint} has vocab_size {student.vocab_size}; distil on a dataset built "
                "with the teacher's tokenizer"
            )
        teacher = teacher_config(self.io, cfg.teacher_checkpoint)
        return student, teacher.num_params() * 4

    def _check_resume_shape(self, ref: str, model: ModelConfig) -> None:
        """The checkpoint a run continues must hold the model the spec describes, field for field."""
        if self.io is None or self.io.resolve(ref) is None:
            raise NotFound(
                f"checkpoint {ref!r} to resume from not found; list them with 'tokenmill ckpt list'"
            )
        saved = ModelConfig.from_hf_config(
            json.loads(self.io.read_files(ref, ["config.json"])["config.json"])
        )
        differ = {k: (v, getattr(model, k)) for k, v in vars(saved).items() if getattr(model, k) != v}
        if differ:
            what = ", ".join(f"{k}={a} (requested {b})" for k, (a, b) in sorted(differ.items()))
            raise InvalidArgument(
                f"checkpoint {ref} holds a model of another shape: {what}; resume it without "
                "model_preset/model_overrides, or start a new run"
            )

    def _check_workers(self, spec: dict[str, Any]) -> None:
        """An explicitly given worker count lies in [1, trainer.max_workers]."""
        if "workers" not in spec:
            return
        workers = spec["workers"]
        if isinstance(workers, bool) or not isinstance(workers, (int, str)) or not str(workers).isdigit():
            raise InvalidArgument(f"workers must be a whole number, got {workers!r}")
        if not 1 <= int(workers) <= self.max_workers:
            raise InvalidArgument(
                f"workers={workers} is outside [1, {self.max_workers}] (this trainer's limit, "
                "trainer.max_workers)"
            )

    def _data_vocab(self, cfg: TrainConfig) -> int:
        if cfg.dataset_path:
            return int(read_manifest(cfg.dataset_path).get("vocab_size", 0))
        if cfg.mode in ("sft", "lora", "dpo") and cfg.init_checkpoint and self.io is not None:
            try:
                raw = self.io.read_files(cfg.init_checkpoint, ["tokenizer.json"])["tokenizer.json"]
            except NotFound:
                raise InvalidArgument(
                    f"checkpoint {cfg.init_checkpoint!r} carries no tokenizer.json; pass the dataset it was "
                    f"trained on so the {cfg.mode} data can be tokenized"
                ) from None
            from tokenizers import Tokenizer

            return Tokenizer.from_str(raw.decode()).get_vocab_size()
        return 0

    def to_config(self, spec: dict[str, Any]) -> TrainConfig:
        """Spec (SubmitTrainRequest as JSON, proto field names) -> TrainConfig with resolved paths."""
        self._check_workers(spec)
        values: dict[str, Any] = {}
        for name in DIRECT_FIELDS:
            v = spec.get(name)
            if v not in (None, "", 0, 0.0, False):
                values[name] = v
        for name in ("workers", "steps", "micro_batch_size", "seq_len", "grad_accum_steps", "warmup_steps",
                     "eval_every", "eval_batches", "checkpoint_every", "seed", "memory_budget_bytes"):  # fmt: skip
            if name in values:
                values[name] = int(values[name])
        for name in FLOAT_FIELDS:
            if name in values:
                values[name] = _finite(name, values[name])
        if "min_lr" not in values and "lr" in values:
            values["min_lr"] = float(values["lr"]) / 10
        overrides = spec.get("model_overrides") or {}
        if not isinstance(overrides, dict):
            raise InvalidArgument("model_overrides must be an object of ModelConfig fields")
        values["model_overrides"] = {
            k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in overrides.items()
        }
        output = spec.get("output_name", "")
        validate_name(output, what="checkpoint", field="output_name")
        values["output_name"] = output
        if spec.get("dataset"):
            values["dataset_name"] = spec["dataset"]
            values["dataset_path"] = str(self.dataset_path(spec["dataset"]))
        if spec.get("sft_data"):
            values["sft_path"] = str(self.sft_path(spec["sft_data"]))
        if spec.get("dpo_data"):
            values["dpo_path"] = str(self.sft_path(spec["dpo_data"], field="dpo_data"))
        if "dpo_beta" in spec:  # proto3 optional: an explicit 0 arrives and is rejected by validate()
            values["dpo_beta"] = _finite("dpo_beta", spec["dpo_beta"])
        if "distill_temperature" in spec:  # proto3 optional: an explicit 0 is rejected by validate()
            values["distill_temperature"] = _finite("distill_temperature", spec["distill_temperature"])
        if "distill_alpha" in spec:
            values["distill_alpha"] = _finite("distill_alpha", spec["distill_alpha"])
        if spec.get("use_lora"):
            values["use_lora"] = True
        for name in ("init_checkpoint", "resume_from", "reference_checkpoint", "teacher_checkpoint"):
            if spec.get(name):
                values[name] = spec[name]
        lora = spec.get("lora") or {}
        if lora:
            values["lora"] = LoraSettings(
                rank=int(lora.get("rank") or 8),
                alpha=float(lora.get("alpha") or 16.0),
                target_modules=list(lora.get("target_modules") or ["q_proj", "v_proj"]),
                dropout=float(lora.get("dropout") or 0.0),
            )
        try:
            cfg = TrainConfig(**values)
        except TypeError as exc:
            raise InvalidArgument(f"bad train request: {exc}") from None
        if cfg.mode in ("pretrain", "distill") and not spec.get("dataset"):
            raise InvalidArgument(f"{cfg.mode} needs 'dataset' (an ingested dataset name)")
        return cfg
