"""config.input_roots: client-named inputs (ingest sources and tokenizer, trainer sft_data) must lie
under an allowed root after resolving '..' and symlinks; checked by tokenmill.common.inputs and enforced by
both services at submit (PERMISSION_DENIED, nothing queued)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.fixtures.grpc import make_test_config
from tests.fixtures.ingest import good_web_text, write_jsonl
from tokenmill.common import errors
from tokenmill.common.inputs import check_input_allowed
from tokenmill.v1 import common_pb2

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """allowed/ (the only root) holding a file, outside/ holding a secret, and escapes into it."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir(exist_ok=True)
    outside.mkdir()
    (allowed / "ok.jsonl").write_text('{"text": "fine"}\n')
    (outside / "secret.jsonl").write_text('{"text": "secret"}\n')
    (allowed / "link.jsonl").symlink_to(outside / "secret.jsonl")
    (allowed / "linkdir").symlink_to(outside, target_is_directory=True)
    return {"allowed": allowed, "outside": outside}


# ------------------------------------------------------------------------------------ the helper


def test_local_paths_inside_a_root_resolve(layout):
    roots = [str(layout["allowed"])]
    ok = layout["allowed"] / "ok.jsonl"
    assert check_input_allowed(str(ok), roots) == str(ok.resolve())
    assert check_input_allowed(str(layout["allowed"] / "sub" / ".." / "ok.jsonl"), roots) == str(ok.resolve())
    assert check_input_allowed(str(layout["allowed"]), roots) == str(layout["allowed"].resolve())
    # empty roots: anywhere
    assert check_input_allowed(str(layout["outside"] / "secret.jsonl"), []) == str(
        (layout["outside"] / "secret.jsonl").resolve()
    )


@pytest.mark.parametrize(
    "rel",
    ["../outside/secret.jsonl", "link.jsonl", "linkdir/secret.jsonl", "linkdir"],
    ids=["dotdot", "file-symlink", "dir-symlink", "dir-symlink-root"],
)
def test_escapes_are_denied_with_the_setting_named(layout, rel):
    with pytest.raises(errors.PermissionDenied, match="input_roots") as info:
        check_input_allowed(str(layout["allowed"] / rel), [str(layout["allowed"])], what="source")
    assert "source" in info.value.message


def test_a_sibling_with_a_common_prefix_is_outside(tmp_path):
    (tmp_path / "data-evil").mkdir()
    with pytest.raises(errors.PermissionDenied):
        check_input_allowed(str(tmp_path / "data-evil" / "x"), [str(tmp_path / "data")])


def test_s3_prefixes():
    roots = ["s3://corpora/web/", "/nonexistent-local-root"]
    assert check_input_allowed("s3://corpora/web/2024/", roots) == "s3://corpora/web/2024/"
    assert check_input_allowed("s3://corpora/web", roots) == "s3://corpora/web"
    for bad in ("s3://corpora/webby/x", "s3://corpora/web/../private/x", "s3://other/web/x"):
        with pytest.raises(errors.PermissionDenied):
            check_input_allowed(bad, roots)
    with pytest.raises(errors.PermissionDenied):  # a local root never admits s3, and vice versa
        check_input_allowed("s3://corpora/web/x", ["/data"])
    with pytest.raises(errors.PermissionDenied):
        check_input_allowed("/data/x", ["s3://data/"])
    with pytest.raises(errors.InvalidArgument, match="scheme"):
        check_input_allowed("http://host/x", [])
    with pytest.raises(errors.InvalidArgument):
        check_input_allowed("a\x00b", [])


# ------------------------------------------------------------------------------------ ingest


@pytest.fixture
def grpc_config(tmp_path: Path):
    """Overrides the shared fixture so `ingest_service` runs with input_roots = [tmp_path/allowed]."""
    (tmp_path / "allowed").mkdir(exist_ok=True)
    return make_test_config(tmp_path / "data", input_roots=[str(tmp_path / "allowed")])


def _ingest_corpus(path: Path) -> Path:
    docs = [{"text": good_web_text(12, seed=i) + f"\nThis is note number {i}."} for i in range(12)]
    return write_jsonl(path, docs)


def test_ingest_enforces_input_roots(ingest_service, tmp_path, layout):
    client = ingest_service["client"]
    allowed, outside = layout["allowed"], layout["outside"]
    secret = _ingest_corpus(outside / "corpus.jsonl")
    tok = outside / "tokenizer.json"
    tok.write_text("{}")
    denied = [
        dict(sources=[str(secret)]),
        dict(sources=[str(allowed / ".." / "outside" / "corpus.jsonl")]),
        dict(sources=[str(allowed / "linkdir" / "corpus.jsonl")]),
        dict(sources=[str(allowed / "linkdir")]),
        dict(sources=[str(outside / "missing.jsonl")]),  # denied before existence: nothing leaks
        dict(sources=["s3://some-bucket/corpus/"]),
        dict(sources=[str(allowed / "ok.jsonl")], tokenizer=str(tok)),
        dict(sources=[str(secret)], idempotency_key="k-denied"),
    ]
    for fields in denied:
        sources = fields.pop("sources")
        with pytest.raises(errors.PermissionDenied, match="input_roots"):
            client.submit("d", sources, **fields)
    assert not client.list_jobs().jobs, "a denied request must not queue a job"

    job = client.submit("d", [str(_ingest_corpus(allowed / "corpus.jsonl"))], vocab_size=400, num_workers=1)
    done = client.wait(job.id, timeout=120)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error


def test_ingest_engine_checks_again_at_run_time(tmp_path, layout):
    """A job already queued (or a spec run directly) cannot read outside the roots either."""
    from tokenmill.common.ingest.pipeline import run_ingest
    from tokenmill.common.ingest.spec import IngestSpec

    spec = IngestSpec(name="x", sources=[str(layout["allowed"] / "link.jsonl")], vocab_size=400)
    with pytest.raises(errors.PermissionDenied):
        run_ingest(spec, tmp_path / "data", input_roots=[str(layout["allowed"])])
    assert not (tmp_path / "data" / "datasets" / "x").exists()


# ------------------------------------------------------------------------------------ trainer


@pytest.fixture
def restricted_trainer(train_data_root, redis_client, start_checkpoint_service, tmp_path, layout):
    """A real TrainerService whose input_roots is only tmp_path/allowed (data_dir is outside it)."""
    from tests.fixtures.grpc import TEST_TOKEN
    from tokenmill.common.clients.trainer import TrainerClient
    from tokenmill.common.runtime import ServiceApp
    from tokenmill.services.trainer.server import build

    ckpt = start_checkpoint_service()
    config = make_test_config(tmp_path, data_dir=train_data_root, input_roots=[str(layout["allowed"])])
    app = ServiceApp("trainer", config, port=0, metrics=False)
    io_spec = {"kind": "store", "address": f"127.0.0.1:{ckpt.app.port}", "token": TEST_TOKEN}
    build(config, app, redis_client=redis_client, io_spec=io_spec)
    app.start()
    app.set_serving()
    client = TrainerClient(f"127.0.0.1:{app.port}", token=TEST_TOKEN)
    try:
        yield client
    finally:
        client.close()
        app.stop(5)


def test_trainer_enforces_input_roots_for_sft_data(restricted_trainer, layout, sft_jsonl):
    c = restricted_trainer
    allowed, outside = layout["allowed"], layout["outside"]
    shutil.copy(sft_jsonl, allowed / "sft.jsonl")
    shutil.copy(sft_jsonl, outside / "sft.jsonl")
    (allowed / "sft-link.jsonl").symlink_to(outside / "sft.jsonl")
    small = dict(mode="sft", dataset="stories", workers=1, micro_batch_size=2, seq_len=32)
    for sft in (
        "sft.jsonl",  # relative: under data_dir, which is not an allowed root
        str(sft_jsonl),
        str(allowed / ".." / "outside" / "sft.jsonl"),
        str(allowed / "sft-link.jsonl"),
        str(allowed / "linkdir" / "sft.jsonl"),
    ):
        with pytest.raises(errors.PermissionDenied, match="sft_data.*input_roots"):
            c.submit("out", sft_data=sft, **small)
        with pytest.raises(errors.PermissionDenied):
            c.validate("out", sft_data=sft, **small)
    assert not list(c.iter_jobs()), "a denied request must not queue a job"
    assert c.validate("out", sft_data=str(allowed / "sft.jsonl"), **small).ok


@pytest.mark.parametrize("other", ["../../etc", "x" * 5000, "ok\n", "a/b"])
def test_tokenizer_from_another_dataset_takes_only_a_dataset_name(tmp_path, other):
    """`dataset:NAME` names a dataset: no path traversal around input_roots, no OSError on a long name."""
    from tokenmill.common.errors import InvalidArgument
    from tokenmill.common.ingest.tokenizer import resolve_tokenizer

    with pytest.raises(InvalidArgument, match="tokenizer"):
        resolve_tokenizer(f"dataset:{other}", tmp_path / "datasets")
