"""Same-host saves over real loopback gRPC: the client stages chunk files in the store's directory
and the server adopts them (re-hashing each); every other case falls back to UploadChunks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pytest
import torch

import tokenmill.common.clients.checkpoint.same_host as ckpt_client
from tests.fixtures.checkpoint import TEST_TOKEN, tiny_state_dict
from tokenmill.common import errors
from tokenmill.common.checkpoint.chunks import chunk_key
from tokenmill.common.checkpoint.format import chunk_file_name, staging_key
from tokenmill.v1 import checkpoint_pb2 as pb
from tokenmill.v1 import checkpoint_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def chunk_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / "chunks").rglob("*") if p.is_file()}


def n_chunks(version: pb.CheckpointVersion) -> int:
    m = version.manifest
    return len({d for e in [*m.tensors, *m.files] for d in e.chunks})


def staged_upload(svc, sd: dict[str, torch.Tensor]):
    """An upload whose chunks are all missing, plus the prepared data and its staging directory."""
    prepared = svc.client._prepare(sd, {}, {})
    up = svc.client.begin("staged", _prepared=prepared)
    assert svc.client._store_root() == svc.root  # proves the root and creates staging/
    staging = svc.root / staging_key(up.upload_id)
    staging.mkdir()
    return up, prepared, staging


def test_same_host_save_equals_grpc_save(start_checkpoint_service):
    """Byte-identical store contents and manifests whichever way the chunks arrive."""
    sd = tiny_state_dict()
    files = {"tokenizer.json": b"{}" * 50_000}
    local_svc, grpc_svc = start_checkpoint_service(), start_checkpoint_service()
    local = local_svc.new_client(chunk_size=64 << 10)
    streamed = grpc_svc.new_client(chunk_size=64 << 10, local_writes=False)
    v_local = local.save("demo", sd, files=files, tags=["best"])
    v_grpc = streamed.save("demo", sd, files=files, tags=["best"])
    full_local = local.get("demo", include_manifest=True)
    full_grpc = streamed.get("demo", include_manifest=True)
    assert local.local_chunks_written == n_chunks(full_local) and streamed.local_chunks_written == 0
    assert local.last_upload.bytes_sent == streamed.last_upload.bytes_sent == v_local.new_bytes
    assert full_local.manifest == full_grpc.manifest and v_local.ref == v_grpc.ref == "demo:1"
    assert chunk_files(local_svc.root) == chunk_files(grpc_svc.root)
    assert local.stats().stored_bytes == streamed.stats().stored_bytes
    assert_same(local.load("demo:best"), sd) and local.load_files("demo", ["tokenizer.json"]) == files
    assert local.verify().ok
    assert not any((local_svc.root / "staging").iterdir())  # the upload's staging dir went with it
    # dedup and resave on the same-host path: only the changed tensor's chunks are written
    changed = dict(sd)
    changed["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"] + 1
    before = local.local_chunks_written
    v2 = local.save("demo", changed)
    assert v2.new_bytes == local.last_upload.bytes_sent == 128 * 64 * 4
    assert local.local_chunks_written - before == 1  # 32 KiB: one chunk
    assert_same(local.load("demo:2"), changed)
    local.close()
    streamed.close()


def test_corrupted_staged_chunk_is_rejected_and_deleted(ckpt):
    sd = {"w": torch.randn(64, 1024), "v": torch.randn(16, 1024)}  # 4 + 1 chunks of 64 KiB
    up, prepared, staging = staged_upload(ckpt, sd)
    missing = list(up.session.missing_chunks)
    for d in missing:
        ckpt_client._write_staged(staging, chunk_file_name(d), prepared.data[d])
    bad, short = missing[0], missing[1]
    raw = bytearray((staging / chunk_file_name(bad)).read_bytes())
    raw[1000] ^= 0x01
    (staging / chunk_file_name(bad)).write_bytes(bytes(raw))
    (staging / chunk_file_name(short)).write_bytes(bytes(prepared.data[short][:-1]))
    stub = pb_grpc.CheckpointServiceStub(ckpt.client.channel)
    md = [("authorization", f"Bearer {TEST_TOKEN}")]
    with pytest.raises(grpc.RpcError) as info:
        stub.AdoptStagedChunks(
            pb.AdoptStagedChunksRequest(upload_id=up.upload_id, digests=[bad]), metadata=md
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad[:23] in info.value.details() and "does not match its digest" in info.value.details()
    assert not (staging / chunk_file_name(bad)).exists() and not (ckpt.root / chunk_key(bad)).exists()
    with pytest.raises(grpc.RpcError) as info:
        stub.AdoptStagedChunks(
            pb.AdoptStagedChunksRequest(upload_id=up.upload_id, digests=[short]), metadata=md
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bytes but the manifest" in str(
        info.value.details()
    )
    assert not (staging / chunk_file_name(short)).exists()
    # the good ones are adopted; the rejected ones are still missing and can be sent again
    ok = stub.AdoptStagedChunks(
        pb.AdoptStagedChunksRequest(upload_id=up.upload_id, digests=missing[2:]), metadata=md
    )
    assert ok.chunks_received == len(missing) - 2
    assert sorted(up.status().missing_chunks) == sorted([bad, short])
    up.send(sd)
    assert_same(ckpt.client.load(up.commit().ref), sd)
    assert not staging.exists()


def test_client_corrupting_its_staged_write_gets_invalid_argument(ckpt, monkeypatch):
    """A client whose staged bytes differ from what it hashed (a torn or bad write) is refused."""
    real = ckpt_client._write_staged

    def flipping(staging: Path, name: str, data: memoryview) -> None:
        corrupt = bytearray(data)
        corrupt[0] ^= 0xFF
        real(staging, name, memoryview(corrupt))

    monkeypatch.setattr(ckpt_client, "_write_staged", flipping)
    with pytest.raises(errors.InvalidArgument, match="does not match its digest"):
        ckpt.client.save("demo", {"w": torch.randn(1000)})
    assert ckpt.client.list() == [] and ckpt.client.stats().chunks == 0


def test_client_without_proof_falls_back_to_grpc(ckpt):
    sd = tiny_state_dict()
    ckpt.client._store_root()  # the server writes its proof file
    for proof in (ckpt.root / "access").iterdir():  # as if the client ran on another host
        proof.write_bytes(b"another store")
    elsewhere = ckpt.new_client(chunk_size=64 << 10)
    v = elsewhere.save("demo", sd)
    assert elsewhere.local_chunks_written == 0 and elsewhere.last_upload.bytes_sent == v.new_bytes > 0
    assert_same(elsewhere.load("demo"), sd)
    elsewhere.close()


def test_permission_error_while_staging_falls_back_simulated(ckpt, monkeypatch):
    """Simulated: tests run as root, for whom a read-only staging directory is still writable."""

    def denied(staging: Path, name: str, data: memoryview) -> None:
        raise PermissionError(13, "Permission denied", str(staging / name))

    monkeypatch.setattr(ckpt_client, "_write_staged", denied)
    sd = tiny_state_dict()
    v = ckpt.client.save("demo", sd)
    assert ckpt.client.local_chunks_written == 0 and ckpt.client.last_upload.bytes_sent == v.new_bytes
    assert ckpt.client._local_writes_ok is False  # not tried again by this client
    assert_same(ckpt.client.load("demo"), sd) and ckpt.client.local_chunks_read > 0  # reads still local


def test_s3_store_saves_over_grpc(start_checkpoint_service, s3_env):
    svc = start_checkpoint_service(f"s3://{s3_env.bucket}/local-writes-test")
    sd = {"w": torch.randn(100, 1000)}
    v = svc.client.save("demo", sd)
    assert svc.client.local_chunks_written == 0 and svc.client.last_upload.bytes_sent == v.new_bytes
    assert_same(svc.client.load("demo"), sd)
    up = svc.client.begin("other", _prepared=svc.client._prepare({"x": torch.randn(10)}, {}, {}))
    with pytest.raises(errors.FailedPrecondition, match="not a local directory"):
        svc.client._unary(
            svc.client.stub.AdoptStagedChunks,
            pb.AdoptStagedChunksRequest(upload_id=up.upload_id, digests=list(up.session.missing_chunks)),
        )


KILLED_CLIENT = """
import os, sys, time
import tokenmill.common.clients.checkpoint.same_host as c
from tokenmill.common.clients.checkpoint import CheckpointClient
from tokenmill.common.storage import TMP_MARK
from tests.fixtures.checkpoint import tiny_state_dict
real, calls = c._write_staged, []

def dies_mid_write(staging, name, data):
    calls.append(name)
    if len(calls) < 3:
        return real(staging, name, data)
    with open(staging / (name + TMP_MARK + "killed"), "wb") as f:  # half a chunk, then SIGKILL
        f.write(bytes(data[: len(data) // 2]))
    open(sys.argv[2], "w").close()
    time.sleep(60)

c._write_staged = dies_mid_write
client = CheckpointClient(sys.argv[1], token=sys.argv[3], chunk_size=64 << 10, streams=1)
client.save("model", tiny_state_dict(seed=3), idempotency_key="job-1-step-5")
"""


def test_client_killed_mid_staging_leaves_nothing_visible_and_resumes(ckpt, tmp_path):
    marker = tmp_path / "staging.reached"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(KILLED_CLIENT),
            f"127.0.0.1:{ckpt.app.port}",
            str(marker),
            TEST_TOKEN,
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "the client exited before it was killed"
            assert time.monotonic() < deadline, "the client never reached the staging write"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    (upload_dir,) = (ckpt.root / "staging").iterdir()
    staged = sorted(p.name for p in upload_dir.iterdir())
    assert len(staged) == 3 and sum("killed" in n for n in staged) == 1  # two chunks and a torn temp
    assert ckpt.client.list() == [] and ckpt.client.stats().chunks == 0  # nothing visible
    sd = tiny_state_dict(seed=3)
    status = ckpt.client.attach(upload_dir.name).status()
    assert status.missing_chunks  # the session survives: the same idempotency key resumes it
    v = ckpt.client.save("model", sd, idempotency_key="job-1-step-5")
    assert v.ref == "model:1" and ckpt.client.last_upload.upload_id == upload_dir.name
    assert_same(ckpt.client.load("model"), sd)
    assert not upload_dir.exists() and ckpt.client.verify().ok


def test_staging_of_aborted_expired_and_unknown_uploads_is_removed(ckpt):
    sd = {"w": torch.randn(64, 1024)}
    up, prepared, staging = staged_upload(ckpt, sd)
    d = up.session.missing_chunks[0]
    ckpt_client._write_staged(staging, chunk_file_name(d), prepared.data[d])
    assert up.abort() and not staging.exists()
    orphan = ckpt.root / staging_key("ab" * 16)  # a killed client's leftovers of an unknown upload
    orphan.mkdir()
    (orphan / chunk_file_name(d)).write_bytes(b"x")
    junk = ckpt.root / "staging" / "not-an-upload"
    junk.mkdir()
    up2, _, staging2 = staged_upload(ckpt, {"v": torch.randn(10)})
    assert ckpt.client.gc(dry_run=True).chunks_deleted == 0 and orphan.exists()
    ckpt.client.gc()
    assert not orphan.exists() and not junk.exists() and staging2.exists()  # live uploads keep theirs
    ckpt.store.clock = lambda: time.time() + 2 * 24 * 3600  # the session expires
    ckpt.client.gc()
    assert not staging2.exists()


def test_adopt_staged_chunks_bad_inputs(ckpt, tmp_path):
    up, prepared, staging = staged_upload(ckpt, {"w": torch.randn(64, 1024)})
    d = up.session.missing_chunks[0]

    def adopt(upload_id: str, digests: list[str]) -> pb.UploadChunksResponse:
        return ckpt.client._unary(
            ckpt.client.stub.AdoptStagedChunks,
            pb.AdoptStagedChunksRequest(upload_id=upload_id, digests=digests),
        )

    with pytest.raises(errors.InvalidArgument, match="at least one"):
        adopt(up.upload_id, [])
    with pytest.raises(errors.InvalidArgument, match="at most 1024"):
        adopt(up.upload_id, [d] * 1025)
    with pytest.raises(errors.InvalidArgument, match="invalid chunk digest"):
        adopt(up.upload_id, ["../../etc/passwd"])
    with pytest.raises(errors.InvalidArgument, match="not part of upload"):
        adopt(up.upload_id, ["blake3:" + "0" * 64])
    for upload_id in ("", "../../etc", "ab" * 16):
        with pytest.raises(errors.NotFound, match="not found"):
            adopt(upload_id, [d])
    with pytest.raises(errors.FailedPrecondition, match="was not found"):
        adopt(up.upload_id, [d])  # never staged
    os.mkfifo(staging / chunk_file_name(d))  # a FIFO must neither hang the server nor be adopted
    with pytest.raises(errors.InvalidArgument, match="not a regular file"):
        adopt(up.upload_id, [d])
    assert not (staging / chunk_file_name(d)).exists()
    # a symlink where the staged chunk belongs: refused and removed, its target untouched
    outside = tmp_path / "outside"
    outside.write_bytes(bytes(prepared.data[d]))
    (staging / chunk_file_name(d)).symlink_to(outside)
    with pytest.raises(errors.InvalidArgument, match="symlink"):
        adopt(up.upload_id, [d])
    assert not (staging / chunk_file_name(d)).is_symlink() and outside.exists()
    # a symlink in place of the upload's staging directory: refused and removed
    staging.rmdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ckpt_client._write_staged(elsewhere, chunk_file_name(d), prepared.data[d])
    staging.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(errors.InvalidArgument, match="not a plain directory"):
        adopt(up.upload_id, [d])
    assert not staging.exists() and (elsewhere / chunk_file_name(d)).exists()
    assert not (ckpt.root / chunk_key(d)).exists()
    # staged properly, the same call works, twice (the second time it is a dedup)
    staging.mkdir()
    ckpt_client._write_staged(staging, chunk_file_name(d), prepared.data[d])
    first = adopt(up.upload_id, [d, d])
    assert (first.chunks_received, first.bytes_received, first.chunks_deduplicated) == (1, 64 << 10, 0)
    ckpt_client._write_staged(staging, chunk_file_name(d), prepared.data[d])
    again = adopt(up.upload_id, [d])
    assert (again.chunks_received, again.chunks_deduplicated) == (0, 1)
    assert not (staging / chunk_file_name(d)).exists()


def test_adopt_respects_the_quota(start_checkpoint_service):
    svc = start_checkpoint_service(quota_bytes=200_000)
    sd = {"w": torch.randn(100_000)}  # 400 kB: ExtendUpload would refuse it, so stage it directly
    prepared = svc.client._prepare(sd, {}, {})
    svc.store.quota_bytes = 0
    up = svc.client.begin("big", _prepared=prepared)
    svc.store.quota_bytes = 200_000
    svc.client._store_root()
    staging = svc.root / staging_key(up.upload_id)
    staging.mkdir()
    for d in up.session.missing_chunks:
        ckpt_client._write_staged(staging, chunk_file_name(d), prepared.data[d])
    with pytest.raises(errors.ResourceExhausted, match="quota"):
        svc.client._unary(
            svc.client.stub.AdoptStagedChunks,
            pb.AdoptStagedChunksRequest(upload_id=up.upload_id, digests=list(up.session.missing_chunks)),
        )
    assert 0 < svc.client.stats().stored_bytes <= 200_000
