"""Checkpoint store engine: importable without gRPC, Redis or generated stubs."""

from tokenmill.common.checkpoint.manifest import (
    DEFAULT_CHUNK_SIZE,
    DTYPE_SIZES,
    FileEntry,
    Manifest,
    ShardInfo,
    TensorEntry,
)
from tokenmill.common.checkpoint.records import (
    Lease,
    ReadChunk,
    StoreStats,
    UploadStatus,
    VerifyReport,
    Version,
)
from tokenmill.common.checkpoint.store import CheckpointStore

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DTYPE_SIZES",
    "CheckpointStore",
    "FileEntry",
    "Lease",
    "Manifest",
    "ReadChunk",
    "ShardInfo",
    "StoreStats",
    "TensorEntry",
    "UploadStatus",
    "Version",
    "VerifyReport",
]
