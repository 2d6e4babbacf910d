"""Same-host clients: reading the store's files directly, and adopting chunks they staged.

Why: on one machine, pushing chunk bytes through gRPC costs several CPU-seconds per GB in copies
(pulling them costs ~4x the CPU of reading the files). A client that sees the store's directory
reads chunk files itself (verifying every digest, under a read lease) and writes upload chunks
into `staging/<upload_id>/` for the store to adopt.

Nothing about the client is trusted: the server builds every path from the upload id it issued
and digests it validated, refuses symlinks and non-regular files, re-hashes every staged file (a
mismatch deletes it: INVALID_ARGUMENT naming the chunk), fsyncs it and only then renames it into
the chunk store (fsync dir), under the same quota and GC rules as UploadChunks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import uuid
from concurrent.futures import wait
from typing import NoReturn

from tokenmill.common.checkpoint.format import chunk_file_name, matches
from tokenmill.common.checkpoint.manifest import check_digest
from tokenmill.common.checkpoint.records import access_key
from tokenmill.common.checkpoint.staging import StagingArea
from tokenmill.common.checkpoint.state import StoreState
from tokenmill.common.checkpoint.uploads import Uploads
from tokenmill.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted

MAX_ADOPT = 1024  # digests per AdoptStagedChunks call


class SameHost:
    def __init__(self, state: StoreState, uploads: Uploads, staging: StagingArea):
        self.state = state
        self.uploads = uploads
        self.staging = staging
        self._access_nonce = ""
        self._tls = threading.local()  # per-thread read buffers of adoption

    def local_access(self) -> tuple[str, str]:
        """(root directory, nonce) for clients on the same filesystem; ("", "") for other backends.

        The nonce file `access/<nonce>` lets a client prove it sees *this* store's files and not
        a same-named directory on another host."""
        files = self.state.files
        if files is None:
            return "", ""
        with self.state.meta:
            if not self._access_nonce:
                nonce = uuid.uuid4().hex
                self.state.backend.put(access_key(nonce), nonce.encode())
                self.staging.create()
                self._access_nonce = nonce
            return str(files.root), self._access_nonce

    def close(self) -> None:
        """Withdraw the read proof: a client that still holds the nonce can no longer prove anything."""
        if self._access_nonce:
            with contextlib.suppress(Exception):
                self.state.backend.delete(access_key(self._access_nonce))

    def adopt_staged(self, upload_id: str, digests: list[str]) -> tuple[int, int, int]:
        """Adopt chunks staged under staging/<upload_id>/; returns (chunks adopted, bytes adopted,
        chunks the store already had)."""
        self.staging.require_files()
        if not digests:
            raise InvalidArgument("AdoptStagedChunks needs at least one chunk digest")
        if len(digests) > MAX_ADOPT:
            raise InvalidArgument(
                f"AdoptStagedChunks takes at most {MAX_ADOPT} digests per call, got {len(digests)}"
            )
        for d in digests:
            check_digest(d)
        unique = list(dict.fromkeys(digests))
        with self.state.gc_lock.shared():
            with self.state.meta:
                sizes = self.uploads.session(upload_id).sizes()
            unknown = [d for d in unique if d not in sizes]
            if unknown:
                raise InvalidArgument(
                    f"chunk {unknown[0][:23]}... is not part of upload {upload_id}; add the entry that "
                    "contains it first (ExtendUpload)"
                )
            dir_fd = self.staging.open_dir(upload_id)
            try:
                futures = [
                    self.state.pool.submit(self._adopt_one, upload_id, dir_fd, d, sizes[d]) for d in unique
                ]
                # every one finishes before dir_fd closes (its number could be reused meanwhile)
                wait(futures)
            finally:
                os.close(dir_fd)
        results = [f.result() for f in futures]  # raises the first failure, in digest order
        adopted = [n for n in results if n is not None]
        return len(adopted), sum(adopted), len(results) - len(adopted)

    def _adopt_one(self, upload_id: str, dir_fd: int, digest: str, expected: int) -> int | None:
        """Verify and publish one staged chunk; its size, or None when the store already had it."""
        chunks = self.state.chunks
        staged = _StagedFile(
            dir_fd, chunk_file_name(digest), f"staged chunk {digest[:23]}... of upload {upload_id}"
        )
        if chunks.has(digest):
            staged.discard()
            return None
        fd = staged.open()
        if fd is None:
            if chunks.has(digest):  # a concurrent adoption of the same chunk took the file
                return None
            raise FailedPrecondition(
                f"{staged.what} was not found (expected staging/{upload_id}/{staged.name}); write it there "
                "first (or send it with UploadChunks)"
            )
        try:
            self._verify(staged, fd, digest, expected)
        finally:
            os.close(fd)
        # chunks of one call are adopted in parallel: check the quota and publish as one step
        try:
            with self.state.quota.admitting(digest, expected):
                adopted = self._publish(staged, digest, expected)
        except ResourceExhausted:
            staged.discard()  # the quota refused it: the staged file is of no further use
            raise
        if not adopted:
            staged.discard()
            return None
        return expected

    def _publish(self, staged: _StagedFile, digest: str, size: int) -> bool:
        """Rename the verified file into the chunk store; False when the store already had it."""
        try:
            return self.state.chunks.adopt(digest, size, staged.name, src_dir_fd=staged.dir_fd)
        except OSError as exc:  # e.g. staged by another user in a directory this one cannot modify
            raise FailedPrecondition(
                f"{staged.what} cannot be moved into the chunk store ({exc.strerror}); send it with UploadChunks"
            ) from None

    def _verify(self, staged: _StagedFile, fd: int, digest: str, expected: int) -> None:
        """Check the open staged file is a regular file of the expected size hashing to `digest`,
        and make it durable; anything else deletes it and raises INVALID_ARGUMENT."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            staged.refuse("is not a regular file; it was removed, stage it again")
        if st.st_size != expected:
            staged.refuse(
                f"is {st.st_size} bytes but the manifest places {expected} bytes there; "
                "the staged file was deleted, stage the chunk again"
            )
        # read, not mmap: a writer truncating the file meanwhile would SIGBUS an mmap reader
        view = self._buffer(expected)
        got = 0
        while got < expected:
            n = os.readv(fd, [view[got:]])
            if not n:
                break
            got += n
        ok, actual = matches(digest, view[:got])
        if ok and os.fstat(fd).st_size != expected:  # still being written to: not what was hashed
            staged.refuse("changed while it was verified; it was deleted, stage it again")
        if not ok:
            staged.refuse(
                f"does not match its digest: the {expected} bytes staged hash to {actual[:23]}...; "
                "the staged file was deleted, stage or send the chunk again"
            )
        files = self.staging.require_files()
        if files.fsync:
            os.fsync(fd)  # the client's fsync is not trusted either (cheap when it did sync)

    def _buffer(self, size: int) -> memoryview:
        """A per-thread reusable read buffer (chunks are all about the same size)."""
        buf: bytearray | None = getattr(self._tls, "buf", None)
        if buf is None or len(buf) < size:
            buf = bytearray(size)
            self._tls.buf = buf
        return memoryview(buf)[:size]


class _StagedFile:
    """One staged chunk file, named relative to its upload's open staging directory."""

    def __init__(self, dir_fd: int, name: str, what: str):
        self.dir_fd = dir_fd
        self.name = name
        self.what = what

    def open(self) -> int | None:
        """A read fd, or None when the file is absent; a symlink is deleted and refused."""
        try:
            # O_NONBLOCK: a FIFO in the chunk's place must not hang this thread (no effect on files)
            return os.open(self.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=self.dir_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            self.refuse("is a symlink, not a file; it was removed, stage it again")

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.name, dir_fd=self.dir_fd)

    def refuse(self, problem: str) -> NoReturn:
        """Delete the file and raise INVALID_ARGUMENT saying what was wrong with it."""
        self.discard()
        raise InvalidArgument(f"{self.what} {problem}") from None
