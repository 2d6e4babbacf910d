"""Blob storage backends: one small interface over a local filesystem and an S3-compatible store.

Everything durable in tokenmill (checkpoint chunks and manifests, dataset manifests) goes through
this interface, so a deployment can move from a local disk to an object store by changing one URL:
``file:///path`` or ``s3://bucket/prefix``. Keys are ``/``-separated relative paths; backends refuse
keys that could escape their root (``..``, absolute paths, NUL).

Why the local backend writes the way it does: ``rename`` is atomic but not durable on its own, so a
put writes a temporary file in the destination directory, fsyncs it, renames (or hard-links, for
create-if-absent) it into place and fsyncs the directory. A crash therefore leaves the old object or
the new one, never a torn file under the final name.

What a backend can do beyond the key -> bytes map is asked, never inferred from its class:
``BlobStore.local_files()`` returns the ``LocalFiles`` capability (plain files on this host, which
same-host clients may read and stage into) or None.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from tokenmill.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

Bytes = bytes | bytearray | memoryview

_KEY_PART = re.compile(r"^[A-Za-z0-9._@=+,-][A-Za-z0-9._@=+,~-]*$")
_TMP_MARK = ".tmp-"
TMP_MARK = _TMP_MARK  # files whose name holds this are unpublished temps: never listed, swept on open


def write_temp_file(target: Path, data: Bytes, *, fsync: bool = True) -> Path:
    """Write `data` to a fresh temp file beside `target`; the caller publishes it (rename or link).

    A writer killed meanwhile leaves only a temp name, which listings skip and sweeps remove; on
    an error the temp file is removed before the error propagates."""
    tmp = target.parent / f"{target.name}{_TMP_MARK}{uuid.uuid4().hex[:12]}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data).cast("B")
        written = 0
        while written < len(view):
            written += os.write(fd, view[written : written + (64 << 20)])
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def check_key(key: str) -> str:
    """Return `key` if it is a safe relative object key, else raise InvalidArgument."""
    if not key or len(key) > 1024 or key.startswith("/") or "\x00" in key or "\\" in key:
        raise InvalidArgument(f"invalid storage key {key!r}: must be a relative path of 1..1024 characters")
    for part in key.split("/"):
        if part in ("", ".", "..") or not _KEY_PART.fullmatch(part) or _TMP_MARK in part:
            raise InvalidArgument(f"invalid storage key {key!r}: bad path component {part!r}")
    return key


BeforePublish = Callable[[], object]
"""A crash-drill hook a put runs once its bytes are durable and before they become visible."""


class LocalFiles(Protocol):
    """The capability of a backend whose objects are plain files under `root` on this host.

    Why a capability: same-host clients read chunk files and stage upload chunks in the store's
    directory, which only a filesystem backend allows; the engine asks for this instead of
    checking the backend's class, so another file-backed backend only has to implement it."""

    root: Path
    fsync: bool  # whether writes are fsynced (a file adopted from a client must be too)

    def path(self, key: str) -> Path:
        """The file holding `key`."""
        ...

    def adopt(self, key: str, src_name: str, *, src_dir_fd: int) -> None:
        """Publish an existing, durable file (relative to the open directory `src_dir_fd`) as `key`."""
        ...

    def remove_tree(self, key: str) -> bool:
        """Delete the directory `key` and everything in it; False when it was absent."""
        ...


class BlobStore(ABC):
    """Durable key -> bytes map. Every `put` is atomic: readers see the old object or the new one.

    `before_publish` (puts): called once the bytes are durable and before they become visible, so
    crash drills can stop a writer exactly there; a backend that publishes in one request calls it
    just before that request."""

    url: str

    @abstractmethod
    def put(self, key: str, data: Bytes, *, before_publish: BeforePublish | None = None) -> None:
        """Write `data` under `key` atomically and durably (replacing any previous object)."""

    @abstractmethod
    def put_if_absent(self, key: str, data: Bytes, *, before_publish: BeforePublish | None = None) -> bool:
        """Create `key` only if it does not exist; False (nothing written) when it already did."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The whole object; NotFound when absent."""

    @abstractmethod
    def get_range(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes from `start` (fewer at the end of the object); NotFound when absent."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int:
        """Object size in bytes; NotFound when absent."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with `prefix`, in lexicographic order."""

    def list_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """(key, size) pairs; backends override this when listing returns sizes for free."""
        for key in self.list(prefix):
            with contextlib.suppress(NotFound):
                yield key, self.size(key)

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove `key`; False when it was already absent."""

    def local_files(self) -> LocalFiles | None:
        """The plain-files capability when this backend's objects are files on this host, else None."""
        return None

    def remove_stale_temps(self) -> int:
        """Delete temp objects a crashed writer left behind; returns the count (0 where puts leave none)."""
        return 0

    def sync(self) -> None:  # noqa: B027 - optional hook
        """Make every completed put durable (a no-op where puts are durable on return)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients and handles."""


class LocalBlobStore(BlobStore):
    """Objects as files under a root directory (write temp, fsync, rename, fsync dir); implements
    the `LocalFiles` capability."""

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = f"file://{self.root}"
        self.fsync = fsync
        self._made_dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()

    def local_files(self) -> LocalFiles:
        return self

    def path(self, key: str) -> Path:
        """The file holding `key` (for callers that want to mmap or sendfile it)."""
        return self.root / check_key(key)

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._made_dirs:
            return
        created = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        if created and self.fsync:
            # the new directory entry itself must survive a crash
            parent = directory
            while parent != self.root:
                parent = parent.parent
                _fsync_dir(parent)
        with self._dirs_lock:
            self._made_dirs.add(directory)

    def _write_temp(self, target: Path, data: Bytes) -> Path:
        self._ensure_dir(target.parent)
        return write_temp_file(target, data, fsync=self.fsync)

    def put(self, key: str, data: Bytes, *, before_publish: BeforePublish | None = None) -> None:
        target = self.path(key)
        tmp = self._write_temp(target, data)
        try:
            if before_publish is not None:
                before_publish()
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self.fsync:
            _fsync_dir(target.parent)

    def put_if_absent(self, key: str, data: Bytes, *, before_publish: BeforePublish | None = None) -> bool:
        target = self.path(key)
        tmp = self._write_temp(target, data)
        try:
            if before_publish is not None:
                before_publish()
            os.link(tmp, target)  # atomic create-if-absent, unlike rename
            created = True
        except FileExistsError:
            created = False
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if created and self.fsync:
            _fsync_dir(target.parent)
        return created

    def adopt(self, key: str, src_name: str, *, src_dir_fd: int) -> None:
        """Publish an existing, already durable file as `key` by renaming it (fsync dir).

        Why: a same-host writer has put the bytes on this disk already; copying them again would
        double the write cost. `src_name` is relative to the open directory `src_dir_fd`, so a
        symlink swapped in for that directory's path cannot redirect the rename."""
        target = self.path(key)
        self._ensure_dir(target.parent)
        os.rename(src_name, target, src_dir_fd=src_dir_fd)
        if self.fsync:
            _fsync_dir(target.parent)

    def remove_tree(self, key: str) -> bool:
        """Delete the directory `key` and everything in it (a symlink is unlinked, not followed)."""
        return remove_path(self.path(key))

    def get(self, key: str) -> bytes:
        try:
            with open(self.path(key), "rb", buffering=0) as f:
                return f.read()
        except FileNotFoundError:
            raise NotFound(f"object {key!r} not found in {self.url}") from None

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise InvalidArgument(f"bad range start={start} length={length}")
        try:
            with open(self.path(key), "rb", buffering=0) as f:
                return os.pread(f.fileno(), length, start)
        except FileNotFoundError:
            raise NotFound(f"object {key!r} not found in {self.url}") from None

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"object {key!r} not found in {self.url}") from None

    def list(self, prefix: str = "") -> Iterator[str]:
        for key, _ in self.list_sizes(prefix):
            yield key

    def list_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        # walk only the directory that can hold the prefix, then filter
        base_dir = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root / base_dir if base_dir else self.root
        if not start.is_dir():
            return
        found: list[tuple[str, int]] = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, self.root)
            for name in filenames:
                if _TMP_MARK in name:
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/")
                if key.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        found.append((key, os.stat(os.path.join(dirpath, name)).st_size))
        found.sort()
        yield from found

    def delete(self, key: str) -> bool:
        target = self.path(key)
        try:
            target.unlink()
        except FileNotFoundError:
            return False
        if self.fsync:
            _fsync_dir(target.parent)
        return True

    def remove_stale_temps(self) -> int:
        """Delete temp files a crash left behind (never visible as objects); returns the count."""
        removed = 0
        for dirpath, _, filenames in os.walk(self.root):
            for name in filenames:
                if _TMP_MARK in name:
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(dirpath, name))
                        removed += 1
        return removed


def remove_path(target: Path) -> bool:
    """Delete a file, a symlink (not what it points to) or a directory tree; False when absent."""
    if target.is_symlink() or target.is_file():
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        return True
    if not target.is_dir():
        return False
    shutil.rmtree(target, ignore_errors=True)
    return True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class S3BlobStore(BlobStore):
    """Objects in an S3-compatible bucket under a prefix (AWS S3, MinIO, Ceph RGW, moto).

    A single PUT is atomic in S3, so `put` needs no temp object; `put_if_absent` uses a conditional
    write (``If-None-Match: *``), which S3 and current MinIO honour.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        client: Any = None,
        **client_kwargs: Any,
    ):
        try:
            import boto3
            from botocore.config import Config as BotoConfig
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise FailedPrecondition("the S3 backend needs boto3: pip install boto3") from exc
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        endpoint_url = endpoint_url or os.environ.get("TOKENMILL_S3_ENDPOINT_URL") or None
        self.url = f"s3://{bucket}/{self.prefix}"
        self._client = client or boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            config=BotoConfig(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=32),
            **client_kwargs,
        )
        from botocore.exceptions import ClientError

        self._client_error = ClientError

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _code(self, exc: Exception) -> str:
        return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))

    def _convert(self, key: str, exc: Exception) -> Exception:
        code = self._code(exc)
        if code in ("NoSuchKey", "404", "NotFound"):
            return NotFound(f"object {key!r} not found in {self.url}")
        if code == "NoSuchBucket":
            return FailedPrecondition(f"bucket {self.bucket!r} does not exist; create it first")
        return Unavailable(f"S3 error on {key!r} in {self.url}: {code or exc}")

    def _call(self, key: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except self._client_error as exc:
            raise self._convert(key, exc) from None

    def put(self, key: str, data: Bytes, *, before_publish: BeforePublish | None = None) -> None:
        body = bytes(data) if not isinstance(data, bytes) else data
        if before_publish is not None:
            before_publish()
        self._call(key, lambda: self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body))

    def put_if_absent(self, key: str, data: Bytes, *, before_publish: BeforePublish | None = None) -> bool:
        body = bytes(data) if not isinstance(data, bytes) else data
        if before_publish is not None:
            before_publish()
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body, IfNoneMatch="*")
            return True
        except self._client_error as exc:
            if self._code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise Unavailable(f"S3 error writing {key!r} in {self.url}: {self._code(exc) or exc}") from None

    def get(self, key: str) -> bytes:
        resp = self._call(key, lambda: self._client.get_object(Bucket=self.bucket, Key=self._key(key)))
        return resp["Body"].read()

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise InvalidArgument(f"bad range start={start} length={length}")
        if length == 0:
            return b""
        try:
            resp = self._client.get_object(
                Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{start + length - 1}"
            )
        except self._client_error as exc:
            if self._code(exc) == "InvalidRange":
                return b""
            raise self._convert(key, exc) from None
        return resp["Body"].read()

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
            return True
        except NotFound:
            return False

    def size(self, key: str) -> int:
        resp = self._call(key, lambda: self._client.head_object(Bucket=self.bucket, Key=self._key(key)))
        return int(resp["ContentLength"])

    def list(self, prefix: str = "") -> Iterator[str]:
        for key, _ in self.list_sizes(prefix):
            yield key

    def list_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for obj in page.get("Contents", []):
                    yield obj["Key"][len(self.prefix) :], int(obj["Size"])
        except self._client_error as exc:
            if self._code(exc) == "NoSuchBucket":
                raise FailedPrecondition(f"bucket {self.bucket!r} does not exist; create it first") from None
            raise Unavailable(f"S3 error listing {prefix!r} in {self.url}: {self._code(exc)}") from None

    def delete(self, key: str) -> bool:
        existed = self.exists(key)
        self._call(key, lambda: self._client.delete_object(Bucket=self.bucket, Key=self._key(key)))
        return existed

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()


def open_store(url: str, **kwargs: Any) -> BlobStore:
    """Build the backend a URL names: ``file:///abs/path`` (or a bare path) or ``s3://bucket/prefix``."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme else url
        if parsed.netloc not in ("", "localhost"):
            raise InvalidArgument(f"storage URL {url!r}: file URLs must be file:///absolute/path")
        if not path:
            raise InvalidArgument(f"storage URL {url!r} has no path")
        return LocalBlobStore(path, **kwargs)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise InvalidArgument(f"storage URL {url!r}: expected s3://bucket/prefix")
        return S3BlobStore(parsed.netloc, parsed.path.lstrip("/"), **kwargs)
    raise InvalidArgument(f"storage URL {url!r}: unsupported scheme {parsed.scheme!r}; use file:// or s3://")
