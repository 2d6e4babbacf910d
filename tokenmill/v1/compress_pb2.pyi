from tokenmill.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitCompressRequest(_message.Message):
    __slots__ = ("idempotency_key", "source", "output_name", "method", "group_size", "sparsity", "rank_fraction", "calibration_dataset", "calibration_samples", "eval_dataset", "eval_batches", "student_preset", "distill_steps", "act_order", "keep_dense", "eval_seq_len", "score", "train_dataset", "distill_temperature", "distill_alpha", "energy")
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
    ACT_ORDER_FIELD_NUMBER: _ClassVar[int]
    KEEP_DENSE_FIELD_NUMBER: _ClassVar[int]
    EVAL_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_DATASET_FIELD_NUMBER: _ClassVar[int]
    DISTILL_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    DISTILL_ALPHA_FIELD_NUMBER: _ClassVar[int]
    ENERGY_FIELD_NUMBER: _ClassVar[int]
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
    act_order: bool
    keep_dense: _containers.RepeatedScalarFieldContainer[str]
    eval_seq_len: int
    score: str
    train_dataset: str
    distill_temperature: float
    distill_alpha: float
    energy: float
    def __init__(self, idempotency_key: _Optional[str] = ..., source: _Optional[str] = ..., output_name: _Optional[str] = ..., method: _Optional[str] = ..., group_size: _Optional[int] = ..., sparsity: _Optional[float] = ..., rank_fraction: _Optional[float] = ..., calibration_dataset: _Optional[str] = ..., calibration_samples: _Optional[int] = ..., eval_dataset: _Optional[str] = ..., eval_batches: _Optional[int] = ..., student_preset: _Optional[str] = ..., distill_steps: _Optional[int] = ..., act_order: _Optional[bool] = ..., keep_dense: _Optional[_Iterable[str]] = ..., eval_seq_len: _Optional[int] = ..., score: _Optional[str] = ..., train_dataset: _Optional[str] = ..., distill_temperature: _Optional[float] = ..., distill_alpha: _Optional[float] = ..., energy: _Optional[float] = ...) -> None: ...

class LayerError(_message.Message):
    __slots__ = ("layer", "method", "error")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    layer: str
    method: str
    error: float
    def __init__(self, layer: _Optional[str] = ..., method: _Optional[str] = ..., error: _Optional[float] = ...) -> None: ...

class CompressionReport(_message.Message):
    __slots__ = ("bytes_before", "bytes_after", "ratio", "perplexity_before", "perplexity_after", "tokens_per_second_before", "tokens_per_second_after", "sparsity", "wall_seconds", "per_layer_errors", "source", "output", "method", "compress_seconds", "eval_dataset", "notes")
    BYTES_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BYTES_AFTER_FIELD_NUMBER: _ClassVar[int]
    RATIO_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_BEFORE_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_AFTER_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_BEFORE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_AFTER_FIELD_NUMBER: _ClassVar[int]
    SPARSITY_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PER_LAYER_ERRORS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    COMPRESS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EVAL_DATASET_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    bytes_before: int
    bytes_after: int
    ratio: float
    perplexity_before: float
    perplexity_after: float
    tokens_per_second_before: float
    tokens_per_second_after: float
    sparsity: float
    wall_seconds: float
    per_layer_errors: _containers.RepeatedCompositeFieldContainer[LayerError]
    source: str
    output: str
    method: str
    compress_seconds: float
    eval_dataset: str
    notes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, bytes_before: _Optional[int] = ..., bytes_after: _Optional[int] = ..., ratio: _Optional[float] = ..., perplexity_before: _Optional[float] = ..., perplexity_after: _Optional[float] = ..., tokens_per_second_before: _Optional[float] = ..., tokens_per_second_after: _Optional[float] = ..., sparsity: _Optional[float] = ..., wall_seconds: _Optional[float] = ..., per_layer_errors: _Optional[_Iterable[_Union[LayerError, _Mapping]]] = ..., source: _Optional[str] = ..., output: _Optional[str] = ..., method: _Optional[str] = ..., compress_seconds: _Optional[float] = ..., eval_dataset: _Optional[str] = ..., notes: _Optional[_Iterable[str]] = ...) -> None: ...

class SubmitEvalRequest(_message.Message):
    __slots__ = ("idempotency_key", "source", "suite", "tasks", "perplexity_dataset", "perplexity_batches", "perplexity_seq_len", "limit", "pass_k")
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SUITE_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_DATASET_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_BATCHES_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PASS_K_FIELD_NUMBER: _ClassVar[int]
    idempotency_key: str
    source: str
    suite: str
    tasks: _containers.RepeatedScalarFieldContainer[str]
    perplexity_dataset: str
    perplexity_batches: int
    perplexity_seq_len: int
    limit: int
    pass_k: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, idempotency_key: _Optional[str] = ..., source: _Optional[str] = ..., suite: _Optional[str] = ..., tasks: _Optional[_Iterable[str]] = ..., perplexity_dataset: _Optional[str] = ..., perplexity_batches: _Optional[int] = ..., perplexity_seq_len: _Optional[int] = ..., limit: _Optional[int] = ..., pass_k: _Optional[_Iterable[int]] = ...) -> None: ...

class EvalTaskResult(_message.Message):
    __slots__ = ("task", "metrics", "documents", "seconds")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TASK_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    task: str
    metrics: _containers.ScalarMap[str, float]
    documents: int
    seconds: float
    def __init__(self, task: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., documents: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class EvalPerplexity(_message.Message):
    __slots__ = ("dataset", "perplexity", "loss", "bits_per_byte", "tokens", "seq_len")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    BITS_PER_BYTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    perplexity: float
    loss: float
    bits_per_byte: float
    tokens: int
    seq_len: int
    def __init__(self, dataset: _Optional[str] = ..., perplexity: _Optional[float] = ..., loss: _Optional[float] = ..., bits_per_byte: _Optional[float] = ..., tokens: _Optional[int] = ..., seq_len: _Optional[int] = ...) -> None: ...

class EvalReport(_message.Message):
    __slots__ = ("source", "suite", "tasks", "perplexity", "wall_seconds", "tokens_scored")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SUITE_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SCORED_FIELD_NUMBER: _ClassVar[int]
    source: str
    suite: str
    tasks: _containers.RepeatedCompositeFieldContainer[EvalTaskResult]
    perplexity: EvalPerplexity
    wall_seconds: float
    tokens_scored: int
    def __init__(self, source: _Optional[str] = ..., suite: _Optional[str] = ..., tasks: _Optional[_Iterable[_Union[EvalTaskResult, _Mapping]]] = ..., perplexity: _Optional[_Union[EvalPerplexity, _Mapping]] = ..., wall_seconds: _Optional[float] = ..., tokens_scored: _Optional[int] = ...) -> None: ...
