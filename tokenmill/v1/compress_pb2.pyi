from tokenmill.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitCompressRequest(_message.Message):
    __slots__ = ("idempotency_key", "source", "output_name", "method", "group_size", "sparsity", "rank_fraction", "calibration_dataset", "calibration_samples", "eval_dataset", "eval_batches", "student_preset", "distill_steps")
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    SPARSITY_FIELD_NUMBER: _ClassVar[int]
    RANK_FRACTION_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_DATASET_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    EVAL_DATASET_FIELD_NUMBER: _ClassVar[int]
    EVAL_BATCHES_FIELD_NUMBER: _ClassVar[int]
    STUDENT_PRESET_FIELD_NUMBER: _ClassVar[int]
    DISTILL_STEPS_FIELD_NUMBER: _ClassVar[int]
    idempotency_key: str
    source: str
    output_name: str
    method: str
    group_size: int
    sparsity: float
    rank_fraction: float
    calibration_dataset: str
    calibration_samples: int
    eval_dataset: str
    eval_batches: int
    student_preset: str
    distill_steps: int
    def __init__(self, idempotency_key: _Optional[str] = ..., source: _Optional[str] = ..., output_name: _Optional[str] = ..., method: _Optional[str] = ..., group_size: _Optional[int] = ..., sparsity: _Optional[float] = ..., rank_fraction: _Optional[float] = ..., calibration_dataset: _Optional[str] = ..., calibration_samples: _Optional[int] = ..., eval_dataset: _Optional[str] = ..., eval_batches: _Optional[int] = ..., student_preset: _Optional[str] = ..., distill_steps: _Optional[int] = ...) -> None: ...

class CompressionReport(_message.Message):
    __slots__ = ("bytes_before", "bytes_after", "ratio", "perplexity_before", "perplexity_after", "tokens_per_second_before", "tokens_per_second_after")
    BYTES_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BYTES_AFTER_FIELD_NUMBER: _ClassVar[int]
    RATIO_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_BEFORE_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_AFTER_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_BEFORE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_AFTER_FIELD_NUMBER: _ClassVar[int]
    bytes_before: int
    bytes_after: int
    ratio: float
    perplexity_before: float
    perplexity_after: float
    tokens_per_second_before: float
    tokens_per_second_after: float
    def __init__(self, bytes_before: _Optional[int] = ..., bytes_after: _Optional[int] = ..., ratio: _Optional[float] = ..., perplexity_before: _Optional[float] = ..., perplexity_after: _Optional[float] = ..., tokens_per_second_before: _Optional[float] = ..., tokens_per_second_after: _Optional[float] = ...) -> None: ...
