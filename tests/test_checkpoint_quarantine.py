"""A damaged record on disk never takes the checkpoint store down (issue 10, item 4).

A damaged manifest quarantines only its version: the store opens, that version answers DATA_LOSS
naming its file, every other version and model serves, `verify` reports it, and deleting it
cleans up. A damaged tags document is rebuilt from the commit tags; a damaged upload session is
set aside. Each drill damages the files of a real store and opens a new service on them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch

from tests.fixtures.checkpoint import CheckpointService, tiny_state_dict
from tokenmill.common import errors
from tokenmill.v1 import checkpoint_pb2 as pb
from tokenmill.v1 import checkpoint_pb2_grpc as pb_grpc

Start = Callable[..., CheckpointService]


def manifest_file(root: Path, name: str, version: int) -> Path:
    return root / "manifests" / name / f"{version:010d}.json"


def _wrong_version(raw: bytes) -> bytes:
    d = json.loads(raw)
    d["version"] = 7
    return json.dumps(d).encode()


def _invalid_manifest(raw: bytes) -> bytes:
    d = json.loads(raw)
    d["manifest"]["tensors"][0]["nbytes"] += 4  # no longer matches its dtype and shape
    return json.dumps(d).encode()


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda raw: b"",
    "truncated-json": lambda raw: raw[: len(raw) // 2],
    "garbled-bytes": lambda raw: b"\xff\xfe\x00" + raw[3:],
    "json-list": lambda raw: b"[]",
    "json-missing-fields": lambda raw: b'{"name": "m", "version": 2}',
    "json-wrong-types": lambda raw: (
        b'{"name": "m", "version": 2, "created_at": 0, "manifest": {"tensors": 5}}'
    ),
    "another-versions-record": _wrong_version,
    "invalid-manifest": _invalid_manifest,
}


def _damage(path: Path, how: Callable[[bytes], bytes]) -> None:
    path.write_bytes(how(path.read_bytes()))


def _populate(svc: CheckpointService) -> dict[str, dict[str, torch.Tensor]]:
    """m:1, m:2 (tagged 'best' at commit), m:3, and other:1."""
    sds = {ref: tiny_state_dict(seed=i) for i, ref in enumerate(["m:1", "m:2", "m:3", "other:1"])}
    for ref, sd in sds.items():
        name = ref.split(":")[0]
        assert svc.client.save(name, sd, tags=["best"] if ref == "m:2" else []).ref == ref
    return sds


def _assert_serves(svc: CheckpointService, ref: str, sd: dict[str, torch.Tensor]) -> None:
    out = svc.client.load(ref)
    assert all(torch.equal(out[k], sd[k]) for k in sd), ref


@pytest.mark.parametrize("how", list(DAMAGE), ids=list(DAMAGE))
def test_damaged_manifest_is_quarantined_and_the_rest_serves(
    start_checkpoint_service: Start, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = start_checkpoint_service()
    sds = _populate(first)
    bad = manifest_file(first.root, "m", 2)
    _damage(bad, DAMAGE[how])

    with caplog.at_level(logging.ERROR, logger="tokenmill.checkpoint"):
        svc = start_checkpoint_service(f"file://{first.root}")  # recovery runs on open
    assert str(bad) in caplog.text  # the log names the file

    for ref in ("m:1", "m:3", "other:1"):
        _assert_serves(svc, ref, sds[ref])
    assert svc.client.get("m").ref == "m:3"
    for ref in ("m:2", "m:best"):  # by number, and by a tag pointing at it
        with pytest.raises(errors.DataLoss) as info:
            svc.client.load(ref)
        assert str(bad) in info.value.message and "tokenmill ckpt delete m:2" in info.value.message
    stub = pb_grpc.CheckpointServiceStub(svc.client.channel)
    with pytest.raises(grpc.RpcError) as rpc:
        stub.GetCheckpoint(pb.GetCheckpointRequest(ref="m:2"))
    assert rpc.value.code() == grpc.StatusCode.DATA_LOSS
    assert [v.ref for v in svc.client.list("m")] == ["m:1", "m:3"]  # skipped in listings

    for ref in ("", "m:2"):
        report = svc.client.verify(ref)
        assert not report.ok and any(str(bad) in p for p in report.problems), report
    assert svc.client.verify("m:3").ok
    with pytest.raises(errors.FailedPrecondition, match="damaged"):
        svc.client.gc()  # it cannot know which chunks m:2 needs

    assert svc.client.delete("m:2")
    assert not bad.exists()
    assert svc.client.verify().ok
    assert [v.ref for v in svc.client.list("m")] == ["m:1", "m:3"]
    svc.client.gc()
    _assert_serves(svc, "m:1", sds["m:1"])


def test_damaged_newest_version_is_not_latest_silently(start_checkpoint_service: Start) -> None:
    """`m` / `m:latest` answer DATA_LOSS while the newest version is damaged (never a silent
    fall-back to an older one); after deleting it, m:2 is the latest and m:3 is never reused."""
    first = start_checkpoint_service()
    sds = _populate(first)
    _damage(manifest_file(first.root, "m", 3), DAMAGE["truncated-json"])
    svc = start_checkpoint_service(f"file://{first.root}")
    for ref in ("m", "m:latest"):
        with pytest.raises(errors.DataLoss, match="m:3"):
            svc.client.get(ref)
    assert all("latest" not in v.tags for v in svc.client.list("m"))
    with pytest.raises(errors.DataLoss):
        svc.client.acquire_lease("m:3", "job-1", 60)
    with pytest.raises(errors.DataLoss):
        svc.client.set_tag("m:3", "release")
    assert "release" not in svc.store._catalog.tags("m").tags
    assert svc.client.delete("m:latest")
    assert svc.client.get("m").ref == "m:2"
    _assert_serves(svc, "m", sds["m:2"])
    assert svc.client.save("m", sds["m:1"]).ref == "m:4"


def test_verify_reads_manifests_from_disk_on_a_running_service(ckpt: CheckpointService) -> None:
    """A manifest damaged after the service cached it is reported by verify, and quarantined."""
    sd = tiny_state_dict()
    ckpt.client.save("m", sd)
    ckpt.client.save("m", tiny_state_dict(seed=1))
    _assert_serves(ckpt, "m:1", sd)  # cached now
    bad = manifest_file(ckpt.root, "m", 1)
    _damage(bad, DAMAGE["truncated-json"])
    report = ckpt.client.verify()
    assert not report.ok and len(report.problems) == 1 and str(bad) in report.problems[0]
    with pytest.raises(errors.DataLoss):
        ckpt.client.get("m:1")
    assert ckpt.client.verify("m:2").ok


@pytest.mark.parametrize("content", [b"", b'{"tags": ', b"[1, 2]", b'{"tags": {"best": "two"}}'])
def test_damaged_tags_document_is_rebuilt_from_commit_tags(
    start_checkpoint_service: Start, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    first = start_checkpoint_service()
    sds = _populate(first)
    tags = first.root / "tags" / "m.json"
    tags.write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="tokenmill.checkpoint"):
        svc = start_checkpoint_service(f"file://{first.root}")
    assert str(tags) in caplog.text
    assert svc.client.get("m:best").ref == "m:2"  # the commit tag, recovered from m:2's manifest
    _assert_serves(svc, "m:best", sds["m:2"])
    assert list((first.root / "quarantine" / "tags").iterdir())  # the damaged bytes are kept
    assert svc.client.save("m", sds["m:1"]).ref == "m:4"


def test_damaged_upload_session_is_set_aside(
    start_checkpoint_service: Start, caplog: pytest.LogCaptureFixture
) -> None:
    first = start_checkpoint_service()
    sds = _populate(first)
    up = first.client.begin("m", idempotency_key="job-9")
    session = first.root / "uploads" / f"{up.upload_id}.json"
    idem = next((first.root / "idem" / "m").iterdir())
    session.write_bytes(b'{"upload_id": ')
    idem.write_bytes(b"\x00")
    with caplog.at_level(logging.ERROR, logger="tokenmill.checkpoint"):
        svc = start_checkpoint_service(f"file://{first.root}")
        with pytest.raises(errors.NotFound):
            svc.client.attach(up.upload_id).commit()
        assert svc.client.save("m", sds["m:1"], idempotency_key="job-9").ref == "m:4"
    assert str(session) in caplog.text and str(idem) in caplog.text
    _assert_serves(svc, "other:1", sds["other:1"])


@pytest.mark.slow
def test_service_process_starts_with_a_truncated_manifest(checkpoint_server_process, tmp_path: Path) -> None:
    """The real service process: it starts, serves the other versions, names the file in its log."""
    store_dir = tmp_path / "store"
    server = checkpoint_server_process(store_dir)
    sd1, sd2 = tiny_state_dict(seed=1), tiny_state_dict(seed=2)
    with server.client(chunk_size=64 << 10) as c:
        c.save("m", sd1)
        c.save("m", sd2)
        c.save("other", sd1)
    server.proc.terminate()
    server.proc.wait(10)
    bad = manifest_file(store_dir, "m", 1)
    _damage(bad, DAMAGE["truncated-json"])

    server = checkpoint_server_process(store_dir)
    with server.client(chunk_size=64 << 10) as c:
        out = c.load("m:2")
        assert all(torch.equal(out[k], sd2[k]) for k in sd2)
        assert c.get("other").ref == "other:1"
        with pytest.raises(errors.DataLoss, match="tokenmill ckpt delete m:1"):
            c.load("m:1")
        report = c.verify()
        assert not report.ok and str(bad) in report.problems[0]
        assert c.delete("m:1") and c.verify().ok
    assert str(bad) in server.log.read_text()
