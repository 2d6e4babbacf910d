import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ShardInfo(_message.Message):
    __slots__ = ("logical_name", "global_shape", "offsets")
    LOGICAL_NAME_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    logical_name: str
    global_shape: _containers.RepeatedScalarFieldContainer[int]
    offsets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, logical_name: _Optional[str] = ..., global_shape: _Optional[_Iterable[int]] = ..., offsets: _Optional[_Iterable[int]] = ...) -> None: ...

class TensorEntry(_message.Message):
    __slots__ = ("name", "dtype", "shape", "nbytes", "chunks", "shard")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    chunks: _containers.RepeatedScalarFieldContainer[str]
    shard: ShardInfo
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ..., chunks: _Optional[_Iterable[str]] = ..., shard: _Optional[_Union[ShardInfo, _Mapping]] = ...) -> None: ...

class FileEntry(_message.Message):
    __slots__ = ("name", "nbytes", "chunks")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    name: str
    nbytes: int
    chunks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., nbytes: _Optional[int] = ..., chunks: _Optional[_Iterable[str]] = ...) -> None: ...

class Lineage(_message.Message):
    __slots__ = ("parent", "dataset", "job_id")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    parent: str
    dataset: str
    job_id: str
    def __init__(self, parent: _Optional[str] = ..., dataset: _Optional[str] = ..., job_id: _Optional[str] = ...) -> None: ...

class CheckpointManifest(_message.Message):
    __slots__ = ("tensors", "files", "config", "metrics", "lineage", "labels", "chunk_size")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorEntry]
    files: _containers.RepeatedCompositeFieldContainer[FileEntry]
    config: _struct_pb2.Struct
    metrics: _struct_pb2.Struct
    lineage: Lineage
    labels: _containers.ScalarMap[str, str]
    chunk_size: int
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorEntry, _Mapping]]] = ..., files: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ..., config: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., metrics: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., lineage: _Optional[_Union[Lineage, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class BeginUploadRequest(_message.Message):
    __slots__ = ("name", "manifest", "tags", "idempotency_key")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    name: str
    manifest: CheckpointManifest
    tags: _containers.RepeatedScalarFieldContainer[str]
    idempotency_key: str
    def __init__(self, name: _Optional[str] = ..., manifest: _Optional[_Union[CheckpointManifest, _Mapping]] = ..., tags: _Optional[_Iterable[str]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class ExtendUploadRequest(_message.Message):
    __slots__ = ("upload_id", "tensors", "files")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorEntry]
    files: _containers.RepeatedCompositeFieldContainer[FileEntry]
    def __init__(self, upload_id: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorEntry, _Mapping]]] = ..., files: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ...) -> None: ...

class UploadSession(_message.Message):
    __slots__ = ("upload_id", "name", "missing_chunks", "missing_bytes", "total_chunks", "expires_at", "committed_ref")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MISSING_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    MISSING_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_REF_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    name: str
    missing_chunks: _containers.RepeatedScalarFieldContainer[str]
    missing_bytes: int
    total_chunks: int
    expires_at: _timestamp_pb2.Timestamp
    committed_ref: str
    def __init__(self, upload_id: _Optional[str] = ..., name: _Optional[str] = ..., missing_chunks: _Optional[_Iterable[str]] = ..., missing_bytes: _Optional[int] = ..., total_chunks: _Optional[int] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., committed_ref: _Optional[str] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("upload_id", "digest", "data")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    digest: str
    data: bytes
    def __init__(self, upload_id: _Optional[str] = ..., digest: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadChunksResponse(_message.Message):
    __slots__ = ("chunks_received", "bytes_received", "chunks_deduplicated")
    CHUNKS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_DEDUPLICATED_FIELD_NUMBER: _ClassVar[int]
    chunks_received: int
    bytes_received: int
    chunks_deduplicated: int
    def __init__(self, chunks_received: _Optional[int] = ..., bytes_received: _Optional[int] = ..., chunks_deduplicated: _Optional[int] = ...) -> None: ...

class AdoptStagedChunksRequest(_message.Message):
    __slots__ = ("upload_id", "digests")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, upload_id: _Optional[str] = ..., digests: _Optional[_Iterable[str]] = ...) -> None: ...

class GetUploadStatusRequest(_message.Message):
    __slots__ = ("upload_id",)
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    def __init__(self, upload_id: _Optional[str] = ...) -> None: ...

class CommitUploadRequest(_message.Message):
    __slots__ = ("upload_id",)
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    def __init__(self, upload_id: _Optional[str] = ...) -> None: ...

class AbortUploadRequest(_message.Message):
    __slots__ = ("upload_id",)
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    def __init__(self, upload_id: _Optional[str] = ...) -> None: ...

class AbortUploadResponse(_message.Message):
    __slots__ = ("aborted",)
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    aborted: bool
    def __init__(self, aborted: _Optional[bool] = ...) -> None: ...

class CheckpointVersion(_message.Message):
    __slots__ = ("name", "version", "tags", "created_at", "logical_bytes", "new_bytes", "manifest", "ref", "recorded_metrics")
    class RecordedMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    NEW_BYTES_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    RECORDED_METRICS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    created_at: _timestamp_pb2.Timestamp
    logical_bytes: int
    new_bytes: int
    manifest: CheckpointManifest
    ref: str
    recorded_metrics: _containers.ScalarMap[str, float]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., logical_bytes: _Optional[int] = ..., new_bytes: _Optional[int] = ..., manifest: _Optional[_Union[CheckpointManifest, _Mapping]] = ..., ref: _Optional[str] = ..., recorded_metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class GetCheckpointRequest(_message.Message):
    __slots__ = ("ref", "include_manifest")
    REF_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_MANIFEST_FIELD_NUMBER: _ClassVar[int]
    ref: str
    include_manifest: bool
    def __init__(self, ref: _Optional[str] = ..., include_manifest: _Optional[bool] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ("name", "page_size", "page_token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    page_size: int
    page_token: str
    def __init__(self, name: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListCheckpointsResponse(_message.Message):
    __slots__ = ("checkpoints", "next_page_token")
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[CheckpointVersion]
    next_page_token: str
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[CheckpointVersion, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("ref", "tensors", "files", "stream_index", "stream_count")
    REF_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    STREAM_INDEX_FIELD_NUMBER: _ClassVar[int]
    STREAM_COUNT_FIELD_NUMBER: _ClassVar[int]
    ref: str
    tensors: _containers.RepeatedScalarFieldContainer[str]
    files: _containers.RepeatedScalarFieldContainer[str]
    stream_index: int
    stream_count: int
    def __init__(self, ref: _Optional[str] = ..., tensors: _Optional[_Iterable[str]] = ..., files: _Optional[_Iterable[str]] = ..., stream_index: _Optional[int] = ..., stream_count: _Optional[int] = ...) -> None: ...

class DownloadChunk(_message.Message):
    __slots__ = ("entry", "is_file", "index", "offset", "data")
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    IS_FILE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    entry: str
    is_file: bool
    index: int
    offset: int
    data: bytes
    def __init__(self, entry: _Optional[str] = ..., is_file: _Optional[bool] = ..., index: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class SetTagRequest(_message.Message):
    __slots__ = ("ref", "tag")
    REF_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    ref: str
    tag: str
    def __init__(self, ref: _Optional[str] = ..., tag: _Optional[str] = ...) -> None: ...

class RecordMetricsRequest(_message.Message):
    __slots__ = ("ref", "namespace", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REF_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ref: str
    namespace: str
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, ref: _Optional[str] = ..., namespace: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class DeleteTagRequest(_message.Message):
    __slots__ = ("name", "tag")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    name: str
    tag: str
    def __init__(self, name: _Optional[str] = ..., tag: _Optional[str] = ...) -> None: ...

class DeleteTagResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class DeleteCheckpointRequest(_message.Message):
    __slots__ = ("ref", "force")
    REF_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    ref: str
    force: bool
    def __init__(self, ref: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class DeleteCheckpointResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class ApplyRetentionRequest(_message.Message):
    __slots__ = ("name", "keep_last", "keep_tagged", "dry_run")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEEP_LAST_FIELD_NUMBER: _ClassVar[int]
    KEEP_TAGGED_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    name: str
    keep_last: int
    keep_tagged: bool
    dry_run: bool
    def __init__(self, name: _Optional[str] = ..., keep_last: _Optional[int] = ..., keep_tagged: _Optional[bool] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class ApplyRetentionResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted: _Optional[_Iterable[str]] = ...) -> None: ...

class CollectGarbageRequest(_message.Message):
    __slots__ = ("dry_run",)
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    def __init__(self, dry_run: _Optional[bool] = ...) -> None: ...

class CollectGarbageResponse(_message.Message):
    __slots__ = ("chunks_deleted", "bytes_freed")
    CHUNKS_DELETED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    chunks_deleted: int
    bytes_freed: int
    def __init__(self, chunks_deleted: _Optional[int] = ..., bytes_freed: _Optional[int] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("ok", "chunks_checked", "problems")
    OK_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    chunks_checked: int
    problems: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ok: _Optional[bool] = ..., chunks_checked: _Optional[int] = ..., problems: _Optional[_Iterable[str]] = ...) -> None: ...

class GetStoreStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StoreStats(_message.Message):
    __slots__ = ("models", "versions", "chunks", "stored_bytes", "logical_bytes", "backend", "quota")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    models: int
    versions: int
    chunks: int
    stored_bytes: int
    logical_bytes: int
    backend: str
    quota: _struct_pb2.Struct
    def __init__(self, models: _Optional[int] = ..., versions: _Optional[int] = ..., chunks: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., logical_bytes: _Optional[int] = ..., backend: _Optional[str] = ..., quota: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class GetLocalAccessRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LocalAccess(_message.Message):
    __slots__ = ("root", "nonce")
    ROOT_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    root: str
    nonce: str
    def __init__(self, root: _Optional[str] = ..., nonce: _Optional[str] = ...) -> None: ...

class AcquireLeaseRequest(_message.Message):
    __slots__ = ("ref", "holder", "ttl_seconds")
    REF_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ref: str
    holder: str
    ttl_seconds: float
    def __init__(self, ref: _Optional[str] = ..., holder: _Optional[str] = ..., ttl_seconds: _Optional[float] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("lease_id", "ref", "holder", "expires_at")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    ref: str
    holder: str
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, lease_id: _Optional[str] = ..., ref: _Optional[str] = ..., holder: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReleaseLeaseRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class ReleaseLeaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...
