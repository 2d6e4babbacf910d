"""Loading: pull one version's entries into preallocated buffers, from the store's files on the same
host or over parallel Download streams (no intermediate copies beyond the one out of each gRPC
message), and rebuild logical tensors, or any slice of one, from their FSDP shard pieces.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence

import torch

from tokenmill.common import errors
from tokenmill.common.checkpoint.format import assemble as assemble_shards
from tokenmill.common.checkpoint.format import layout_of, matches, torch_dtype
from tokenmill.common.clients.checkpoint.same_host import SameHostMixin
from tokenmill.v1 import checkpoint_pb2 as pb


class DownloadsMixin(SameHostMixin):
    def _download(
        self,
        version: pb.CheckpointVersion,
        tensors: Sequence[str],
        files: Sequence[str],
        sinks: Mapping[tuple[bool, str], memoryview],
    ) -> None:
        """Fill `sinks[(is_file, name)]` with the entries' bytes: from the store's files when they
        are visible here (same host), else over parallel Download streams."""
        root = self._store_root() if self.local_reads and sinks else None
        if root is not None:
            try:
                self._read_local(root, version, sinks)
                return
            except PermissionError:
                self._local_root = None  # the files are there but not readable: stream them instead
            except errors.DataLoss:
                # a server restarted on another store at the same address makes the cached root
                # stale; only a fresh proof of the same store makes this a real DATA_LOSS
                self._local_root = False
                if self._store_root() == root:
                    raise
        m = version.manifest
        sizes = {(False, t.name): t.nbytes for t in m.tensors} | {(True, f.name): f.nbytes for f in m.files}
        n_chunks = sum(math.ceil(sizes[k] / m.chunk_size) for k in sinks)
        if n_chunks == 0:
            return
        n = max(1, min(self.streams, n_chunks))
        received: dict[tuple[bool, str], int] = dict.fromkeys(sinks, 0)
        digests = {(False, t.name): t.chunks for t in m.tensors} | {(True, f.name): f.chunks for f in m.files}
        lock = threading.Lock()

        def run(i: int) -> None:
            request = pb.DownloadRequest(
                ref=version.ref, tensors=tensors, files=files, stream_index=i, stream_count=n
            )
            for msg in self._stream(self._download_chunks, request):
                key = (msg.is_file, msg.entry)
                sink = sinks.get(key)
                data = msg.data
                if sink is None or msg.offset + len(data) > len(sink) or msg.index >= len(digests[key]):
                    raise errors.DataLoss(
                        f"checkpoint {version.ref}: unexpected chunk for {msg.entry!r} at {msg.offset}"
                    )
                if self.verify_downloads and not matches(digests[key][msg.index], data)[0]:
                    raise errors.DataLoss(
                        f"checkpoint {version.ref} entry {msg.entry!r} chunk {msg.index}: corrupt in transit"
                    )
                sink[msg.offset : msg.offset + len(data)] = data
                with lock:
                    received[key] += len(data)

        futures = [self._pool.submit(run, i) for i in range(n)]
        for f in futures:
            f.result()
        short = [
            f"{name!r} ({received[(is_file, name)]} of {sizes[(is_file, name)]} bytes)"
            for is_file, name in sinks
            if received[(is_file, name)] != sizes[(is_file, name)]
        ]
        if short:
            raise errors.DataLoss(f"checkpoint {version.ref}: incomplete download of {', '.join(short[:5])}")

    def load_raw(
        self, ref: str, names: Sequence[str] | None = None
    ) -> tuple[pb.CheckpointVersion, dict[str, torch.Tensor]]:
        """Stored tensors by their stored names (shard pieces stay pieces) plus the version."""
        version = self.get(ref, include_manifest=True)
        entries = {t.name: t for t in version.manifest.tensors}
        wanted = list(entries) if names is None else list(dict.fromkeys(names))
        missing = [n for n in wanted if n not in entries]
        if missing:
            raise errors.NotFound(f"checkpoint {version.ref} has no tensor(s) {missing[:5]}")
        buffers: dict[str, torch.Tensor] = {}
        sinks: dict[tuple[bool, str], memoryview] = {}
        for n in wanted:
            e = entries[n]
            buf = torch.empty(e.nbytes, dtype=torch.uint8)
            buffers[n] = buf
            if e.nbytes:
                sinks[(False, n)] = buf.numpy().data
        self._download(version, wanted, [], sinks)
        out: dict[str, torch.Tensor] = {}
        for n in wanted:
            e = entries[n]
            dtype = torch_dtype(e.dtype)
            if dtype is None:
                raise errors.FailedPrecondition(
                    f"tensor {n!r} has dtype {e.dtype} that this torch cannot represent"
                )
            shape = [int(s) for s in e.shape]
            out[n] = (
                torch.empty(shape, dtype=dtype) if e.nbytes == 0 else buffers[n].view(dtype).reshape(shape)
            )
        return version, out

    def load(
        self, ref: str, names: Sequence[str] | None = None, *, assemble: bool = True
    ) -> dict[str, torch.Tensor]:
        """Tensors of a checkpoint (`names`: stored or logical names; None = all).

        Shard pieces are reassembled into their logical tensors unless `assemble=False`.
        DATA_LOSS (errors.DataLoss) names the checkpoint and tensor when a chunk is corrupt."""
        version = self.get(ref, include_manifest=True)
        layout = layout_of(version.manifest.tensors)
        stored = {t.name for t in version.manifest.tensors}
        fetch: list[str] | None = None
        if names is not None:
            fetch = []
            for n in names:
                if n in stored:
                    fetch.append(n)
                elif n in layout and assemble:
                    fetch.extend(p.key for p in layout[n])
                else:
                    raise errors.NotFound(f"checkpoint {version.ref} has no tensor {n!r}")
        _, raw = self.load_raw(version.ref, fetch)
        if not assemble:
            return raw
        return {
            logical: assemble_shards(pieces, lambda keys: raw)
            for logical, pieces in layout.items()
            if any(p.key in raw for p in pieces)
        }

    def load_slice(self, ref: str, logical_name: str, index: Sequence[slice]) -> torch.Tensor:
        """Any slice of a logical tensor, reading only the shard pieces that overlap it."""
        version = self.get(ref, include_manifest=True)
        pieces = layout_of(version.manifest.tensors).get(logical_name)
        if pieces is None:
            raise errors.NotFound(f"checkpoint {version.ref} has no tensor {logical_name!r}")
        if len(pieces) == 1 and pieces[0].key == logical_name:  # unsharded: any torch index works
            return self.load_raw(version.ref, [logical_name])[1][logical_name][tuple(index)].clone()
        return assemble_shards(pieces, lambda keys: self.load_raw(version.ref, keys)[1], index)

    def load_files(self, ref: str, names: Sequence[str]) -> dict[str, bytes]:
        version = self.get(ref, include_manifest=True)
        entries = {f.name: f for f in version.manifest.files}
        missing = [n for n in names if n not in entries]
        if missing:
            raise errors.NotFound(
                f"checkpoint {version.ref} has no file(s) {missing}; files: {sorted(entries)}"
            )
        bufs = {n: bytearray(entries[n].nbytes) for n in names}
        sinks = {(True, n): memoryview(b) for n, b in bufs.items() if len(b)}
        self._download(version, [], list(names), sinks)
        return {n: bytes(b) for n, b in bufs.items()}
