"""CheckpointService over real loopback gRPC: round trips, dedup, resumable uploads, integrity,
leases, concurrency and every bad input the issue lists."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from tests.fixtures.checkpoint import tiny_state_dict
from tokenmill.common import errors
from tokenmill.common.checkpoint.chunks import chunk_key
from tokenmill.common.checkpoint.format import piece_name
from tokenmill.v1 import checkpoint_pb2 as pb
from tokenmill.v1 import checkpoint_pb2_grpc as pb_grpc


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def chunk_file(root: Path, digest: str) -> Path:
    return root / chunk_key(digest)


# -- round trip, dedup, subsets ----------------------------------------------------------------------


def test_round_trip_with_files_config_and_tags(ckpt):
    sd = tiny_state_dict()
    v = ckpt.client.save(
        "demo",
        sd,
        files={"tokenizer.json": b'{"model": {}}', "train/state.json": b"{}"},
        config={"hidden_size": 64, "rope_theta": 10000.0, "rope_scaling": None},
        metrics={"loss": 2.5},
        lineage={"dataset": "web-v1", "job_id": "job-1"},
        labels={"owner": "ml"},
        tags=["best", "step-10"],
    )
    assert v.ref == "demo:1" and set(v.tags) == {"latest", "best", "step-10"}
    assert v.logical_bytes == sum(t.numel() * t.element_size() for t in sd.values()) + 15
    for ref in ("demo", "demo:1", "demo:best", "demo:latest", "demo:step-10"):
        assert_same(ckpt.client.load(ref), sd)
    with ckpt.new_client(verify_downloads=True, streams=1) as checking:  # end-to-end re-hash
        assert_same(checking.load("demo"), sd)
    got = ckpt.client.get("demo:best")
    m = got.manifest
    assert m.config["hidden_size"] == 64 and m.metrics["loss"] == 2.5
    assert m.lineage.dataset == "web-v1" and m.labels["owner"] == "ml"
    files = ckpt.client.load_files("demo", ["tokenizer.json", "train/state.json"])
    assert files == {"tokenizer.json": b'{"model": {}}', "train/state.json": b"{}"}


def test_load_subset_and_single_tensor(ckpt):
    sd = tiny_state_dict()
    ckpt.client.save("demo", sd)
    one = ckpt.client.load("demo", ["model.layers.1.mlp.up_proj.weight"])
    assert list(one) == ["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(one["model.layers.1.mlp.up_proj.weight"], sd["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(errors.NotFound, match="no tensor 'nope'"):
        ckpt.client.load("demo", ["nope"])
    with pytest.raises(errors.NotFound, match="no file"):
        ckpt.client.load_files("demo", ["missing.json"])


def test_dedup_one_changed_tensor_stores_only_its_chunks(ckpt):
    sd = tiny_state_dict()
    ckpt.client.save("demo", sd)
    before = ckpt.client.stats().stored_bytes
    changed = dict(sd)
    key = "model.layers.0.mlp.up_proj.weight"
    changed[key] = sd[key] + 1
    v2 = ckpt.client.save("demo", changed)
    added = ckpt.client.stats().stored_bytes - before
    nbytes = changed[key].numel() * 4
    assert v2.new_bytes == nbytes and added == nbytes
    assert ckpt.client.last_upload.bytes_sent == nbytes
    assert_same(ckpt.client.load("demo:2"), changed)
    assert_same(ckpt.client.load("demo:1"), sd)
    stats = ckpt.client.stats()
    assert stats.logical_bytes == 2 * sum(t.numel() * t.element_size() for t in sd.values())


def test_idempotency_key_returns_the_same_version(ckpt):
    sd = tiny_state_dict()
    v1 = ckpt.client.save("demo", sd, idempotency_key="job-7-step-100")
    stored = ckpt.client.stats().stored_bytes
    v2 = ckpt.client.save("demo", sd, idempotency_key="job-7-step-100")
    assert v1.ref == v2.ref == "demo:1"
    assert [v.ref for v in ckpt.client.list("demo")] == ["demo:1"]
    assert ckpt.client.stats().stored_bytes == stored


def test_list_pages_and_tags(ckpt):
    sd = {"w": torch.arange(10, dtype=torch.float32)}
    for _ in range(3):
        ckpt.client.save("a", sd)
    ckpt.client.save("b", sd)
    stub = pb_grpc.CheckpointServiceStub(ckpt.client.channel)
    page = stub.ListCheckpoints(pb.ListCheckpointsRequest(page_size=2))
    assert [c.ref for c in page.checkpoints] == ["a:1", "a:2"] and page.next_page_token
    rest = stub.ListCheckpoints(pb.ListCheckpointsRequest(page_size=2, page_token=page.next_page_token))
    assert [c.ref for c in rest.checkpoints] == ["a:3", "b:1"] and not rest.next_page_token
    assert [v.ref for v in ckpt.client.list()] == ["a:1", "a:2", "a:3", "b:1"]
    ckpt.client.set_tag("a:2", "best")
    assert "best" in ckpt.client.get("a:best").tags and ckpt.client.get("a:best").ref == "a:2"
    ckpt.client.set_tag("a:3", "best")  # tags move
    assert ckpt.client.get("a:best").ref == "a:3"
    assert ckpt.client.delete_tag("a", "best") is True and ckpt.client.delete_tag("a", "best") is False
    with pytest.raises(errors.NotFound, match="no tag 'best'"):
        ckpt.client.get("a:best")
    with pytest.raises(grpc.RpcError, match="page_token"):
        stub.ListCheckpoints(pb.ListCheckpointsRequest(page_token="xyz"))


def test_fsdp_shard_pieces_reassemble_and_slice(ckpt):
    full = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)
    pieces, shards = {}, {}
    for rank, (r0, r1) in enumerate([(0, 3), (3, 8)]):
        name = piece_name("model.w", [r0, 0])
        pieces[name] = full[r0:r1].clone()
        shards[name] = {"logical_name": "model.w", "global_shape": [8, 6], "offsets": [r0, 0]}
        assert rank in (0, 1)
    # multi-rank protocol: rank 0 begins, each rank attaches and adds its piece, rank 0 commits
    up = ckpt.client.begin("sharded", config={"hidden_size": 6}, tags=["step-1"])
    for name in pieces:
        rank_client = ckpt.new_client(chunk_size=64 << 10)
        rank_client.attach(up.upload_id).add({name: pieces[name]}, shards={name: shards[name]})
        # a retried add (its first response was lost) is a no-op, not an error
        again = rank_client.attach(up.upload_id)
        again.add({name: pieces[name]}, shards={name: shards[name]})
        assert again.bytes_sent == 0
        rank_client.close()
    v = up.commit()
    assert v.ref == "sharded:1"
    out = ckpt.client.load("sharded")
    assert list(out) == ["model.w"] and torch.equal(out["model.w"], full)
    raw = ckpt.client.load("sharded", assemble=False)
    assert set(raw) == set(pieces)
    assert torch.equal(
        ckpt.client.load_slice("sharded", "model.w", [slice(2, 5), slice(1, 4)]), full[2:5, 1:4]
    )
    assert torch.equal(ckpt.client.load_slice("sharded", "model.w", [slice(4, 8)]), full[4:8])
    with pytest.raises(errors.InvalidArgument, match="out of range|outside"):
        ckpt.client.save(
            "bad",
            {"p": full[:3]},
            shards={"p": {"logical_name": "w", "global_shape": [2, 6], "offsets": [0, 0]}},
        )


# -- resumable uploads -------------------------------------------------------------------------------


def test_upload_killed_mid_stream_resumes_without_resending(ckpt):
    client = ckpt.client
    sd = {"big": torch.randn(64, 1024), "other": torch.randn(32, 1024)}  # 256 KiB + 128 KiB: 6 chunks
    prepared = client._prepare(sd, {}, {})
    up = client.begin("resumable", _prepared=prepared)
    missing = list(up.session.missing_chunks)
    assert len(missing) == 6
    gate = threading.Event()

    def killed_stream():
        for d in missing[:3]:
            yield (up.upload_id, d, prepared.data[d])
        gate.set()
        time.sleep(30)  # hangs until the call is cancelled below

    call = client._upload_chunks.future(killed_stream())
    assert gate.wait(10)
    deadline = time.monotonic() + 10
    while len(up.status().missing_chunks) > 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    call.cancel()  # the stream dies mid-way
    with pytest.raises(grpc.FutureCancelledError):
        call.result()
    status = up.status()
    assert sorted(status.missing_chunks) == sorted(missing[3:])
    assert status.missing_bytes == sum(len(prepared.data[d]) for d in missing[3:])
    # resume from another client (e.g. after a restart): only what is missing is sent
    other = ckpt.new_client(chunk_size=64 << 10)
    resumed = other.attach(up.upload_id)
    resumed.send(sd)
    assert resumed.chunks_sent == 3 and resumed.bytes_sent == status.missing_bytes
    assert not resumed.status().missing_chunks
    v = resumed.commit()
    assert_same(client.load(v.ref), sd)
    assert up.commit().ref == v.ref  # a retried commit answers with the committed version
    other.close()


# -- integrity -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("local_reads", [True, False], ids=["same-host-files", "grpc-stream"])
def test_corrupted_chunk_is_data_loss_naming_checkpoint_and_tensor(ckpt, local_reads):
    sd = tiny_state_dict()
    ckpt.client.save("demo", sd)
    reader = ckpt.new_client(chunk_size=64 << 10, local_reads=local_reads)
    entry = next(t for t in ckpt.client.get("demo").manifest.tensors if t.name == "model.embed_tokens.weight")
    path = chunk_file(ckpt.root, entry.chunks[1])
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(errors.DataLoss) as info:
        reader.load("demo")
    assert "'demo:1' tensor 'model.embed_tokens.weight' chunk 1" in info.value.message
    # other tensors are still readable
    ok = reader.load("demo", ["model.layers.0.mlp.up_proj.weight"])
    assert (reader.local_chunks_read > 0) == local_reads
    assert torch.equal(ok["model.layers.0.mlp.up_proj.weight"], sd["model.layers.0.mlp.up_proj.weight"])
    report = ckpt.client.verify("demo:1")
    assert not report.ok and len(report.problems) == 1
    assert (
        "model.embed_tokens.weight chunk 1" in report.problems[0] and "digest mismatch" in report.problems[0]
    )
    whole = ckpt.client.verify()
    assert not whole.ok and whole.chunks_checked >= len(entry.chunks)
    path.unlink()  # a missing chunk is reported too
    assert "missing" in ckpt.client.verify("demo").problems[0]
    with pytest.raises(errors.DataLoss, match="missing"):
        reader.load("demo", ["model.embed_tokens.weight"])
    assert not ckpt.store.leases("demo", 1)  # the same-host read's lease ends with it


def test_same_host_reads_match_grpc_and_fall_back_without_the_proof_file(ckpt):
    """Loads read the store's chunk files directly when the nonce file proves the same filesystem,
    and stream over gRPC otherwise; both give the same tensors and files."""
    sd = tiny_state_dict()
    ckpt.client.save("demo", sd, files={"tokenizer.json": b"{}" * 50_000})
    local = ckpt.new_client(chunk_size=64 << 10)
    assert_same(local.load("demo"), sd)
    assert local.load_files("demo", ["tokenizer.json"]) == {"tokenizer.json": b"{}" * 50_000}
    n_chunks = sum(len(t.chunks) for t in ckpt.client.get("demo").manifest.tensors)
    assert local.local_chunks_read == n_chunks + 2  # + the two chunks of tokenizer.json
    assert not ckpt.store.leases("demo", 1)
    streamed = ckpt.new_client(chunk_size=64 << 10, local_reads=False)
    assert_same(streamed.load("demo"), sd) and streamed.local_chunks_read == 0
    for proof in (ckpt.root / "access").iterdir():  # as if the client ran on another host
        proof.write_bytes(b"another store")
    elsewhere = ckpt.new_client(chunk_size=64 << 10)
    assert_same(elsewhere.load("demo"), sd) and elsewhere.local_chunks_read == 0


def test_a_stale_same_host_root_falls_back_instead_of_data_loss(ckpt, tmp_path):
    """A root cached before the server moved to another store is re-proven, not trusted."""
    sd = tiny_state_dict()
    ckpt.client.save("demo", sd)
    c = ckpt.new_client(chunk_size=64 << 10)
    assert_same(c.load("demo"), sd) and c.local_chunks_read > 0
    read = c.local_chunks_read
    c._local_root = tmp_path / "old-store"  # as if cached from a server that served another store
    assert_same(c.load("demo"), sd) and c.local_chunks_read == read  # streamed this time
    assert_same(c.load("demo"), sd) and c.local_chunks_read > read  # re-proven root used again


def test_verify_clean_store(ckpt):
    ckpt.client.save("demo", tiny_state_dict(), files={"a.json": b"x" * 100})
    report = ckpt.client.verify()
    assert report.ok and report.chunks_checked > 0 and not report.problems


# -- concurrency and leases ------------------------------------------------------------------------


def test_concurrent_uploads_of_the_same_name_get_distinct_versions(ckpt):
    dicts = [tiny_state_dict(seed=s) for s in range(4)]
    results: dict[int, str] = {}
    failures: list[BaseException] = []

    def run(i: int) -> None:
        c = ckpt.new_client(chunk_size=64 << 10)
        try:
            results[i] = c.save("same", dicts[i]).ref
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)
        finally:
            c.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures
    assert sorted(results.values()) == ["same:1", "same:2", "same:3", "same:4"]
    for i, ref in results.items():
        assert_same(ckpt.client.load(ref), dicts[i])
    assert ckpt.client.verify().ok


def test_delete_refused_while_leased_or_downloading(ckpt):
    ckpt.client.save("demo", tiny_state_dict())
    ckpt.client.save("demo", tiny_state_dict(seed=1))
    with ckpt.client.lease("demo:1", holder="job-42", ttl_seconds=60) as lease:
        assert lease.ref == "demo:1"
        with pytest.raises(errors.FailedPrecondition, match="job-42"):
            ckpt.client.delete("demo:1")
        assert [v.ref for v in ckpt.client.list("demo")] == ["demo:1", "demo:2"]
    # an open download stream holds an implicit lease (24 MiB: more than HTTP/2 flow control lets
    # the server push before the client reads, so the stream is still open after one message)
    ckpt.client.save("big", {"w": torch.randn(6 << 20)})
    stub = pb_grpc.CheckpointServiceStub(ckpt.client.channel)
    stream = stub.Download(pb.DownloadRequest(ref="big:1"))
    first = next(stream)
    assert first.data
    with pytest.raises(errors.FailedPrecondition, match="download"):
        ckpt.client.delete("big:1")
    stream.cancel()  # the reader goes away mid-stream: its implicit lease ends with it
    deadline = time.monotonic() + 5
    while True:
        try:
            assert ckpt.client.delete("big:1")
            break
        except errors.FailedPrecondition:
            assert time.monotonic() < deadline, "lease of a cancelled download was never released"
            time.sleep(0.05)
    # force overrides a lease
    ckpt.client.acquire_lease("demo:1", holder="job-43", ttl_seconds=60)
    assert ckpt.client.delete("demo:1", force=True)
    assert [v.ref for v in ckpt.client.list("demo")] == ["demo:2"]


def test_delete_retention_and_gc(ckpt):
    base = tiny_state_dict()
    refs = []
    for step in range(4):
        sd = dict(base)
        sd["model.layers.0.mlp.up_proj.weight"] = base["model.layers.0.mlp.up_proj.weight"] + step
        refs.append(ckpt.client.save("run", sd, tags=[f"step-{step}"] if step == 1 else []).ref)
    assert ckpt.client.retention("run", keep_last=1, dry_run=True) == ["run:1", "run:3"]
    assert ckpt.client.retention("run", keep_last=1) == ["run:1", "run:3"]
    assert [v.ref for v in ckpt.client.list("run")] == ["run:2", "run:4"]
    gc = ckpt.client.gc()
    assert (
        gc.chunks_deleted > 0 and gc.bytes_freed == 2 * base["model.layers.0.mlp.up_proj.weight"].numel() * 4
    )
    assert ckpt.client.gc().chunks_deleted == 0
    assert ckpt.client.verify().ok
    ckpt.client.load("run:step-1")
    with pytest.raises(errors.InvalidArgument, match="bare name"):
        ckpt.client.delete("run")
    with pytest.raises(errors.InvalidArgument, match="keep_last"):
        ckpt.client.retention("run", keep_last=0)


def test_gc_keeps_chunks_of_uploads_in_progress(ckpt):
    sd = {"w": torch.randn(256, 128)}
    prepared = ckpt.client._prepare(sd, {}, {})
    up = ckpt.client.begin("pending", _prepared=prepared)
    up._send(prepared, up.session.missing_chunks)
    assert ckpt.client.gc().chunks_deleted == 0  # pinned by the open upload
    v = up.commit()
    assert_same(ckpt.client.load(v.ref), sd)
    ckpt.client.delete(v.ref)
    assert ckpt.client.gc().chunks_deleted == len(prepared.data)


def test_chunks_are_named_by_blake3_and_sha256_versions_stay_loadable(ckpt):
    """New saves use 'blake3:' digests; a version saved with sha256 digests (the original format,
    e.g. by an older client) loads, verifies and dedups against itself through the same service."""
    sd = tiny_state_dict()
    with ckpt.new_client(chunk_size=64 << 10, hash_algorithm="sha256") as old:
        v1 = old.save("mixed", sd)
        assert old.save("mixed", sd).new_bytes == 0  # dedup with the same hash
    digests = [d for t in ckpt.client.get(v1.ref).manifest.tensors for d in t.chunks]
    assert digests and all(len(d) == 64 and ":" not in d for d in digests)
    v2 = ckpt.client.save("mixed", sd)
    m2 = ckpt.client.get(v2.ref).manifest
    assert all(d.startswith("blake3:") for t in m2.tensors for d in t.chunks)
    assert v2.new_bytes == v1.new_bytes > 0  # another hash names other chunks: stored once more
    for ref in (v1.ref, v2.ref):
        assert_same(ckpt.client.load(ref), sd)
        with ckpt.new_client(verify_downloads=True, streams=1) as checking:
            assert_same(checking.load(ref), sd)
    assert ckpt.client.verify().ok
    with pytest.raises(ValueError, match="unknown chunk hash"):
        ckpt.new_client(hash_algorithm="md5")


def test_service_server_options_reach_the_grpc_server(tmp_path):
    """ServiceApp(server_options=...) come after the defaults, so a service can override them
    (the checkpoint service raises the HTTP/2 frame size and socket read sizes this way)."""
    from tests.fixtures.checkpoint import TEST_TOKEN
    from tests.fixtures.grpc import make_test_config
    from tokenmill.common.checkpoint import CheckpointStore
    from tokenmill.common.runtime import ServiceApp
    from tokenmill.services.checkpoint.server import (
        SERVER_OPTIONS,
        SERVICE_NAME,
        CheckpointServicer,
        add_checkpoint_servicer,
    )

    assert ("grpc.http2.max_frame_size", (1 << 24) - 1) in SERVER_OPTIONS
    config = make_test_config(tmp_path)
    store = CheckpointStore.open(f"file://{tmp_path / 'store'}")
    app = ServiceApp(
        "checkpoint",
        config,
        port=0,
        metrics=False,
        server_options=[*SERVER_OPTIONS, ("grpc.max_receive_message_length", 4096)],
    )
    app.add(add_checkpoint_servicer, CheckpointServicer(store, config.max_message_bytes), SERVICE_NAME)
    app.start()
    app.set_serving()
    try:
        from tokenmill.common.clients.checkpoint import CheckpointClient

        # chunks over gRPC (the same-host path would write the big chunk without a message)
        with CheckpointClient(
            f"127.0.0.1:{app.port}", token=TEST_TOKEN, chunk_size=64 << 10, local_writes=False
        ) as c:
            assert c.save("small", {"w": torch.ones(100)}).ref == "small:1"  # under 4 KiB per message
            with pytest.raises(errors.ResourceExhausted):
                c.save("big", {"w": torch.ones(10_000)})  # a 40 kB chunk message: over the override
    finally:
        app.stop(0)
        store.close()


def test_quota_is_resource_exhausted(start_checkpoint_service):
    svc = start_checkpoint_service(quota_bytes=300_000)
    svc.client.save("small", {"w": torch.zeros(10_000)})  # 40 kB
    with pytest.raises(errors.ResourceExhausted, match="quota"):
        svc.client.save("big", {"w": torch.randn(100_000)})  # 400 kB
    assert [v.ref for v in svc.client.list()] == ["small:1"]
    assert svc.client.stats().quota["bytes"] == 300_000


# -- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["../../etc/passwd", "/etc/passwd", "a/b", "..", ".hidden", "", "x" * 101, "bad name", "a\x00b", "c:\\x"],
)
def test_bad_names_are_invalid_argument(ckpt, name, tmp_path):
    with pytest.raises(errors.InvalidArgument):
        ckpt.client.save(name, {"w": torch.zeros(2)})
    assert not (tmp_path / "etc").exists()
    assert ckpt.client.list() == []


@pytest.mark.parametrize("fname", ["../escape.json", "/abs.json", "a//b", "a\\b", "ok/../../x", "C:evil"])
def test_bad_file_names_are_invalid_argument(ckpt, fname):
    with pytest.raises(errors.InvalidArgument, match="file name"):
        ckpt.client.save("demo", {"w": torch.zeros(2)}, files={fname: b"x"})


@pytest.mark.parametrize(
    ("ref", "code"),
    [
        ("../../etc/passwd", errors.InvalidArgument),
        ("a:b:c", errors.InvalidArgument),
        ("demo:0", errors.InvalidArgument),
        ("demo:", errors.InvalidArgument),
        ("nobody", errors.NotFound),
        ("demo:99", errors.NotFound),
        ("demo:nosuchtag", errors.NotFound),
    ],
)
def test_bad_refs(ckpt, ref, code):
    ckpt.client.save("demo", {"w": torch.zeros(2)})
    with pytest.raises(code):
        ckpt.client.get(ref)


@pytest.mark.parametrize("tag", ["latest", "123", "../x", "", "a" * 65])
def test_bad_tags(ckpt, tag):
    ckpt.client.save("demo", {"w": torch.zeros(2)})
    with pytest.raises(errors.InvalidArgument):
        ckpt.client.set_tag("demo:1", tag)


def _entry(name: str, data: bytes, dtype: str = "F32", shape: list[int] | None = None) -> pb.TensorEntry:
    return pb.TensorEntry(
        name=name,
        dtype=dtype,
        shape=shape if shape is not None else [len(data) // 4],
        nbytes=len(data),
        chunks=[hashlib.sha256(data).hexdigest()] if data else [],
    )


def test_manifest_claiming_unsent_tensors_fails_at_commit(ckpt):
    stub = pb_grpc.CheckpointServiceStub(ckpt.client.channel)
    sent, unsent = b"\x01" * 64, b"\x02" * 64
    manifest = pb.CheckpointManifest(
        tensors=[_entry("sent", sent), _entry("ghost", unsent)], chunk_size=64 << 10
    )
    session = stub.BeginUpload(pb.BeginUploadRequest(name="claims", manifest=manifest))
    assert len(session.missing_chunks) == 2
    stub.UploadChunks(
        iter(
            [pb.UploadChunk(upload_id=session.upload_id, digest=hashlib.sha256(sent).hexdigest(), data=sent)]
        )
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.CommitUpload(pb.CommitUploadRequest(upload_id=session.upload_id))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "tensor 'ghost'" in info.value.details() and "never uploaded" in info.value.details()
    assert ckpt.client.list() == []


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        (pb.TensorEntry(name="t", dtype="F32", shape=[2, 3], nbytes=20), "is 24 bytes"),
        (pb.TensorEntry(name="t", dtype="BF16", shape=[4], nbytes=16), "is 8 bytes"),
        (pb.TensorEntry(name="t", dtype="Q4", shape=[4], nbytes=4), "unknown dtype"),
        (
            pb.TensorEntry(name="t", dtype="F32", shape=[1], nbytes=4, chunks=["ab" * 32, "cd" * 32]),
            "needs 1 chunk",
        ),
        (pb.TensorEntry(name="t", dtype="F32", shape=[1], nbytes=4, chunks=["not-hex"]), "digest"),
    ],
)
def test_dtype_shape_and_chunk_mismatch_is_invalid_argument(ckpt, entry, match):
    stub = pb_grpc.CheckpointServiceStub(ckpt.client.channel)
    manifest = pb.CheckpointManifest(tensors=[entry], chunk_size=64 << 10)
    with pytest.raises(grpc.RpcError) as info:
        stub.BeginUpload(pb.BeginUploadRequest(name="m", manifest=manifest))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in info.value.details()


def test_upload_chunk_bad_inputs(ckpt):
    stub = pb_grpc.CheckpointServiceStub(ckpt.client.channel)
    data = b"\x05" * 100
    digest = hashlib.sha256(data).hexdigest()
    session = stub.BeginUpload(
        pb.BeginUploadRequest(
            name="m", manifest=pb.CheckpointManifest(tensors=[_entry("t", data)], chunk_size=64 << 10)
        )
    )

    def code_of(messages) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as info:
            stub.UploadChunks(iter(messages))
        return info.value.code(), info.value.details()

    uid = session.upload_id
    assert code_of([pb.UploadChunk(digest=digest, data=data)])[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, details = code_of([pb.UploadChunk(upload_id=uid, digest=digest, data=b"\x07" + data[1:])])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "does not match its digest" in details
    other = b"\x06" * 100
    code, details = code_of(
        [pb.UploadChunk(upload_id=uid, digest=hashlib.sha256(other).hexdigest(), data=other)]
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not part of upload" in details
    code, _ = code_of([pb.UploadChunk(upload_id="f" * 32, digest=digest, data=data)])
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = code_of([pb.UploadChunk(upload_id=uid, digest="zz", data=data)])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = code_of(
        [
            pb.UploadChunk(upload_id=uid, digest=digest, data=data),
            pb.UploadChunk(upload_id="f" * 32, digest=digest, data=data),
        ]
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    for rpc, request in (
        (stub.GetUploadStatus, pb.GetUploadStatusRequest(upload_id="nope")),
        (stub.CommitUpload, pb.CommitUploadRequest(upload_id="nope")),
        (stub.ExtendUpload, pb.ExtendUploadRequest(upload_id="nope")),
    ):
        with pytest.raises(grpc.RpcError) as info:
            rpc(request)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert stub.AbortUpload(pb.AbortUploadRequest(upload_id=uid)).aborted
    assert not stub.AbortUpload(pb.AbortUploadRequest(upload_id=uid)).aborted
    with pytest.raises(grpc.RpcError) as info:
        stub.CommitUpload(pb.CommitUploadRequest(upload_id=uid))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_other_rpc_bad_inputs(ckpt):
    stub = pb_grpc.CheckpointServiceStub(ckpt.client.channel)
    ckpt.client.save("demo", {"w": torch.zeros(4)})
    cases = [
        (stub.ExtendUpload, None, grpc.StatusCode.INVALID_ARGUMENT),  # duplicate entry, filled below
        (
            stub.Download,
            pb.DownloadRequest(ref="demo", stream_index=3, stream_count=2),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (stub.Download, pb.DownloadRequest(ref="demo", tensors=["nope"]), grpc.StatusCode.NOT_FOUND),
        (stub.DeleteTag, pb.DeleteTagRequest(name="demo", tag="../x"), grpc.StatusCode.INVALID_ARGUMENT),
        (stub.DeleteCheckpoint, pb.DeleteCheckpointRequest(ref="demo:7"), grpc.StatusCode.NOT_FOUND),
        (
            stub.ApplyRetention,
            pb.ApplyRetentionRequest(name="nobody", keep_last=1),
            grpc.StatusCode.NOT_FOUND,
        ),
        (stub.Verify, pb.VerifyRequest(ref="/etc/passwd"), grpc.StatusCode.INVALID_ARGUMENT),
        (
            stub.AcquireLease,
            pb.AcquireLeaseRequest(ref="demo", holder="j", ttl_seconds=0),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            stub.AcquireLease,
            pb.AcquireLeaseRequest(ref="demo", holder="", ttl_seconds=5),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (stub.ReleaseLease, pb.ReleaseLeaseRequest(lease_id="../../x"), grpc.StatusCode.INVALID_ARGUMENT),
        (stub.ListCheckpoints, pb.ListCheckpointsRequest(page_size=5000), grpc.StatusCode.INVALID_ARGUMENT),
        (
            stub.BeginUpload,
            pb.BeginUploadRequest(name="m", manifest=pb.CheckpointManifest(chunk_size=100)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (  # 16 MiB chunks cannot travel in the 8 MiB messages the test server allows
            stub.BeginUpload,
            pb.BeginUploadRequest(name="m", manifest=pb.CheckpointManifest(chunk_size=16 << 20)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ]
    up = ckpt.client.begin("ext")
    ckpt.client.attach(up.upload_id).add({"a": torch.zeros(2)})
    cases[0] = (
        stub.ExtendUpload,
        pb.ExtendUploadRequest(upload_id=up.upload_id, tensors=[_entry("a", b"\1" * 8)]),  # "a" differs
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    for rpc, request, code in cases:
        with pytest.raises(grpc.RpcError) as info:
            result = rpc(request)
            if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
                list(result)
        assert info.value.code() == code, (request, info.value.details())
    empty = ckpt.client.begin("empty")
    with pytest.raises(errors.FailedPrecondition, match="no tensors or files"):
        empty.commit()


def test_auth_is_required(ckpt):
    from tokenmill.common.clients.checkpoint import CheckpointClient

    anon = CheckpointClient(f"127.0.0.1:{ckpt.app.port}")
    with pytest.raises(errors.Unauthenticated):
        anon.list()
    anon.close()
