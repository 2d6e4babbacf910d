from google.protobuf import struct_pb2 as _struct_pb2
from tokenmill.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoraConfig(_message.Message):
    __slots__ = ("rank", "alpha", "target_modules", "dropout")
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    rank: int
    alpha: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    dropout: float
    def __init__(self, rank: _Optional[int] = ..., alpha: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., dropout: _Optional[float] = ...) -> None: ...

class SubmitTrainRequest(_message.Message):
    __slots__ = ("idempotency_key", "output_name", "mode", "model_preset", "model_overrides", "dataset", "sft_data", "init_checkpoint", "backend", "workers", "device", "steps", "micro_batch_size", "seq_len", "grad_accum_steps", "lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "eval_every", "eval_batches", "checkpoint_every", "seed", "activation_checkpointing", "compile", "precision", "lora", "memory_budget_bytes", "resume", "dpo_data", "dpo_beta", "reference_checkpoint", "use_lora", "teacher_checkpoint", "distill_temperature", "distill_alpha")
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MODEL_PRESET_FIELD_NUMBER: _ClassVar[int]
    MODEL_OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    SFT_DATA_FIELD_NUMBER: _ClassVar[int]
    INIT_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    GRAD_ACCUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MIN_LR_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    GRAD_CLIP_FIELD_NUMBER: _ClassVar[int]
    EVAL_EVERY_FIELD_NUMBER: _ClassVar[int]
    EVAL_BATCHES_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    COMPILE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    DPO_DATA_FIELD_NUMBER: _ClassVar[int]
    DPO_BETA_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    USE_LORA_FIELD_NUMBER: _ClassVar[int]
    TEACHER_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    DISTILL_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    DISTILL_ALPHA_FIELD_NUMBER: _ClassVar[int]
    idempotency_key: str
    output_name: str
    mode: str
    model_preset: str
    model_overrides: _struct_pb2.Struct
    dataset: str
    sft_data: str
    init_checkpoint: str
    backend: str
    workers: int
    device: str
    steps: int
    micro_batch_size: int
    seq_len: int
    grad_accum_steps: int
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    eval_every: int
    eval_batches: int
    checkpoint_every: int
    seed: int
    activation_checkpointing: bool
    compile: bool
    precision: str
    lora: LoraConfig
    memory_budget_bytes: int
    resume: str
    dpo_data: str
    dpo_beta: float
    reference_checkpoint: str
    use_lora: bool
    teacher_checkpoint: str
    distill_temperature: float
    distill_alpha: float
    def __init__(self, idempotency_key: _Optional[str] = ..., output_name: _Optional[str] = ..., mode: _Optional[str] = ..., model_preset: _Optional[str] = ..., model_overrides: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., dataset: _Optional[str] = ..., sft_data: _Optional[str] = ..., init_checkpoint: _Optional[str] = ..., backend: _Optional[str] = ..., workers: _Optional[int] = ..., device: _Optional[str] = ..., steps: _Optional[int] = ..., micro_batch_size: _Optional[int] = ..., seq_len: _Optional[int] = ..., grad_accum_steps: _Optional[int] = ..., lr: _Optional[float] = ..., min_lr: _Optional[float] = ..., warmup_steps: _Optional[int] = ..., weight_decay: _Optional[float] = ..., grad_clip: _Optional[float] = ..., eval_every: _Optional[int] = ..., eval_batches: _Optional[int] = ..., checkpoint_every: _Optional[int] = ..., seed: _Optional[int] = ..., activation_checkpointing: _Optional[bool] = ..., compile: _Optional[bool] = ..., precision: _Optional[str] = ..., lora: _Optional[_Union[LoraConfig, _Mapping]] = ..., memory_budget_bytes: _Optional[int] = ..., resume: _Optional[str] = ..., dpo_data: _Optional[str] = ..., dpo_beta: _Optional[float] = ..., reference_checkpoint: _Optional[str] = ..., use_lora: _Optional[bool] = ..., teacher_checkpoint: _Optional[str] = ..., distill_temperature: _Optional[float] = ..., distill_alpha: _Optional[float] = ...) -> None: ...

class ValidateTrainResponse(_message.Message):
    __slots__ = ("ok", "parameters", "estimated_bytes_per_worker", "flops_per_token", "warnings")
    OK_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_BYTES_PER_WORKER_FIELD_NUMBER: _ClassVar[int]
    FLOPS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    parameters: int
    estimated_bytes_per_worker: int
    flops_per_token: float
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ok: _Optional[bool] = ..., parameters: _Optional[int] = ..., estimated_bytes_per_worker: _Optional[int] = ..., flops_per_token: _Optional[float] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...
