"""Saving: hash entries into chunk digests, register them with an upload session, send the chunks
the store lacks (staged on the same host, else over parallel streams), commit.

Saving hashes each tensor's bytes in fixed-size chunks (BLAKE3 by default; parallel threads, the
hash releases the GIL), asks the store which chunks it lacks and sends only those, then commits.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from tokenmill.common import errors
from tokenmill.common.checkpoint.format import digest_of, dtype_name, split_chunks, tensor_bytes
from tokenmill.common.clients.checkpoint.same_host import SameHostMixin
from tokenmill.common.runtime.proto_struct import dict_to_struct
from tokenmill.v1 import checkpoint_pb2 as pb

SAVE_BATCH_BYTES = 64 << 20
# a transfer that failed with one of these is resumed from the store's list of missing chunks
RESUMABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN", "ABORTED"})


def _batches(
    tensors: Mapping[str, torch.Tensor], files: Mapping[str, bytes], limit: int
) -> list[tuple[dict[str, torch.Tensor], dict[str, bytes]]]:
    """Consecutive groups of entries of about `limit` bytes (an entry is never split)."""
    out: list[tuple[dict[str, torch.Tensor], dict[str, bytes]]] = []
    cur_t: dict[str, torch.Tensor] = {}
    cur_f: dict[str, bytes] = {}
    size = 0
    items: list[tuple[str, Any, int]] = [(k, v, v.numel() * v.element_size()) for k, v in tensors.items()]
    items += [(k, v, len(v)) for k, v in files.items()]
    for i, (key, value, n) in enumerate(items):
        if i < len(tensors):
            cur_t[key] = value
        else:
            cur_f[key] = value
        size += n
        if size >= limit:
            out.append((cur_t, cur_f))
            cur_t, cur_f, size = {}, {}, 0
    if cur_t or cur_f:
        out.append((cur_t, cur_f))
    return out


@dataclass
class _Prepared:
    """Entries hashed and ready: protos for the manifest plus digest -> bytes to send."""

    tensors: list[pb.TensorEntry]
    files: list[pb.FileEntry]
    data: dict[str, memoryview]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors) + sum(f.nbytes for f in self.files)


class Upload:
    """An open upload session (one per checkpoint; several ranks may attach to it)."""

    def __init__(
        self,
        client: UploadsMixin,
        upload_id: str,
        name: str = "",
        session: pb.UploadSession | None = None,
    ):
        self.client = client
        self.upload_id = upload_id
        self.name = name
        self.session = session or pb.UploadSession(upload_id=upload_id, name=name)  # as last reported
        self.bytes_sent = 0
        self.chunks_sent = 0
        self._lock = threading.Lock()  # save() sends two batches at once

    def add(
        self,
        tensors: Mapping[str, torch.Tensor] | None = None,
        *,
        shards: Mapping[str, Mapping[str, Any]] | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> pb.UploadSession:
        """Register entries with the session (ExtendUpload) and send the chunks the store lacks."""
        prepared = self.client._prepare(tensors or {}, shards or {}, files or {})
        session = self.client._unary(
            self.client.stub.ExtendUpload,
            pb.ExtendUploadRequest(upload_id=self.upload_id, tensors=prepared.tensors, files=prepared.files),
        )
        self._send(prepared, session.missing_chunks)
        return self.status()

    def send(
        self,
        tensors: Mapping[str, torch.Tensor] | None = None,
        *,
        shards: Mapping[str, Mapping[str, Any]] | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> pb.UploadSession:
        """Resume: send whatever of these (already registered) entries the store still lacks."""
        prepared = self.client._prepare(tensors or {}, shards or {}, files or {})
        self._send(prepared, self.status().missing_chunks)
        return self.status()

    def _send(self, prepared: _Prepared, missing: Sequence[str], max_attempts: int = 3) -> None:
        """Send this caller's missing chunks; a transfer that breaks is resumed from the store's
        list of what is still missing (so nothing that arrived is sent twice)."""
        for attempt in range(max_attempts):
            mine = [d for d in dict.fromkeys(missing) if d in prepared.data]
            try:
                sent = self.client._transfer(self, mine, prepared.data)
                with self._lock:
                    self.bytes_sent += sent
                    self.chunks_sent += len(mine)
                return
            except errors.TokenmillError as exc:
                if attempt + 1 >= max_attempts or exc.code not in RESUMABLE:
                    raise
                missing = list(self.status().missing_chunks)

    def status(self) -> pb.UploadSession:
        return self.client._unary(
            self.client.stub.GetUploadStatus, pb.GetUploadStatusRequest(upload_id=self.upload_id)
        )

    def commit(self) -> pb.CheckpointVersion:
        return self.client._unary(
            self.client.stub.CommitUpload, pb.CommitUploadRequest(upload_id=self.upload_id)
        )

    def abort(self) -> bool:
        return self.client._unary(
            self.client.stub.AbortUpload, pb.AbortUploadRequest(upload_id=self.upload_id)
        ).aborted


class UploadsMixin(SameHostMixin):
    last_upload: Upload | None = None  # the session save() opened last (observability, tests)

    def _prepare(
        self,
        tensors: Mapping[str, torch.Tensor],
        shards: Mapping[str, Mapping[str, Any]],
        files: Mapping[str, bytes],
    ) -> _Prepared:
        unknown = set(shards) - set(tensors)
        if unknown:
            raise errors.InvalidArgument(
                f"shards given for tensors that are not being saved: {sorted(unknown)}"
            )
        jobs: list[tuple[str, bool, list[memoryview]]] = []
        meta: dict[str, tuple[str, list[int], int]] = {}  # tensor name -> dtype name, shape, nbytes
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise errors.InvalidArgument(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
            dtype = dtype_name(t.dtype)
            if dtype is None:
                raise errors.InvalidArgument(f"tensor {name!r}: dtype {t.dtype} has no safetensors name")
            view = tensor_bytes(t)
            meta[name] = (dtype, list(t.shape), len(view))
            jobs.append((name, False, split_chunks(view, self.chunk_size)))
        for name, content in files.items():
            jobs.append((name, True, split_chunks(memoryview(content).cast("B"), self.chunk_size)))
        flat = [c for _, _, chunks in jobs for c in chunks]
        algorithm = self.hash_algorithm
        digests = list(self._hash_pool.map(lambda c: digest_of(c, algorithm), flat)) if flat else []
        data: dict[str, memoryview] = {}
        out_t: list[pb.TensorEntry] = []
        out_f: list[pb.FileEntry] = []
        pos = 0
        for name, is_file, chunks in jobs:
            ds = digests[pos : pos + len(chunks)]
            for d, c in zip(ds, chunks, strict=True):
                data.setdefault(d, c)
            pos += len(chunks)
            if is_file:
                out_f.append(pb.FileEntry(name=name, nbytes=sum(len(c) for c in chunks), chunks=ds))
                continue
            dtype, shape, nbytes = meta[name]
            entry = pb.TensorEntry(name=name, dtype=dtype, shape=shape, nbytes=nbytes, chunks=ds)
            if name in shards:
                s = shards[name]
                entry.shard.CopyFrom(
                    pb.ShardInfo(
                        logical_name=str(s["logical_name"]),
                        global_shape=[int(x) for x in s["global_shape"]],
                        offsets=[int(x) for x in s["offsets"]],
                    )
                )
            out_t.append(entry)
        return _Prepared(out_t, out_f, data)

    def _transfer(self, up: Upload, digests: Sequence[str], data: Mapping[str, memoryview]) -> int:
        """Get these chunks into the store: staged on the same host when possible, else streamed.

        Returns the bytes the store took in. A same-host attempt that cannot go on (no write
        permission, an older server, a staging directory the server does not see) falls back to
        streaming what the store still lacks."""
        if not digests:
            return 0
        root = self._staging_root()
        if root is None:
            return self._send_chunks(up.upload_id, digests, data)
        adopted, failure = self._stage_chunks(root, up.upload_id, digests, data)
        if failure is None:
            return adopted
        self._staging_failed(root, failure)
        still = set(up.status().missing_chunks)
        rest = [d for d in digests if d in still]
        return adopted + self._send_chunks(up.upload_id, rest, data)

    def _send_chunks(self, upload_id: str, digests: Sequence[str], data: Mapping[str, memoryview]) -> int:
        """Send chunks over up to `streams` parallel UploadChunks streams; returns bytes sent."""
        if not digests:
            return 0
        groups = self._groups(digests, data)

        def messages(group: list[str]) -> Iterator[tuple[str, str, memoryview]]:
            for d in group:
                yield (upload_id, d, data[d])

        def run(group: list[str]) -> int:
            return self._unary(self._upload_chunks, messages(group), timeout=None).bytes_received

        futures = [self._pool.submit(run, g) for g in groups]
        return sum(f.result() for f in futures)

    def begin(
        self,
        name: str,
        *,
        config: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        lineage: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        tags: Sequence[str] = (),
        idempotency_key: str = "",
        _prepared: _Prepared | None = None,
    ) -> Upload:
        """Open an upload (rank 0 of a multi-rank save); ranks then `attach(upload_id).add(...)`."""
        prepared = _prepared or _Prepared([], [], {})
        manifest = pb.CheckpointManifest(
            tensors=prepared.tensors,
            files=prepared.files,
            config=dict_to_struct(config, what="config"),
            metrics=dict_to_struct(metrics, what="metrics"),
            lineage=pb.Lineage(**dict(lineage or {})),
            labels=dict(labels or {}),
            chunk_size=self.chunk_size,
        )
        session = self._unary(
            self.stub.BeginUpload,
            pb.BeginUploadRequest(
                name=name, manifest=manifest, tags=list(tags), idempotency_key=idempotency_key
            ),
        )
        return Upload(self, session.upload_id, name, session)

    def attach(self, upload_id: str) -> Upload:
        return Upload(self, upload_id)

    def save(
        self,
        name: str,
        tensors: Mapping[str, torch.Tensor],
        *,
        files: Mapping[str, bytes] | None = None,
        config: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        lineage: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        tags: Sequence[str] = (),
        idempotency_key: str = "",
        shards: Mapping[str, Mapping[str, Any]] | None = None,
        max_attempts: int = 3,
    ) -> pb.CheckpointVersion:
        """Save one checkpoint; returns the committed version (only new chunks are sent).

        Entries go up in batches of about `SAVE_BATCH_BYTES`: batch k+1 is hashed while batch k
        streams out. Each batch is an ExtendUpload (idempotent for identical entries) followed by
        its missing chunks, so a retried save with the same idempotency key resumes where the last
        one stopped, and an interrupted transfer is resumed (up to `max_attempts`) from what the
        store already has."""
        files = dict(files or {})
        shards = dict(shards or {})
        unknown = set(shards) - set(tensors)
        if unknown:
            raise errors.InvalidArgument(
                f"shards given for tensors that are not being saved: {sorted(unknown)}"
            )
        up = self.begin(
            name,
            config=config,
            metrics=metrics,
            lineage=lineage,
            labels=labels,
            tags=tags,
            idempotency_key=idempotency_key,
        )
        self.last_upload = up
        if up.session.committed_ref:
            return self.get(up.session.committed_ref, include_manifest=False)
        batches = _batches(tensors, files, SAVE_BATCH_BYTES)
        # two batches in flight: no idle gap while the tail of one batch is being stored
        with (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-ahead") as ahead,
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckpt-send") as senders,
        ):

            def prepare(i: int) -> _Prepared:
                t, f = batches[i]
                return self._prepare(t, {k: v for k, v in shards.items() if k in t}, f)

            pending = ahead.submit(prepare, 0) if batches else None
            sending: list[Future[None]] = []
            try:
                for i in range(len(batches)):
                    assert pending is not None
                    prepared = pending.result()
                    pending = ahead.submit(prepare, i + 1) if i + 1 < len(batches) else None
                    session = self._unary(
                        self.stub.ExtendUpload,
                        pb.ExtendUploadRequest(
                            upload_id=up.upload_id, tensors=prepared.tensors, files=prepared.files
                        ),
                    )
                    sending.append(senders.submit(up._send, prepared, session.missing_chunks, max_attempts))
                    if len(sending) > 1:
                        sending.pop(0).result()
                for f in sending:
                    f.result()
            finally:
                for f in sending:
                    f.cancel()
        return up.commit()
