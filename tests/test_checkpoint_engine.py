"""The store engine without gRPC: validation, recovery, concurrency across store instances, expiry,
and the same engine over a real S3-compatible server."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tokenmill.common import errors, failpoints
from tokenmill.common.checkpoint import CheckpointStore, FileEntry, Manifest, TensorEntry
from tokenmill.common.checkpoint.chunks import chunk_key
from tokenmill.common.checkpoint.format import digest_of
from tokenmill.common.checkpoint.names import parse_ref
from tokenmill.common.names import validate_file_name, validate_name, validate_tag

CS = 64 << 10


def entry(name: str, data: bytes, chunk_size: int = CS, algorithm: str = "blake3") -> TensorEntry:
    chunks = [digest_of(data[i : i + chunk_size], algorithm) for i in range(0, len(data), chunk_size)]
    return TensorEntry(name, "U8", [len(data)], len(data), chunks)


def save(
    store: CheckpointStore, name: str, tensors: dict[str, bytes], tags=(), key: str = "", algorithm="blake3"
):
    m = Manifest(tensors=[entry(n, d, algorithm=algorithm) for n, d in tensors.items()], chunk_size=CS)
    status = store.begin_upload(name, m, tags=list(tags), idempotency_key=key)
    for d in tensors.values():
        for i in range(0, len(d), CS):
            store.put_chunk(status.upload_id, digest_of(d[i : i + CS], algorithm), d[i : i + CS])
    return store.commit(status.upload_id)


def read_all(store: CheckpointStore, ref: str) -> dict[str, bytes]:
    out: dict[str, bytearray] = {}
    for c in store.read(ref):
        buf = out.setdefault(c.entry, bytearray())
        assert len(buf) == c.offset
        buf += c.data
    return {k: bytes(v) for k, v in out.items()}


def test_engine_imports_without_grpc_or_stubs():
    code = (
        "import sys; import tokenmill.common.checkpoint, tokenmill.common.storage; "
        "bad = [m for m in ('grpc', 'redis', 'ray', 'tokenmill.v1', 'torch') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_name_validation():
    assert validate_name("llama-3.2_1b") == "llama-3.2_1b"
    for bad in ("../x", "a/b", "", ".x", "a..b", "x" * 101, "é"):
        with pytest.raises(errors.InvalidArgument):
            validate_name(bad)
    assert validate_file_name("train/rank-0.json") == "train/rank-0.json"
    for bad in ("../x", "/x", "a/../b", "a\\b", "a:b", "a/", ""):
        with pytest.raises(errors.InvalidArgument):
            validate_file_name(bad)
    assert parse_ref("m:007").selector == "7" and parse_ref("m").selector == ""
    assert parse_ref("m:latest").selector == "latest"
    with pytest.raises(errors.InvalidArgument, match="reserved"):
        validate_tag("latest")


def test_manifest_validation_messages():
    good = entry("t", b"x" * 10)
    Manifest(tensors=[good], chunk_size=CS).validate()
    cases = [
        (Manifest(tensors=[good, good], chunk_size=CS), "appears twice"),
        (Manifest(tensors=[TensorEntry("t", "F32", [3], 10, good.chunks)], chunk_size=CS), "is 12 bytes"),
        (Manifest(tensors=[TensorEntry("t", "F32", [-1], 0, [])], chunk_size=CS), "invalid shape"),
        (Manifest(files=[FileEntry("../x", 1, good.chunks)], chunk_size=CS), "file name"),
        (Manifest(tensors=[good], chunk_size=10), "chunk_size"),
        (
            Manifest(tensors=[good, TensorEntry("u", "U8", [11], 11, good.chunks)], chunk_size=CS),
            "same digest",
        ),
    ]
    for manifest, match in cases:
        with pytest.raises(errors.InvalidArgument, match=match):
            manifest.validate()


def test_sessions_survive_a_restart_and_tags_recover(tmp_path):
    store = CheckpointStore.open(f"file://{tmp_path}")
    data = b"a" * (CS + 10)
    m = Manifest(tensors=[entry("w", data)], chunk_size=CS)
    status = store.begin_upload("m", m, tags=["best"])
    store.put_chunk(status.upload_id, m.tensors[0].chunks[0], data[:CS])
    store.close()
    reopened = CheckpointStore.open(f"file://{tmp_path}")
    status = reopened.upload_status(status.upload_id)
    assert status.missing_chunks == [m.tensors[0].chunks[1]] and status.missing_bytes == 10
    reopened.put_chunk(status.upload_id, m.tensors[0].chunks[1], data[CS:])

    failpoints.arm({"checkpoint.after_manifest": {"action": "raise"}})  # a crash after the manifest
    try:
        with pytest.raises(failpoints.FailpointError):
            reopened.commit(status.upload_id)
    finally:
        failpoints.arm(None)
    assert reopened.resolve("m") == ("m", 1)
    third = CheckpointStore.open(f"file://{tmp_path}")
    assert third.get("m:best").version == 1 and "best" in third.get("m").tags
    assert third.commit(status.upload_id).ref == "m:1"  # the retried commit finds its version
    assert read_all(third, "m:best") == {"w": data}


def test_two_store_instances_commit_distinct_versions(tmp_path):
    """Two processes' worth of stores on one directory: create-if-absent keeps versions apart."""
    stores = [CheckpointStore.open(f"file://{tmp_path}") for _ in range(2)]
    results: list[str] = []
    barrier = threading.Barrier(2)

    def run(i: int) -> None:
        barrier.wait()
        for j in range(3):
            results.append(save(stores[i], "same", {"w": bytes([i, j]) * 1000}).ref)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results, key=lambda r: int(r.split(":")[1])) == [f"same:{v}" for v in range(1, 7)]
    fresh = CheckpointStore.open(f"file://{tmp_path}")
    assert len(fresh.list("same")) == 6 and fresh.verify().ok


def test_expired_uploads_and_leases(tmp_path):
    now = [1000.0]
    store = CheckpointStore.open(f"file://{tmp_path}", upload_ttl_seconds=60, clock=lambda: now[0])
    save(store, "m", {"w": b"x" * 100})
    data = b"y" * 100
    status = store.begin_upload("m", Manifest(tensors=[entry("w", data)], chunk_size=CS))
    store.put_chunk(status.upload_id, entry("w", data).chunks[0], data)
    lease = store.acquire_lease("m:1", "job-1", ttl_seconds=30)
    with pytest.raises(errors.FailedPrecondition, match="job-1"):
        store.delete("m:1")
    now[0] += 61  # lease and upload expire
    with pytest.raises(errors.NotFound, match="expired"):
        store.commit(status.upload_id)
    assert store.collect_garbage() == (1, 100)  # the abandoned upload's chunk
    assert store.delete("m:1")
    assert store.release_lease(lease.lease_id) is False


def test_quota_counts_reserved_uploads(tmp_path):
    store = CheckpointStore.open(f"file://{tmp_path}", quota_bytes=1000)
    save(store, "m", {"w": b"x" * 600})
    with pytest.raises(errors.ResourceExhausted, match="quota"):
        save(store, "m", {"w": b"z" * 600})
    save(store, "m", {"w": b"x" * 600})  # fully deduplicated: no new bytes, fits
    assert [v.ref for v in store.list()] == ["m:1", "m:2"]


def test_engine_over_s3(s3_server):
    from tokenmill.common.storage import S3BlobStore

    kwargs = s3_server.client_kwargs()
    backend = S3BlobStore(s3_server.bucket, "engine-test", endpoint_url=kwargs.pop("endpoint_url"), **kwargs)
    store = CheckpointStore(backend)
    assert store.local_access() == ("", "")  # no same-host file reads from an object store
    a = {"w": b"w" * (CS * 2 + 5), "b": b"b" * 10}
    v1 = save(store, "s3model", a, tags=["best"])
    v2 = save(store, "s3model", {**a, "b": b"c" * 10})
    assert (v1.ref, v2.ref) == ("s3model:1", "s3model:2") and v2.new_bytes == 10
    assert read_all(store, "s3model:best") == a
    again = CheckpointStore(backend)  # rebuilt purely from the bucket
    assert [v.ref for v in again.list()] == ["s3model:1", "s3model:2"] and again.verify().ok
    assert again.get("s3model:best").version == 1
    backend.put(chunk_key(v1.manifest.tensors[1].chunks[0]), b"B" * 10)
    with pytest.raises(errors.DataLoss, match="s3model:1.*tensor 'b'"):
        read_all(again, "s3model:1")
    assert not again.verify("s3model:1").ok
    again.delete("s3model:1")
    assert again.collect_garbage() == (1, 10)


def test_version_numbers_are_never_reused(tmp_path):
    store = CheckpointStore.open(f"file://{tmp_path}")
    assert save(store, "m", {"w": b"1"}).ref == "m:1"
    assert save(store, "m", {"w": b"2"}).ref == "m:2"
    store.delete("m:2")
    assert save(store, "m", {"w": b"3"}).ref == "m:3"
    store.delete("m:3")
    store.delete("m:1")
    assert store.list("m") == []
    assert CheckpointStore.open(f"file://{tmp_path}").list() == []
    assert save(store, "m", {"w": b"4"}).ref == "m:4"


def test_read_takes_its_lease_on_first_chunk_and_drops_it_on_close(tmp_path):
    store = CheckpointStore.open(f"file://{tmp_path}")
    save(store, "m", {"w": b"x" * (3 * CS)})
    it = store.read("m")
    assert store.delete("m:1", force=False) is True  # nothing read yet: no lease
    save(store, "m", {"w": b"y" * (3 * CS)})
    it = store.read("m:2")
    next(it)
    with pytest.raises(errors.FailedPrecondition, match="1 download"):
        store.delete("m:2")
    it.close()
    assert store.delete("m:2")


def test_blake3_and_legacy_sha256_chunks_share_a_store_and_both_detect_corruption(tmp_path):
    """Digests name their hash: versions written with sha256 (the original format) stay readable
    next to BLAKE3 ones, survive a restart, and a flipped byte in either is DATA_LOSS."""
    store = CheckpointStore.open(str(tmp_path))
    a, b = b"a" * (CS + 5), b"b" * 100
    old = save(store, "m", {"a": a}, algorithm="sha256")
    new = save(store, "m", {"a": a, "b": b})
    assert old.manifest.tensors[0].chunks[0] == hashlib.sha256(a[:CS]).hexdigest()
    assert new.manifest.tensors[0].chunks[0].startswith("blake3:")
    assert (tmp_path / chunk_key(new.manifest.tensors[0].chunks[0])).name.startswith("blake3-")
    assert new.new_bytes == len(a) + len(b)  # same bytes under another hash are a distinct chunk
    again = CheckpointStore.open(str(tmp_path))
    assert again.stats().chunks == 5 and read_all(again, "m:1") == {"a": a}
    assert read_all(again, "m:2") == {"a": a, "b": b} and again.verify().ok
    for rec, tensor in ((old, "a"), (new, "b")):
        path = tmp_path / chunk_key(rec.manifest.tensor(tensor).chunks[0])
        path.write_bytes(b"X" + path.read_bytes()[1:])
        with pytest.raises(errors.DataLoss, match=f"{rec.ref}.*tensor '{tensor}' chunk 0.*corrupt"):
            read_all(again, rec.ref)
    assert len(again.verify().problems) == 2


def test_chunk_digests_are_checked_against_their_named_hash(tmp_path):
    store = CheckpointStore.open(str(tmp_path))
    data = b"x" * 10
    m = Manifest(tensors=[entry("t", data)], chunk_size=CS)
    uid = store.begin_upload("m", m).upload_id
    sha = hashlib.sha256(data).hexdigest()
    for bad in ("sha256:" + sha, "blake3:" + sha.upper(), "md5:" + sha, "blake3-" + sha, sha[:63]):
        with pytest.raises(errors.InvalidArgument, match="invalid chunk digest"):
            store.put_chunk(uid, bad, data)
    # a sha256 hex relabelled as blake3 is a well-formed digest the data does not hash to
    forged = Manifest(tensors=[TensorEntry("t", "U8", [10], 10, ["blake3:" + sha])], chunk_size=CS)
    uid2 = store.begin_upload("m2", forged).upload_id
    with pytest.raises(errors.InvalidArgument, match="does not match its digest"):
        store.put_chunk(uid2, "blake3:" + sha, data)
