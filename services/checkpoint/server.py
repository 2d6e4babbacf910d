"""CheckpointService: a thin gRPC wrapper over the store engine (common/checkpoint).

Every handler validates, delegates to `CheckpointStore` and converts; domain errors raised by the
engine become precise statuses in the runtime's error interceptor. Run with
`python -m tokenmill.services.checkpoint [--config PATH]`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

from tokenmill.common.checkpoint.format import (
    RawDownloadChunk,
    decode_upload_chunk,
    encode_download_chunk,
    tune_malloc,
)
from tokenmill.common.checkpoint.store import CheckpointStore
from tokenmill.common.config import Config
from tokenmill.common.errors import InvalidArgument
from tokenmill.common.runtime import ReadyCheck, ServiceApp, run_service
from tokenmill.common.runtime.codec import RawCodec, servicer_adder
from tokenmill.services.checkpoint.convert import (
    dict_to_struct,
    file_from_proto,
    lease_to_proto,
    manifest_from_proto,
    session_to_proto,
    tensor_from_proto,
    version_to_proto,
)
from tokenmill.v1 import checkpoint_pb2 as pb
from tokenmill.v1 import checkpoint_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CheckpointService"].full_name
QUOTA_ENV = "TOKENMILL_CHECKPOINT_QUOTA_BYTES"
MAX_PAGE = 1000
CHUNK_HEADROOM = 64 << 10  # bytes of a chunk message that are not chunk data (ids, digest, framing)


class CheckpointServicer(pb_grpc.CheckpointServiceServicer):
    def __init__(self, store: CheckpointStore, max_message_bytes: int = 8 << 20):
        self.store = store
        self.max_message_bytes = max_message_bytes

    def _check_chunk_size(self, chunk_size: int) -> None:
        """A chunk travels in one message, so it must fit the server's message limit."""
        if chunk_size and chunk_size + CHUNK_HEADROOM > self.max_message_bytes:
            raise InvalidArgument(
                f"chunk_size {chunk_size} does not fit this server's message limit of {self.max_message_bytes} "
                f"bytes (keep it at most {self.max_message_bytes - CHUNK_HEADROOM})"
            )

    # -- uploads ---------------------------------------------------------------------------------
    def BeginUpload(self, request: pb.BeginUploadRequest, context) -> pb.UploadSession:
        self._check_chunk_size(request.manifest.chunk_size)
        status = self.store.begin_upload(
            request.name,
            manifest_from_proto(request.manifest),
            tags=list(request.tags),
            idempotency_key=request.idempotency_key,
        )
        return session_to_proto(status)

    def ExtendUpload(self, request: pb.ExtendUploadRequest, context) -> pb.UploadSession:
        status = self.store.extend_upload(
            request.upload_id,
            [tensor_from_proto(t) for t in request.tensors],
            [file_from_proto(f) for f in request.files],
        )
        return session_to_proto(status)

    def UploadChunks(self, request_iterator: Iterator[pb.UploadChunk], context) -> pb.UploadChunksResponse:
        upload_id = ""
        received = dedup = 0
        nbytes = 0
        for msg in request_iterator:
            if not upload_id:
                if not msg.upload_id:
                    raise InvalidArgument("the first UploadChunk message must carry upload_id")
                upload_id = msg.upload_id
            elif msg.upload_id and msg.upload_id != upload_id:
                raise InvalidArgument(
                    f"one UploadChunks stream serves one upload; got {msg.upload_id!r} after {upload_id!r}"
                )
            if self.store.put_chunk(upload_id, msg.digest, msg.data):
                received += 1
                nbytes += len(msg.data)
            else:
                dedup += 1
        return pb.UploadChunksResponse(
            chunks_received=received, bytes_received=nbytes, chunks_deduplicated=dedup
        )

    def AdoptStagedChunks(self, request: pb.AdoptStagedChunksRequest, context) -> pb.UploadChunksResponse:
        received, nbytes, dedup = self.store.adopt_staged(request.upload_id, list(request.digests))
        return pb.UploadChunksResponse(
            chunks_received=received, bytes_received=nbytes, chunks_deduplicated=dedup
        )

    def GetUploadStatus(self, request: pb.GetUploadStatusRequest, context) -> pb.UploadSession:
        return session_to_proto(self.store.upload_status(request.upload_id))

    def CommitUpload(self, request: pb.CommitUploadRequest, context) -> pb.CheckpointVersion:
        return version_to_proto(self.store.commit(request.upload_id))

    def AbortUpload(self, request: pb.AbortUploadRequest, context) -> pb.AbortUploadResponse:
        return pb.AbortUploadResponse(aborted=self.store.abort(request.upload_id))

    # -- reading ---------------------------------------------------------------------------------
    def GetCheckpoint(self, request: pb.GetCheckpointRequest, context) -> pb.CheckpointVersion:
        return version_to_proto(self.store.get(request.ref), include_manifest=request.include_manifest)

    def ListCheckpoints(self, request: pb.ListCheckpointsRequest, context) -> pb.ListCheckpointsResponse:
        page_size = request.page_size or 100
        if page_size > MAX_PAGE:
            raise InvalidArgument(f"page_size {page_size} is above the limit of {MAX_PAGE}")
        start = 0
        if request.page_token:
            if not request.page_token.isdigit():
                raise InvalidArgument(
                    f"invalid page_token {request.page_token!r}; pass the one a previous page returned"
                )
            start = int(request.page_token)
        versions = self.store.list(request.name)
        page = versions[start : start + page_size]
        more = start + page_size < len(versions)
        return pb.ListCheckpointsResponse(
            checkpoints=[version_to_proto(v) for v in page],
            next_page_token=str(start + page_size) if more else "",
        )

    def Download(self, request: pb.DownloadRequest, context) -> Iterator[RawDownloadChunk]:
        chunks = self.store.read(
            request.ref,
            list(request.tensors),
            list(request.files),
            stream_index=request.stream_index,
            stream_count=request.stream_count or 1,
        )
        for c in chunks:
            # serialised by encode_download_chunk: one copy of the bytes, plain protobuf on the wire
            yield RawDownloadChunk(c.entry, c.is_file, c.index, c.offset, c.data)

    # -- management ------------------------------------------------------------------------------
    def SetTag(self, request: pb.SetTagRequest, context) -> pb.CheckpointVersion:
        return version_to_proto(self.store.set_tag(request.ref, request.tag))

    def RecordMetrics(self, request: pb.RecordMetricsRequest, context) -> pb.CheckpointVersion:
        version = self.store.record_metrics(request.ref, request.namespace, dict(request.metrics))
        return version_to_proto(version)

    def DeleteTag(self, request: pb.DeleteTagRequest, context) -> pb.DeleteTagResponse:
        return pb.DeleteTagResponse(deleted=self.store.delete_tag(request.name, request.tag))

    def DeleteCheckpoint(self, request: pb.DeleteCheckpointRequest, context) -> pb.DeleteCheckpointResponse:
        return pb.DeleteCheckpointResponse(deleted=self.store.delete(request.ref, force=request.force))

    def ApplyRetention(self, request: pb.ApplyRetentionRequest, context) -> pb.ApplyRetentionResponse:
        deleted = self.store.apply_retention(
            request.name, request.keep_last, keep_tagged=request.keep_tagged, dry_run=request.dry_run
        )
        return pb.ApplyRetentionResponse(deleted=deleted)

    def CollectGarbage(self, request: pb.CollectGarbageRequest, context) -> pb.CollectGarbageResponse:
        chunks, freed = self.store.collect_garbage(dry_run=request.dry_run)
        return pb.CollectGarbageResponse(chunks_deleted=chunks, bytes_freed=freed)

    def Verify(self, request: pb.VerifyRequest, context) -> pb.VerifyResponse:
        report = self.store.verify(request.ref)
        return pb.VerifyResponse(ok=report.ok, chunks_checked=report.chunks_checked, problems=report.problems)

    def GetStoreStats(self, request: pb.GetStoreStatsRequest, context) -> pb.StoreStats:
        s = self.store.stats()
        return pb.StoreStats(
            models=s.models,
            versions=s.versions,
            chunks=s.chunks,
            stored_bytes=s.stored_bytes,
            logical_bytes=s.logical_bytes,
            backend=s.backend,
            quota=dict_to_struct({"bytes": s.quota_bytes} if s.quota_bytes else {}),
        )

    def AcquireLease(self, request: pb.AcquireLeaseRequest, context) -> pb.Lease:
        return lease_to_proto(self.store.acquire_lease(request.ref, request.holder, request.ttl_seconds))

    def ReleaseLease(self, request: pb.ReleaseLeaseRequest, context) -> pb.ReleaseLeaseResponse:
        return pb.ReleaseLeaseResponse(released=self.store.release_lease(request.lease_id))

    def GetLocalAccess(self, request: pb.GetLocalAccessRequest, context) -> pb.LocalAccess:
        root, nonce = self.store.local_access()
        return pb.LocalAccess(root=root, nonce=nonce)


# Every RPC of the proto, with the zero-copy codecs for the two bulk messages (same wire format;
# see the raw wire codec in common/checkpoint/format.py).
add_checkpoint_servicer = servicer_adder(
    pb.DESCRIPTOR.services_by_name["CheckpointService"],
    codecs={
        "UploadChunks": RawCodec(request_deserializer=decode_upload_chunk),
        "Download": RawCodec(response_serializer=encode_download_chunk),
    },
)


def open_store_from_config(config: Config) -> CheckpointStore:
    """The engine for this deployment: storage URL from the config, quota from the environment."""
    quota = os.environ.get(QUOTA_ENV, "0") or "0"
    if not quota.isdigit():
        raise InvalidArgument(f"{QUOTA_ENV}={quota!r} must be a whole number of bytes (0 = no quota)")
    return CheckpointStore.open(config.effective_storage_url, quota_bytes=int(quota))


def build(config: Config, app: ServiceApp) -> ReadyCheck:
    """Wire the store into the app; the service is ready once recovery has run (in the constructor)."""
    store = open_store_from_config(config)
    app.add(add_checkpoint_servicer, CheckpointServicer(store, config.max_message_bytes), SERVICE_NAME)
    app.on_shutdown(store.close)
    return lambda: True


# Chunks are multi-MiB messages. Advertising the largest HTTP/2 frame lets clients send a chunk in a
# few frames instead of 256 x 16 KiB ones (the client does the same for downloads), and larger
# socket reads cut the per-read overhead of gRPC core.
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.http2.max_frame_size", (1 << 24) - 1),
    ("grpc.experimental.tcp_read_chunk_size", 4 << 20),
    ("grpc.experimental.tcp_min_read_chunk_size", 1 << 20),
    ("grpc.experimental.tcp_max_read_chunk_size", 16 << 20),
]


def main(argv: Sequence[str] | None = None) -> int:
    tune_malloc()
    return run_service("checkpoint", build, argv, server_options=SERVER_OPTIONS)
