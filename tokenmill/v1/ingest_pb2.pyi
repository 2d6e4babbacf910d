import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from tokenmill.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitIngestRequest(_message.Message):
    __slots__ = ("idempotency_key", "name", "sources", "preset", "text_field", "include_globs", "exclude_globs", "vocab_size", "tokenizer", "val_fraction", "seed", "filter_overrides", "skip_near_dedup", "near_dup_threshold", "num_workers", "language_threshold", "max_documents", "minhash_bands", "minhash_rows", "minhash_ngram", "minhash_hash_family", "minhash_word_split", "dedup_backend", "skip_pii", "batch_size", "max_doc_bytes", "max_tokens_per_shard")
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_GLOBS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_GLOBS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    VAL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FILTER_OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    SKIP_NEAR_DEDUP_FIELD_NUMBER: _ClassVar[int]
    NEAR_DUP_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    MINHASH_BANDS_FIELD_NUMBER: _ClassVar[int]
    MINHASH_ROWS_FIELD_NUMBER: _ClassVar[int]
    MINHASH_NGRAM_FIELD_NUMBER: _ClassVar[int]
    MINHASH_HASH_FAMILY_FIELD_NUMBER: _ClassVar[int]
    MINHASH_WORD_SPLIT_FIELD_NUMBER: _ClassVar[int]
    DEDUP_BACKEND_FIELD_NUMBER: _ClassVar[int]
    SKIP_PII_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_DOC_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_SHARD_FIELD_NUMBER: _ClassVar[int]
    idempotency_key: str
    name: str
    sources: _containers.RepeatedScalarFieldContainer[str]
    preset: str
    text_field: str
    include_globs: _containers.RepeatedScalarFieldContainer[str]
    exclude_globs: _containers.RepeatedScalarFieldContainer[str]
    vocab_size: int
    tokenizer: str
    val_fraction: float
    seed: int
    filter_overrides: _struct_pb2.Struct
    skip_near_dedup: bool
    near_dup_threshold: float
    num_workers: int
    language_threshold: float
    max_documents: int
    minhash_bands: int
    minhash_rows: int
    minhash_ngram: int
    minhash_hash_family: str
    minhash_word_split: str
    dedup_backend: str
    skip_pii: bool
    batch_size: int
    max_doc_bytes: int
    max_tokens_per_shard: int
    def __init__(self, idempotency_key: _Optional[str] = ..., name: _Optional[str] = ..., sources: _Optional[_Iterable[str]] = ..., preset: _Optional[str] = ..., text_field: _Optional[str] = ..., include_globs: _Optional[_Iterable[str]] = ..., exclude_globs: _Optional[_Iterable[str]] = ..., vocab_size: _Optional[int] = ..., tokenizer: _Optional[str] = ..., val_fraction: _Optional[float] = ..., seed: _Optional[int] = ..., filter_overrides: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., skip_near_dedup: _Optional[bool] = ..., near_dup_threshold: _Optional[float] = ..., num_workers: _Optional[int] = ..., language_threshold: _Optional[float] = ..., max_documents: _Optional[int] = ..., minhash_bands: _Optional[int] = ..., minhash_rows: _Optional[int] = ..., minhash_ngram: _Optional[int] = ..., minhash_hash_family: _Optional[str] = ..., minhash_word_split: _Optional[str] = ..., dedup_backend: _Optional[str] = ..., skip_pii: _Optional[bool] = ..., batch_size: _Optional[int] = ..., max_doc_bytes: _Optional[int] = ..., max_tokens_per_shard: _Optional[int] = ...) -> None: ...

class StageCount(_message.Message):
    __slots__ = ("stage", "docs_in", "docs_out", "bytes_in", "bytes_out", "reasons")
    class ReasonsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DOCS_IN_FIELD_NUMBER: _ClassVar[int]
    DOCS_OUT_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    docs_in: int
    docs_out: int
    bytes_in: int
    bytes_out: int
    reasons: _containers.ScalarMap[str, int]
    def __init__(self, stage: _Optional[str] = ..., docs_in: _Optional[int] = ..., docs_out: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., reasons: _Optional[_Mapping[str, int]] = ...) -> None: ...

class Dataset(_message.Message):
    __slots__ = ("name", "created_at", "documents", "train_tokens", "val_tokens", "vocab_size", "token_dtype", "stages", "manifest", "uri", "job_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_DTYPE_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    created_at: _timestamp_pb2.Timestamp
    documents: int
    train_tokens: int
    val_tokens: int
    vocab_size: int
    token_dtype: str
    stages: _containers.RepeatedCompositeFieldContainer[StageCount]
    manifest: _struct_pb2.Struct
    uri: str
    job_id: str
    def __init__(self, name: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., documents: _Optional[int] = ..., train_tokens: _Optional[int] = ..., val_tokens: _Optional[int] = ..., vocab_size: _Optional[int] = ..., token_dtype: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[StageCount, _Mapping]]] = ..., manifest: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., uri: _Optional[str] = ..., job_id: _Optional[str] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets", "next_page_token")
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[Dataset]
    next_page_token: str
    def __init__(self, datasets: _Optional[_Iterable[_Union[Dataset, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetDatasetRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteDatasetRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteDatasetResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...
