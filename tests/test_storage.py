"""Blob storage backends: the same contract on the local filesystem and on a real S3-compatible
server (moto's ThreadedMotoServer over loopback HTTP)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tokenmill.common import errors
from tokenmill.common.storage import BlobStore, LocalBlobStore, S3BlobStore, check_key, open_store


@pytest.fixture(params=["local", "s3"])
def blob(request, tmp_path: Path) -> BlobStore:
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    s3 = request.getfixturevalue("s3_server")
    kwargs = s3.client_kwargs()
    return S3BlobStore(
        s3.bucket, f"t-{uuid.uuid4().hex[:8]}/", endpoint_url=kwargs.pop("endpoint_url"), **kwargs
    )


def test_put_get_range_size_list_delete(blob):
    blob.put("a/b/one.json", b'{"x": 1}')
    blob.put("a/b/two", memoryview(b"0123456789"))
    blob.put("a/c", bytearray(b"c"))
    assert blob.get("a/b/one.json") == b'{"x": 1}'
    assert blob.get_range("a/b/two", 2, 3) == b"234"
    assert blob.get_range("a/b/two", 8, 10) == b"89"
    assert blob.size("a/b/two") == 10 and blob.exists("a/c") and not blob.exists("a/zz")
    assert list(blob.list("a/b/")) == ["a/b/one.json", "a/b/two"]
    assert list(blob.list("a/")) == ["a/b/one.json", "a/b/two", "a/c"]
    assert dict(blob.list_sizes("a/b")) == {"a/b/one.json": 8, "a/b/two": 10}
    blob.put("a/c", b"replaced")
    assert blob.get("a/c") == b"replaced"
    assert blob.delete("a/c") is True and blob.delete("a/c") is False
    for fn in (lambda: blob.get("a/c"), lambda: blob.size("a/c"), lambda: blob.get_range("a/c", 0, 1)):
        with pytest.raises(errors.NotFound, match="a/c"):
            fn()
    assert list(blob.list("nothing/")) == []


def test_put_if_absent_creates_once(blob):
    assert blob.put_if_absent("v/1.json", b"first") is True
    assert blob.put_if_absent("v/1.json", b"second") is False
    assert blob.get("v/1.json") == b"first"


@pytest.mark.parametrize(
    "key", ["../x", "/abs", "a/../b", "a//b", "", "a\\b", "a\x00b", "a/./b", "x.tmp-123"]
)
def test_unsafe_keys_are_refused(blob, key):
    with pytest.raises(errors.InvalidArgument):
        blob.put(key, b"x")
    with pytest.raises(errors.InvalidArgument):
        check_key(key)


def test_local_put_is_atomic_when_interrupted(tmp_path):
    store = LocalBlobStore(tmp_path)
    store.put("k", b"old")

    def crash() -> None:
        raise RuntimeError("simulated crash before publish")

    with pytest.raises(RuntimeError):
        store.put("k", b"new", before_publish=crash)
    with pytest.raises(RuntimeError):
        store.put_if_absent("fresh", b"new", before_publish=crash)
    assert store.get("k") == b"old" and not store.exists("fresh")
    assert [p.name for p in tmp_path.iterdir()] == ["k"]  # no temp files left behind


def test_local_stale_temps_are_invisible_and_removed(tmp_path):
    store = LocalBlobStore(tmp_path)
    store.put("d/k", b"x")
    (tmp_path / "d" / "k.tmp-deadbeef").write_bytes(b"partial")
    assert list(store.list("d/")) == ["d/k"]
    assert store.remove_stale_temps() == 1
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["k"]


def test_open_store_urls(tmp_path, s3_env):
    local = open_store(f"file://{tmp_path}/x")
    assert isinstance(local, LocalBlobStore) and local.root == (tmp_path / "x").resolve()
    assert isinstance(open_store(str(tmp_path / "y")), LocalBlobStore)
    s3 = open_store(f"s3://{s3_env.bucket}/some/prefix")
    assert isinstance(s3, S3BlobStore) and s3.url == f"s3://{s3_env.bucket}/some/prefix/"
    s3.put("k", b"v")
    assert s3.get("k") == b"v"
    for bad in ("ftp://x/y", "file://host/x", "s3:///nobucket", "file://"):
        with pytest.raises(errors.InvalidArgument):
            open_store(bad)


def test_s3_missing_bucket_is_failed_precondition(s3_server):
    kwargs = s3_server.client_kwargs()
    store = S3BlobStore("no-such-bucket-here", endpoint_url=kwargs.pop("endpoint_url"), **kwargs)
    with pytest.raises(errors.FailedPrecondition, match="does not exist"):
        store.put("k", b"v")
    with pytest.raises(errors.FailedPrecondition, match="does not exist"):
        list(store.list(""))


def test_local_adopt_renames_a_file_into_place_and_remove_tree(tmp_path: Path):
    import os

    store = LocalBlobStore(tmp_path / "blobs")
    staging = tmp_path / "blobs" / "staging" / "u1"
    staging.mkdir(parents=True)
    (staging / "f").write_bytes(b"staged bytes")
    fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    try:
        store.adopt("chunks/ab/f", "f", src_dir_fd=fd)
        with pytest.raises(FileNotFoundError):  # nothing left to adopt
            store.adopt("chunks/ab/g", "f", src_dir_fd=fd)
    finally:
        os.close(fd)
    assert store.get("chunks/ab/f") == b"staged bytes" and not (staging / "f").exists()
    with pytest.raises(errors.InvalidArgument):
        store.adopt("../escape", "f", src_dir_fd=fd)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"x")
    (tmp_path / "blobs" / "staging" / "link").symlink_to(outside, target_is_directory=True)
    assert store.remove_tree("staging/link") is True and (outside / "keep").exists()  # link only
    assert store.remove_tree("staging") is True and not (tmp_path / "blobs" / "staging").exists()
    assert store.remove_tree("staging") is False


def test_a_put_stopped_before_publish_leaves_nothing_visible(blob):
    """The crash-drill hook runs after the bytes are durable and before anyone can see them."""
    blob.put("k", b"old")
    calls: list[str] = []

    def crash() -> None:
        calls.append("hook")
        raise RuntimeError("simulated crash before publish")

    with pytest.raises(RuntimeError):
        blob.put("k", b"new", before_publish=crash)
    with pytest.raises(RuntimeError):
        blob.put_if_absent("fresh", b"new", before_publish=crash)
    assert calls == ["hook", "hook"]
    assert blob.get("k") == b"old" and not blob.exists("fresh")


def test_only_a_filesystem_backend_offers_local_files(blob):
    files = blob.local_files()
    if isinstance(blob, LocalBlobStore):
        assert files is blob and files.path("a/b") == blob.root / "a" / "b"
    else:
        assert files is None
        assert blob.remove_stale_temps() == 0  # S3 puts leave no temp objects
