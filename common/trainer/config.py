"""TrainConfig: everything a training run needs, as one plain, JSON-serialisable dataclass.

torchtitan style: the config is the whole interface between the coordinator and the workers, so a
job spec, a bench script and a test all build the same object. ``validate()`` turns every mistake a
person can make into an ``InvalidArgument`` naming the field, before any worker process starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tokenmill.common.errors import InvalidArgument
from tokenmill.common.model.transformer import ModelConfig, preset

MODES = ("pretrain", "sft", "lora", "dpo", "distill")
BACKENDS = ("local", "ray", "kubernetes")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")


def run_tag(run_id: str) -> str:
    """The tag on every checkpoint of the job `run_id`: its retries and resumes find them by it."""
    return f"run-{run_id}"


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    dropout: float = 0.0


@dataclass
class TrainConfig:
    # what to train
    mode: str = "pretrain"
    model_preset: str = "test-1m"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    dataset_name: str = ""  # for lineage only
    dataset_path: str = ""  # packed dataset directory (pretrain; also val data for sft/lora if set)
    sft_path: str = ""  # prompt/response JSONL (sft, lora)
    tokenizer_path: str = ""  # tokenizer.json for sft (defaults to the dataset's)
    init_checkpoint: str = ""  # checkpoint ref to start from (weights only)
    dpo_path: str = ""  # prompt/chosen/rejected JSONL (dpo)
    dpo_beta: float = 0.1  # DPO's β: how far the policy may move from the reference
    reference_checkpoint: str = ""  # dpo's frozen reference model; "" = init_checkpoint
    use_lora: bool = False  # dpo: train LoRA adapters on the policy (mode lora always does)
    teacher_checkpoint: str = ""  # distill: the frozen teacher whose logits the student learns
    distill_temperature: float = 2.0  # distill: softmax temperature T of the KL term (scaled by T²)
    distill_alpha: float = 0.0  # distill: weight of the hard-label CE (1 - alpha on the KL term)
    # checkpoint ref of another run to continue (full training state, any world size), used until
    # this run has a checkpoint of its own; set by the service's elastic resume
    resume_from: str = ""
    output_name: str = "model"
    # how to run
    backend: str = "local"
    workers: int = 1
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    # optimisation
    steps: int = 100
    micro_batch_size: int = 8
    seq_len: int = 128
    grad_accum_steps: int = 1
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    # evaluation / checkpoints / logging
    eval_every: int = 0
    eval_batches: int = 4
    checkpoint_every: int = 0
    log_every: int = 1  # also the host-device sync interval on GPU (losses are fetched per window)
    save_final: bool = True  # benchmarks turn the final checkpoint off
    lora: LoraSettings = field(default_factory=LoraSettings)
    memory_budget_bytes: int = 0  # per worker; 0 = device memory (or unchecked on CPU)
    # identity of the job: checkpoints are tagged run-<run_id> so a retried attempt resumes from them;
    # `attempt` (1 = first) is set by the job system, never by the API (the failpoints' context)
    run_id: str = ""
    attempt: int = 1

    # ------------------------------------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        try:
            return preset(self.model_preset, **self.model_overrides)
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"model: {exc}") from None

    @property
    def lora_active(self) -> bool:
        """Whether the policy is LoRA-wrapped (only adapters train; the final checkpoint holds them)."""
        return self.mode == "lora" or (self.mode == "dpo" and self.use_lora)

    @property
    def tokens_per_step(self) -> int:
        return self.workers * self.micro_batch_size * self.seq_len * self.grad_accum_steps

    def validate(self) -> ModelConfig:
        """Check the fields that need no I/O; returns the resolved model config."""
        checks = [
            (self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}"),
            (self.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {self.backend!r}"),
            (self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.workers >= 1, "workers must be >= 1"),
            (self.steps >= 1, "steps must be >= 1"),
            (self.micro_batch_size >= 1, "micro_batch_size must be >= 1"),
            (self.seq_len >= 2, "seq_len must be >= 2"),
            (self.grad_accum_steps >= 1, "grad_accum_steps must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (0 <= self.min_lr <= self.lr, "min_lr must lie in [0, lr]"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.grad_clip >= 0, "grad_clip must be >= 0 (0 disables clipping)"),
            (self.eval_every >= 0 and self.checkpoint_every >= 0, "eval_every/checkpoint_every must be >= 0"),
            (self.eval_batches >= 1, "eval_batches must be >= 1"),
            (bool(self.output_name), "output_name is required (the checkpoint name in the store)"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidArgument(message)
        if self.mode in ("pretrain", "distill") and not self.dataset_path:
            raise InvalidArgument(f"{self.mode} needs a dataset")
        if self.mode in ("sft", "lora") and not self.sft_path:
            raise InvalidArgument(f"{self.mode} needs sft_data (a prompt/response JSONL file)")
        if self.mode == "dpo":
            self._validate_dpo()
        self._validate_distill()
        if self.mode != "dpo" and (self.use_lora or self.reference_checkpoint or self.dpo_path):
            raise InvalidArgument(
                f"dpo_data, reference_checkpoint and use_lora apply to mode dpo, not {self.mode!r} "
                "(LoRA fine-tuning on SFT data is mode lora)"
            )
        if self.lora_active:
            if not self.init_checkpoint:
                raise InvalidArgument(
                    "lora needs init_checkpoint (the base model the adapters are trained on)"
                )
            lo = self.lora
            if lo.rank < 1 or lo.alpha <= 0 or not 0 <= lo.dropout < 1 or not lo.target_modules:
                raise InvalidArgument("lora needs rank >= 1, alpha > 0, 0 <= dropout < 1 and target_modules")
            from tokenmill.common.model.lora import LORA_TARGETS

            unknown = sorted(set(lo.target_modules) - set(LORA_TARGETS))
            if unknown:
                raise InvalidArgument(
                    f"lora target_modules {unknown} unknown; choose from {list(LORA_TARGETS)}"
                )
        model = self.model_config()
        if self.seq_len > model.max_seq_len:
            raise InvalidArgument(
                f"seq_len={self.seq_len} exceeds the model's max_seq_len={model.max_seq_len}; "
                "lower seq_len or override max_seq_len"
            )
        return model

    def _validate_dpo(self) -> None:
        if not self.dpo_path:
            raise InvalidArgument("dpo needs dpo_data (a prompt/chosen/rejected JSONL file)")
        if not self.init_checkpoint:
            raise InvalidArgument(
                "dpo needs init_checkpoint (the fine-tuned model to align; also the default reference)"
            )
        if not self.dpo_beta > 0:  # also rejects NaN
            raise InvalidArgument(f"dpo_beta must be > 0, got {self.dpo_beta}")

    def _validate_distill(self) -> None:
        if self.mode != "distill":
            if self.teacher_checkpoint:
                raise InvalidArgument(f"teacher_checkpoint applies to mode distill, not {self.mode!r}")
            return
        if not self.teacher_checkpoint:
            raise InvalidArgument(
                "distill needs teacher_checkpoint (the model whose logits the student learns)"
            )
        if not self.distill_temperature > 0:  # also rejects NaN
            raise InvalidArgument(f"distill_temperature must be > 0, got {self.distill_temperature}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise InvalidArgument(f"distill_alpha must lie in [0, 1], got {self.distill_alpha}")
        if self.init_checkpoint:
            raise InvalidArgument(
                "distill trains the student preset from scratch; init_checkpoint does not apply "
                "(use model_preset to size the student)"
            )

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidArgument(f"unknown train config field(s) {unknown}")
        data = dict(data)
        if isinstance(data.get("lora"), dict):
            data["lora"] = LoraSettings(**data["lora"])
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(**data)
