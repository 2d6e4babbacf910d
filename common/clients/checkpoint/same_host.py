"""Same-host transfers: when this process sees the checkpoint store's own directory (proven by a
nonce file the server writes), saves write chunk files into the upload's staging directory for the
server to adopt, and loads read chunk files straight into the tensors, instead of streaming either
over gRPC (which costs several CPU-seconds per GB in copies on one machine).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from tokenmill.common import errors
from tokenmill.common.checkpoint.format import chunk_file_name, chunk_key, matches, staging_key
from tokenmill.common.clients.base import convert_rpc_error
from tokenmill.common.clients.checkpoint.core import ClientCore
from tokenmill.common.storage import write_temp_file
from tokenmill.v1 import checkpoint_pb2 as pb

ADOPT_BATCH = 4  # staged chunks per AdoptStagedChunks call: the server re-hashes while more are written
# same-host writes fall back to streaming when the server answers one of these (an older server, a
# staging directory this client cannot share with it)
NO_LOCAL_WRITE = frozenset({"UNIMPLEMENTED", "FAILED_PRECONDITION"})


class SameHostMixin(ClientCore):
    # whether staged writes still work from this process, and the store's directory when proven
    # visible here (False: not asked yet; None: no fast path)
    _local_writes_ok: bool = True
    _local_root: Path | None | bool = False

    def _store_root(self) -> Path | None:
        """The store's directory when this process sees the same files as the server, else None."""
        if self._local_root is None or isinstance(self._local_root, Path):
            return self._local_root
        root: Path | None = None
        try:
            access = self._unary(self.stub.GetLocalAccess, pb.GetLocalAccessRequest())
            if access.root and access.nonce:
                proof = Path(access.root) / "access" / access.nonce
                if proof.read_bytes() == access.nonce.encode():
                    root = Path(access.root)
        except (OSError, errors.TokenmillError):
            root = None  # another host, no permission, or a server without the RPC: use gRPC
        self._local_root = root
        return root

    def _staging_root(self) -> Path | None:
        """The store's directory when saves may stage chunk files there, else None (stream them)."""
        return self._store_root() if self.local_writes and self._local_writes_ok else None

    def _staging_failed(self, root: Path, failure: BaseException) -> None:
        """Learn from a same-host save that had to fall back: stop staging when it cannot work here."""
        if isinstance(failure, PermissionError) or (
            isinstance(failure, OSError) and failure.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
        ):
            self._local_writes_ok = False  # this process cannot write there: stop trying
        elif isinstance(failure, errors.TokenmillError) and failure.code == "FAILED_PRECONDITION":
            # a server restarted on another store at this address makes the cached root stale; when
            # a fresh proof gives the same root the server cannot take these files (e.g. another
            # user owns them): stop trying
            self._local_root = False
            if self._store_root() == root:
                self._local_writes_ok = False
        elif isinstance(failure, errors.TokenmillError) and failure.code == "UNIMPLEMENTED":
            self._local_writes_ok = False

    def _stage_chunks(
        self, root: Path, upload_id: str, digests: Sequence[str], data: Mapping[str, memoryview]
    ) -> tuple[int, BaseException | None]:
        """Write chunks into the upload's staging directory in parallel threads (the writes and
        fsyncs release the GIL) and have the server adopt them a few at a time, so it re-hashes
        while more are being written. Returns (bytes adopted, the failure that calls for a
        fallback or None); errors that are not about the same-host path are raised."""
        staging = root / staging_key(upload_id)
        try:
            staging.mkdir(parents=False, exist_ok=True)
        except OSError as exc:
            return 0, exc
        lock = threading.Lock()
        adopted = [0]

        def settle(call: Any) -> None:
            try:
                resp = call.result()
            except grpc.RpcError as exc:
                raise convert_rpc_error(exc) from None
            with lock:
                adopted[0] += resp.bytes_received
                self.local_chunks_written += resp.chunks_received + resp.chunks_deduplicated

        def run(group: list[str]) -> None:
            # one adoption in flight per thread: the server re-hashes a batch while the next is written
            in_flight = None
            try:
                for i in range(0, len(group), ADOPT_BATCH):
                    part = group[i : i + ADOPT_BATCH]
                    for d in part:
                        _write_staged(staging, chunk_file_name(d), data[d])
                    if in_flight is not None:
                        settle(in_flight)
                        in_flight = None
                    request = pb.AdoptStagedChunksRequest(upload_id=upload_id, digests=part)
                    in_flight = self._unary(self.stub.AdoptStagedChunks.future, request)
                if in_flight is not None:
                    settle(in_flight)
                    in_flight = None
            finally:
                if in_flight is not None:  # this thread failed: wait for what the server is doing
                    with contextlib.suppress(errors.TokenmillError):
                        settle(in_flight)

        futures = [self._pool.submit(run, g) for g in self._groups(digests, data)]
        failure: BaseException | None = None
        for f in futures:
            error = f.exception()
            if error is None:
                continue
            if isinstance(error, OSError) or (
                isinstance(error, errors.TokenmillError) and error.code in NO_LOCAL_WRITE
            ):
                failure = failure or error
            else:
                raise error
        return adopted[0], failure

    def _read_local(
        self, root: Path, version: pb.CheckpointVersion, sinks: Mapping[tuple[bool, str], memoryview]
    ) -> None:
        """Read chunk files straight into the sinks, verifying each digest (DATA_LOSS when bad).

        The read lease keeps a concurrent delete from removing the version meanwhile."""
        m = version.manifest
        entries = {(False, t.name): t for t in m.tensors} | {(True, f.name): f for f in m.files}
        plan: list[tuple[tuple[bool, str], int, int, str, int]] = []
        for key in sinks:
            e = entries[key]
            offset = 0
            for i, d in enumerate(e.chunks):
                n = min(m.chunk_size, e.nbytes - offset)
                plan.append((key, i, offset, d, n))
                offset += n

        def read(item: tuple[tuple[bool, str], int, int, str, int]) -> None:
            (is_file, name), index, offset, digest, n = item
            what = f"checkpoint '{version.ref}' {'file' if is_file else 'tensor'} '{name}' chunk {index}"
            view = sinks[(is_file, name)][offset : offset + n]
            try:
                with open(root / chunk_key(digest), "rb", buffering=0) as f:
                    size = os.fstat(f.fileno()).st_size
                    got = f.readinto(view) if size == n else 0
                    while size == n and got < n:
                        more = f.readinto(view[got:])
                        if not more:
                            break
                        got += more
            except FileNotFoundError:
                raise errors.DataLoss(
                    f"{what}: chunk {digest[:23]}... is missing from the store; run 'tokenmill ckpt verify'"
                ) from None
            if size != n or got != n:
                raise errors.DataLoss(
                    f"{what}: chunk {digest[:23]}... has {size} bytes, expected {n} (corrupt); "
                    "run 'tokenmill ckpt verify'"
                )
            ok, actual = matches(digest, view)
            if not ok:
                raise errors.DataLoss(
                    f"{what}: chunk {digest[:23]}... is corrupt (its bytes hash to {actual[:23]}...); "
                    "run 'tokenmill ckpt verify'"
                )

        with self.lease(version.ref, holder=f"local-read-{uuid.uuid4().hex[:12]}", ttl_seconds=3600):
            for _ in self._pool.map(read, plan):
                pass
        self.local_chunks_read += len(plan)


def _write_staged(staging: Path, name: str, data: memoryview) -> None:
    """Write one chunk under its final staged name atomically: temp file, fsync, rename. A client
    killed meanwhile leaves at most a temp file (swept by the server), never a torn staged chunk."""
    os.replace(write_temp_file(staging / name, data), staging / name)
