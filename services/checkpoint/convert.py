"""Conversions between the store engine's dataclasses and the checkpoint protos (server side)."""

from __future__ import annotations

from tokenmill.common.checkpoint.manifest import FileEntry, Manifest, ShardInfo, TensorEntry
from tokenmill.common.checkpoint.store import Lease, UploadStatus, Version
from tokenmill.common.runtime.proto_struct import dict_to_struct, struct_to_dict, timestamp_from_seconds
from tokenmill.v1 import checkpoint_pb2 as pb


def tensor_from_proto(t: pb.TensorEntry) -> TensorEntry:
    shard = None
    if t.HasField("shard") and t.shard.logical_name:
        shard = ShardInfo(t.shard.logical_name, list(t.shard.global_shape), list(t.shard.offsets))
    return TensorEntry(t.name, t.dtype, list(t.shape), int(t.nbytes), list(t.chunks), shard)


def tensor_to_proto(t: TensorEntry) -> pb.TensorEntry:
    out = pb.TensorEntry(name=t.name, dtype=t.dtype, shape=t.shape, nbytes=t.nbytes, chunks=t.chunks)
    if t.shard is not None:
        out.shard.CopyFrom(
            pb.ShardInfo(
                logical_name=t.shard.logical_name, global_shape=t.shard.global_shape, offsets=t.shard.offsets
            )
        )
    return out


def file_from_proto(f: pb.FileEntry) -> FileEntry:
    return FileEntry(f.name, int(f.nbytes), list(f.chunks))


def manifest_from_proto(m: pb.CheckpointManifest) -> Manifest:
    lineage = {
        k: v
        for k, v in (
            ("parent", m.lineage.parent),
            ("dataset", m.lineage.dataset),
            ("job_id", m.lineage.job_id),
        )
        if v
    }
    return Manifest(
        tensors=[tensor_from_proto(t) for t in m.tensors],
        files=[file_from_proto(f) for f in m.files],
        config=struct_to_dict(m.config),
        metrics=struct_to_dict(m.metrics),
        lineage=lineage,
        labels=dict(m.labels),
        chunk_size=int(m.chunk_size) or Manifest().chunk_size,
    )


def manifest_to_proto(m: Manifest) -> pb.CheckpointManifest:
    return pb.CheckpointManifest(
        tensors=[tensor_to_proto(t) for t in m.tensors],
        files=[pb.FileEntry(name=f.name, nbytes=f.nbytes, chunks=f.chunks) for f in m.files],
        config=dict_to_struct(m.config, what="config"),
        metrics=dict_to_struct(m.metrics, what="metrics"),
        lineage=pb.Lineage(**{k: m.lineage.get(k, "") for k in ("parent", "dataset", "job_id")}),
        labels=m.labels,
        chunk_size=m.chunk_size,
    )


def version_to_proto(v: Version, include_manifest: bool = False) -> pb.CheckpointVersion:
    out = pb.CheckpointVersion(
        name=v.name,
        version=str(v.version),
        tags=v.tags,
        created_at=timestamp_from_seconds(v.created_at),
        logical_bytes=v.manifest.logical_bytes,
        new_bytes=v.new_bytes,
        ref=v.ref,
        recorded_metrics=v.recorded_metrics,
    )
    if include_manifest:
        out.manifest.CopyFrom(manifest_to_proto(v.manifest))
    return out


def session_to_proto(s: UploadStatus) -> pb.UploadSession:
    return pb.UploadSession(
        upload_id=s.upload_id,
        name=s.name,
        missing_chunks=s.missing_chunks,
        missing_bytes=s.missing_bytes,
        total_chunks=s.total_chunks,
        expires_at=timestamp_from_seconds(s.expires_at),
        committed_ref=s.committed_ref,
    )


def lease_to_proto(lease: Lease) -> pb.Lease:
    return pb.Lease(
        lease_id=lease.lease_id,
        ref=lease.ref,
        holder=lease.holder,
        expires_at=timestamp_from_seconds(lease.expires_at),
    )
