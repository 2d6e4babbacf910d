"""Readers and bad input: compressed JSONL, Parquet row groups, trees with binary/empty/invalid files,
malformed lines, missing fields, a huge single line in bounded memory, vanishing and unreadable sources."""

from __future__ import annotations

import gzip
import json
import os
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from tokenmill.common.errors import InvalidArgument, NotFound
from tokenmill.common.ingest.sources import SourceOptions, SourceStats, iter_sources, validate_sources


def read(sources, **opts):
    stats = SourceStats()
    docs = list(iter_sources([str(s) for s in sources], SourceOptions(**opts), stats))
    return docs, stats


def test_jsonl_plain_gz_zst_and_nested_field(tmp_path):
    lines = [json.dumps({"meta": {"body": f"doc {i}"}}).encode() for i in range(3)]
    payload = b"\n".join(lines) + b"\n"
    (tmp_path / "a.jsonl").write_bytes(payload)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(payload))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload))
    docs, stats = read([tmp_path], text_field="meta.body")
    assert [d.text for d in docs] == ["doc 0", "doc 1", "doc 2"] * 3
    assert stats.files == 3 and stats.docs == 9 and not stats.skipped
    assert docs[0].id.endswith("a.jsonl:1")


def test_jsonl_bad_lines_are_counted(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"text": "good one"}\n'
        b"{not json}\n"
        b'{"body": "no text field"}\n'
        b'{"text": 42}\n'
        b"\n"
        b'{"text": "bad \xff\xfe utf8"}\n'
        b'{"text": "last, no newline"}'
    )
    docs, stats = read([path])
    assert [d.text for d in docs] == ["good one", "bad \ufffd\ufffd utf8", "last, no newline"]
    assert docs[1].encoding_errors == 2
    assert stats.skipped == {"malformed_json": 1, "missing_text_field": 1, "text_field_not_string": 1}


def test_huge_single_line_is_skipped_in_bounded_memory(tmp_path):
    path = tmp_path / "huge.jsonl"
    line_mb = 96
    with open(path, "wb") as f:
        f.write(b'{"text": "small before"}\n{"text": "')
        block = b"a" * (1 << 20)
        for _ in range(line_mb):
            f.write(block)
        f.write(b'"}\n{"text": "small after"}\n')
    tracemalloc.start()
    try:
        docs, stats = read([path], max_doc_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [d.text for d in docs] == ["small before", "small after"]
    assert stats.skipped == {"too_large": 1}
    assert stats.bytes > line_mb << 20
    assert peak < 8 << 20, f"reading a {line_mb} MB line peaked at {peak / 1e6:.1f} MB"


def test_tree_with_binary_empty_invalid_and_globs(tmp_path):
    root = tmp_path / "tree"
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("print('a')\n")
    (root / "pkg" / "sub" / "b.py").write_text("print('b')\n")
    (root / "pkg" / "empty.py").write_text("\n  \n")
    (root / "pkg" / "blob.bin").write_bytes(b"\x7fELF\x00\x01\x02" * 100)
    (root / "pkg" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "pkg" / "conf.json").write_text('{"not": "jsonl in a tree"}')
    (root / "pkg" / "__pycache__").mkdir()
    (root / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\x00\x01")
    docs, stats = read([root], exclude_dirs=frozenset({"__pycache__"}))
    names = sorted(d.id.split("/", 1)[1] for d in docs)
    assert names == ["pkg/a.py", "pkg/conf.json", "pkg/latin1.txt", "pkg/sub/b.py"]
    assert stats.skipped == {"empty_file": 1, "binary_file": 1}
    latin = next(d for d in docs if d.id.endswith("latin1.txt"))
    assert latin.text == "caf\ufffd" and latin.encoding_errors == 1
    only_py, _ = read([root], include_globs=["*.py"], exclude_globs=["pkg/sub/*"])
    assert sorted(d.id.rsplit("/", 1)[1] for d in only_py) == ["a.py"]


def test_parquet_row_groups_and_missing_column(tmp_path):
    table = pa.table({"text": [f"row {i}" for i in range(10)] + [None], "n": list(range(11))})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=3)
    docs, stats = read([tmp_path / "d.parquet"])
    assert [d.text for d in docs] == [f"row {i}" for i in range(10)]
    assert stats.skipped == {"missing_text_field": 1}
    _, stats = read([tmp_path / "d.parquet"], text_field="body")
    assert stats.skipped == {"missing_text_field": 11}
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    _, stats = read([tmp_path / "broken.parquet"])
    assert stats.skipped == {"unreadable_parquet": 1}


def test_source_disappears_mid_run(tmp_path):
    root = tmp_path / "tree"
    root.mkdir()
    for i in range(4):
        (root / f"f{i}.txt").write_text(f"file {i}\n")
    stats = SourceStats()
    it = iter_sources([str(root)], SourceOptions(), stats)
    first = next(it)
    assert first.text.startswith("file 0")
    (root / "f2.txt").unlink()  # listed already, gone before it is read
    rest = list(it)
    assert [d.text for d in rest] == ["file 1\n", "file 3\n"]
    assert stats.skipped == {"source_vanished": 1}


def test_truncated_compressed_file_is_counted(tmp_path):
    data = gzip.compress(b'{"text": "x"}\n' * 1000)
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    _, stats = read([tmp_path / "cut.jsonl.gz"])
    assert stats.skipped["corrupt_file"] == 1


def test_validate_sources(tmp_path):
    with pytest.raises(NotFound, match="does not exist"):
        validate_sources([str(tmp_path / "missing")])
    with pytest.raises(InvalidArgument, match="no sources"):
        validate_sources([])
    with pytest.raises(InvalidArgument, match="scheme"):
        validate_sources(["http://example.com/x.jsonl"])
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(InvalidArgument, match="neither a regular file nor a directory"):
        validate_sources([str(fifo)])
    validate_sources([str(tmp_path)])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_unreadable_source(tmp_path):
    from tokenmill.common.errors import FailedPrecondition

    path = Path(tmp_path / "secret.jsonl")
    path.write_text('{"text": "x"}\n')
    path.chmod(0)
    with pytest.raises(FailedPrecondition, match="permissions"):
        validate_sources([str(path)])


def test_s3_source_through_storage_layer(s3_env, tmp_path):
    """s3://bucket/prefix via tokenmill.common.storage against a real S3-compatible server (moto on loopback)."""
    import boto3

    s3 = boto3.client("s3", **s3_env.client_kwargs())
    payload = b"".join(json.dumps({"text": f"remote {i}"}).encode() + b"\n" for i in range(5))
    s3.put_object(Bucket=s3_env.bucket, Key="ingest-corpus/a.jsonl.gz", Body=gzip.compress(payload))
    s3.put_object(Bucket=s3_env.bucket, Key="ingest-corpus/notes/b.txt", Body=b"plain text file\n")
    s3.put_object(Bucket=s3_env.bucket, Key="ingest-corpus/notes/c.bin", Body=b"\x00\x01binary")
    docs, stats = read([f"s3://{s3_env.bucket}/ingest-corpus/"])
    assert sorted(d.text for d in docs) == ["plain text file\n"] + [f"remote {i}" for i in range(5)]
    assert stats.files == 3 and stats.skipped == {"binary_file": 1}
    only_txt, _ = read([f"s3://{s3_env.bucket}/ingest-corpus/"], include_globs=["*.txt"])
    assert [d.text for d in only_txt] == ["plain text file\n"]
    validate_sources([f"s3://{s3_env.bucket}/ingest-corpus/"])
    with pytest.raises(NotFound, match="no objects"):
        validate_sources([f"s3://{s3_env.bucket}/nothing-here/"])
