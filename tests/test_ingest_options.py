"""Every engine option is reachable through SubmitIngest and `tokenmill data ingest`: each one lands
in the engine object that uses it, each bad value is refused with INVALID_ARGUMENT naming the
field, and a real run over gRPC records the MinHash settings it used."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from google.protobuf.json_format import MessageToDict

from tests.fixtures.ingest import good_web_text, write_jsonl
from tokenmill.common import errors
from tokenmill.common.ingest.spec import IngestSpec
from tokenmill.common.ingest.stages import DocumentChain
from tokenmill.services.ingest.server import request_to_spec
from tokenmill.v1 import common_pb2, ingest_pb2


def _engine(**fields: Any) -> DocumentChain:
    request = ingest_pb2.SubmitIngestRequest(name="d", sources=["/x"], **fields)
    return DocumentChain(IngestSpec.from_dict(request_to_spec(request)))


def _spec(**fields: Any) -> IngestSpec:
    request = ingest_pb2.SubmitIngestRequest(name="d", sources=["/x"], **fields)
    return IngestSpec.from_dict(request_to_spec(request))


@pytest.mark.parametrize(
    "fields, attribute, expected",
    [
        ({"minhash_bands": 16}, "bands", 16),
        ({"minhash_rows": 8}, "rows", 8),
        ({"minhash_ngram": 3}, "ngram", 3),
        ({"minhash_hash_family": "datatrove-sha1"}, "hash_family", "datatrove-sha1"),
        ({"minhash_word_split": "spacy-like"}, "word_split", "spacy-like"),
        ({"near_dup_threshold": 0.7}, "threshold", 0.7),
    ],
)
def test_minhash_option_reaches_the_hasher(fields, attribute, expected):
    hasher = _engine(**fields).hasher
    assert hasher is not None and getattr(hasher.config, attribute) == expected


def test_defaults_are_the_engines():
    assert _spec() == IngestSpec(name="d", sources=["/x"])
    chain = _engine()
    assert chain.hasher is not None and chain.hasher.config.hash_family == "crc-ms"
    assert chain.scrubber is not None and not chain.scrubber.code


def test_word_split_changes_the_signature():
    text = "I cannot believe it's 10km away, they'd said. " * 4
    plain, spacy = _engine().hasher, _engine(minhash_word_split="spacy-like").hasher
    assert plain is not None and spacy is not None
    assert plain.words(text) != spacy.words(text)


@pytest.mark.parametrize(
    "fields, key, expected",
    [
        ({"dedup_backend": "ray"}, "dedup_backend", "ray"),
        ({"batch_size": 7}, "batch_size", 7),
        ({"max_doc_bytes": 4096}, "max_doc_bytes", 4096),
        ({"max_tokens_per_shard": 1000}, "max_tokens_per_shard", 1000),
        ({"val_fraction": 0.0}, "val_fraction", 0.0),
        ({"skip_pii": True}, "pii", False),
    ],
)
def test_run_option_reaches_the_spec(fields, key, expected):
    assert getattr(_spec(**fields), key) == expected


def test_pii_stage_follows_skip_pii_and_preset():
    assert _engine(skip_pii=True).scrubber is None
    code = _engine(preset="code").scrubber
    assert code is not None and code.code


def test_filter_threshold_reaches_the_filter():
    request = ingest_pb2.SubmitIngestRequest(name="d", sources=["/x"], preset="code")
    request.filter_overrides.update({"repetition": {"max_dup_line_fraction": 0.5, "block_lines": 6}})
    chain = DocumentChain(IngestSpec.from_dict(request_to_spec(request)))
    rep = next(f for f in chain.filters if f.name == "repetition")
    assert rep.max_dup_line_fraction == 0.5 and rep.block_lines == 6


def _corpus(tmp_path: Path) -> Path:
    docs = [{"text": good_web_text(12, seed=i) + f"\nThis is note number {i}."} for i in range(10)]
    return write_jsonl(tmp_path / "web.jsonl", docs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"minhash_hash_family": "md5"},
            r"minhash_hash_family 'md5' must be one of \['crc-ms', 'datatrove-sha1'\]",
        ),
        (
            {"minhash_word_split": "nltk"},
            r"minhash_word_split 'nltk' must be one of \['whitespace', 'spacy-like'\]",
        ),
        ({"minhash_ngram": 65}, r"minhash_ngram 65 must lie in \[1, 64\]"),
        (
            {"minhash_bands": 100, "minhash_rows": 30},
            r"minhash_bands x minhash_rows = 100 x 30 = 3000 hashes; at most 2048",
        ),
        ({"dedup_backend": "spark"}, r"dedup_backend 'spark' must be one of \['local', 'ray'\]"),
        ({"val_fraction": 1.0}, r"val_fraction 1.0 must lie in \[0, 1\)"),
        (
            {"filter_overrides": {"repetition": {"max_dup_block_fraction": 2}}},
            "max_dup_block_fraction 2.0 must lie in",
        ),
        (
            {"filter_overrides": {"repetition": {"block_lines": "five"}}},
            r"repetition'\]\.block_lines must be an integer",
        ),
    ],
)
def test_bad_option_is_refused(ingest_service, tmp_path, kwargs, match):
    client = ingest_service["client"]
    args = {"preset": "code", **kwargs} if "filter_overrides" in kwargs else kwargs
    with pytest.raises(errors.InvalidArgument, match=match):
        client.submit("d", [str(_corpus(tmp_path))], **args)
    assert len(client.list_jobs().jobs) == 0


def test_run_records_the_options_it_used(ingest_service, tmp_path):
    client = ingest_service["client"]
    job = client.submit(
        "opts",
        [str(_corpus(tmp_path))],
        vocab_size=400,
        num_workers=1,
        minhash_bands=10,
        minhash_rows=5,
        minhash_ngram=3,
        minhash_hash_family="datatrove-sha1",
        minhash_word_split="spacy-like",
        dedup_backend="local",
        skip_pii=True,
        batch_size=3,
        val_fraction=0.0,
    )
    done = client.wait(job.id, timeout=120)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    d = client.get_dataset("opts")
    manifest = MessageToDict(d.manifest)
    dedup = manifest["dedup"]
    assert dedup["shingles"] == "word 3-grams" and dedup["bands"] == 10 and dedup["rows"] == 5
    assert dedup["hash_family"] == "datatrove-sha1" and dedup["word_split"] == "spacy-like"
    assert dedup["backend"] == "local"
    assert "pii" not in [s.stage for s in d.stages]
    assert d.val_tokens == 0 and manifest["config"]["batch_size"] == 3


def test_cli_passes_every_engine_option(ingest_service, tmp_path):
    from tests.fixtures.grpc import TEST_TOKEN
    from tokenmill.common.cli.main import cli

    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(ingest_service["config"].data_dir),
                "auth": {"tokens": [TEST_TOKEN]},
                "services": {"ingest": {"host": "127.0.0.1", "port": ingest_service["app"].port}},
            }
        )
    )
    flags = [
        *("--minhash-bands", "12", "--minhash-rows", "6", "--shingle-size", "4"),
        *("--hash-family", "datatrove-sha1", "--word-split", "spacy-like", "--dedup-backend", "local"),
        *("--no-pii", "--batch-size", "9", "--max-doc-bytes", "65536", "--max-tokens-per-shard", "5000"),
        *("--set", "gopher_quality.min_doc_words=10", "--detach"),
    ]
    args = ["--config", str(cfg), "data", "ingest", str(_corpus(tmp_path)), "--name", "cli", *flags]
    out = CliRunner().invoke(cli, args)
    assert out.exit_code == 0, out.output
    job_id = out.output.split()[1]
    spec = MessageToDict(ingest_service["client"].get_job(job_id).spec)
    assert spec["minhash_bands"] == 12 and spec["minhash_rows"] == 6 and spec["minhash_ngram"] == 4
    assert spec["minhash_hash_family"] == "datatrove-sha1" and spec["minhash_word_split"] == "spacy-like"
    assert spec["dedup_backend"] == "local" and spec["pii"] is False and spec["batch_size"] == 9
    assert spec["max_doc_bytes"] == 65536 and spec["max_tokens_per_shard"] == 5000
    assert spec["filter_overrides"] == {"gopher_quality": {"min_doc_words": 10}}
    ingest_service["client"].wait(job_id, timeout=120)
    bad = CliRunner().invoke(cli, [*args[:7], "--name", "x", "--hash-family", "md5"])
    assert bad.exit_code != 0 and "md5" in bad.output
