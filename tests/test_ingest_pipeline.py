"""The whole pipeline: per-stage counts, packing round trip, atomic publication, cancel, kill, reuse."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.ingest import english_doc, good_web_text, mutate, write_jsonl
from tokenmill.common.data.dataset import MANIFEST, PackedDataset, TokenSampler
from tokenmill.common.errors import AlreadyExists, Cancelled, FailedPrecondition, NotFound
from tokenmill.common.ingest import tokenizer as tk
from tokenmill.common.ingest.pipeline import run_ingest
from tokenmill.common.ingest.registry import DatasetRegistry
from tokenmill.common.ingest.spec import IngestSpec

ROOT = Path(__file__).resolve().parents[1]


def spec(name: str, sources, **kw) -> IngestSpec:
    kw.setdefault("num_workers", 1)
    kw.setdefault("vocab_size", 400)
    return IngestSpec(name=name, sources=[str(s) for s in sources], **kw)


def decoded(path: Path) -> list[str]:
    tok = tk.load_tokenizer(path / "tokenizer.json")
    out = []
    for split in ("train", "val"):
        ds = PackedDataset(path, split, verify=True)
        out += [tok.decode(d.tolist(), skip_special_tokens=False) for d in ds.documents()]
    return out


def stage(manifest, name):
    return next(s for s in manifest["stages"] if s["stage"] == name)


def test_web_pipeline_counts_and_round_trip(tmp_path, web_corpus):
    m = run_ingest(spec("web", [web_corpus], val_fraction=0.2), tmp_path)
    assert stage(m, "read")["docs_out"] == 14
    assert stage(m, "gopher_repetition")["reasons"] == {
        "top_2_gram": 1
    }  # runs before gopher_quality, as in FineWeb
    assert stage(m, "exact_dedup")["reasons"] == {"duplicate": 1}
    assert m["documents"] == 12
    assert m["tokens"]["train"] > 0 and m["tokens"]["val"] > 0
    assert m["splits"]["val"] and m["eos_id"] == 0 and m["token_dtype"] == "uint16"
    texts = decoded(tmp_path / "datasets" / "web")
    # The C4 rule rewrites documents to their kept lines; every line here ends a sentence, so the
    # cleaned text equals the input (minus trailing whitespace). PII in "note number" lines: none.
    src = [json.loads(line)["text"] for line in web_corpus.read_text().splitlines()]
    assert sorted(texts) == sorted(set(src[:12]))
    for a in m["stages"]:
        assert a["docs_out"] <= a["docs_in"]


def test_encoded_text_starts_where_packed_documents_start(tmp_path, web_corpus):
    """Packed documents each follow an eos; the trained tokenizer puts that eos in front of encoded
    text (as HF's AutoTokenizer over the same file does), so a served prompt starts like a document."""
    from transformers import PreTrainedTokenizerFast

    run_ingest(spec("web", [web_corpus]), tmp_path)
    path = tmp_path / "datasets" / "web"
    tok = tk.load_tokenizer(path / "tokenizer.json")
    eos = tk.eos_id(tok)
    ds = PackedDataset(path, "train", verify=True)
    assert all(eos not in d.tolist() for d in ds.documents())  # packing adds only the separators
    text = "class Parser:"
    ids = tok.encode(text).ids
    assert ids == [eos, *tok.encode(text, add_special_tokens=False).ids]
    assert tok.decode(ids) == text
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    assert hf(text)["input_ids"] == ids


def test_pii_and_near_dups_in_packed_text(tmp_path):
    base = good_web_text()
    docs = [{"text": base + "\nWrite to jane.doe@example.com for a copy of the full report."}]
    docs += [{"text": english_doc(i, 200) + "\n" + good_web_text(seed=i)} for i in range(1, 6)]
    docs.append({"text": mutate(docs[1]["text"], 0.95, seed=3)})
    path = write_jsonl(tmp_path / "in.jsonl", docs)
    m = run_ingest(
        spec("pii", [path], filter_overrides={"language": False, "c4": False, "fineweb": False}), tmp_path
    )
    assert stage(m, "pii")["reasons"]["email"] == 1
    assert stage(m, "near_dedup")["reasons"]["near_duplicate"] == 1
    texts = decoded(tmp_path / "datasets" / "pii")
    assert any("<EMAIL>" in t for t in texts) and not any("jane.doe" in t for t in texts)
    assert len(texts) == 6
    tok = tk.load_tokenizer(tmp_path / "datasets" / "pii" / "tokenizer.json")
    assert len(tok.encode("<EMAIL>", add_special_tokens=False).ids) == 1


def test_code_tree_with_pool_workers_round_trip(tmp_path):
    root = tmp_path / "src"
    (root / "pkg").mkdir(parents=True)
    files = {}
    for i in range(12):
        words = english_doc(i, 60).rstrip(".").split()  # distinct identifiers per module
        body = "\n".join(
            f"def {a}_{b}(x):\n    return x.{c}({d!r})\n"
            for a, b, c, d in zip(*[iter(words)] * 4, strict=False)
        )
        files[f"pkg/m{i}.py"] = f'"""Module {i}. Author: dev{i}@example.org"""\n{body}'
    files["pkg/copy.py"] = files["pkg/m0.py"]  # exact duplicate
    for rel, text in files.items():
        (root / rel).write_text(text)
    (root / "pkg" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")  # excluded by name
    (root / "pkg" / "table.dat").write_bytes(b"\x00\x01\x02\x03" * 64)  # detected as binary
    (root / "pkg" / "bad.py").write_bytes(
        b"x = '\xff\xfe'\n" + b"".join(b"y%d = %d\n" % (i, i) for i in range(10))
    )
    (root / "pkg" / "junk.py").write_text("print('hello world')\n" * 50)  # one repeated line
    (root / "pkg" / "twice.py").write_text(files["pkg/m1.py"] + "\n" + files["pkg/m1.py"])  # a pasted block
    (root / "pkg" / "LICENSE.py").write_text(
        "# Copyright (c) 2024 Example\n# Licensed under the MIT License.\n"
    )
    m = run_ingest(spec("code", [root], preset="code", num_workers=2), tmp_path)
    assert stage(m, "read")["reasons"]["binary_file"] == 1
    assert stage(m, "normalize")["reasons"]["encoding_errors"] == 1
    assert stage(m, "license_only")["reasons"] == {"license_header_only": 1}
    assert stage(m, "exact_dedup")["reasons"] == {"duplicate": 1}
    assert stage(m, "repetition")["reasons"] == {"dup_block_fraction": 1, "dup_line_fraction": 1}
    assert stage(m, "pii")["reasons"]["email"] == 13  # PII runs before exact dedup: the copy counts too
    assert m["stats"]["workers"] == 2
    texts = decoded(tmp_path / "datasets" / "code")
    assert len(texts) == 13  # 12 modules + bad.py
    assert all("@example.org" not in t for t in texts)
    assert "x = '\ufffd\ufffd'\n" + "".join(f"y{i} = {i}\n" for i in range(9)) + "y9 = 9" in texts


def test_sampler_reads_an_ingested_dataset(tmp_path, web_corpus):
    run_ingest(spec("s", [web_corpus]), tmp_path)
    ds = PackedDataset(tmp_path / "datasets" / "s", "train")
    x, y = TokenSampler(ds, seq_len=16, batch_size=2).next_batch()
    assert x.shape == (2, 16) and int(x.max()) < ds.vocab_size


def test_existing_name_and_tokenizer_reuse(tmp_path, web_corpus):
    first = run_ingest(spec("a", [web_corpus]), tmp_path)
    with pytest.raises(AlreadyExists, match="delete it first"):
        run_ingest(spec("a", [web_corpus]), tmp_path)
    second = run_ingest(spec("b", [web_corpus], tokenizer="dataset:a"), tmp_path)
    assert second["tokenizer"]["trained"] is False
    assert second["tokens"] == first["tokens"]
    a = (tmp_path / "datasets" / "a" / "tokenizer.json").read_bytes()
    assert (tmp_path / "datasets" / "b" / "tokenizer.json").read_bytes() == a
    with pytest.raises(NotFound, match="tokenizer source dataset"):
        run_ingest(spec("c", [web_corpus], tokenizer="dataset:zzz"), tmp_path)
    reg = DatasetRegistry(tmp_path)
    assert reg.names() == ["a", "b"]
    assert reg.delete("a") and not reg.delete("a")
    assert reg.names() == ["b"]


def test_nothing_survives_is_failed_precondition(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"body": "no text field"}] * 3)
    with pytest.raises(FailedPrecondition, match="text_field"):
        run_ingest(spec("empty", [path]), tmp_path)
    assert not (tmp_path / "datasets" / "empty").exists()
    assert not [p for p in (tmp_path / "datasets").iterdir() if p.name.startswith(".tmp-")]


def test_max_documents(tmp_path, web_corpus):
    m = run_ingest(spec("few", [web_corpus], max_documents=5, batch_size=2), tmp_path)
    assert stage(m, "read")["docs_out"] == 5
    assert m["documents"] == 5


def test_cancel_leaves_nothing(tmp_path, web_corpus):
    calls = 0

    def check():
        nonlocal calls
        calls += 1
        if calls > 3:
            raise Cancelled("cancelled by test")

    with pytest.raises(Cancelled):
        run_ingest(spec("c", [web_corpus], batch_size=2), tmp_path, check_cancel=check)
    assert list((tmp_path / "datasets").iterdir()) == []


def test_killed_run_leaves_no_dataset_and_restart_cleans(tmp_path, web_corpus):
    marker = tmp_path / "packing"
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from tokenmill.common.ingest.pipeline import run_ingest
        from tokenmill.common.ingest.spec import IngestSpec
        def progress(d):
            if d.get("phase") == "pack":
                open({str(marker)!r}, "w").close()
                time.sleep(60)
        spec = IngestSpec(name="k", sources=[{str(web_corpus)!r}], num_workers=1, vocab_size=400)
        run_ingest(spec, {str(tmp_path)!r}, run_id="run1", progress=progress)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "the ingest process ended before packing"
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    datasets = tmp_path / "datasets"
    leftovers = [p.name for p in datasets.iterdir()]
    assert leftovers == [".tmp-k-run1"], leftovers  # shards half written, never registered
    assert not (datasets / "k").exists()
    assert DatasetRegistry(tmp_path).names() == []
    m = run_ingest(spec("k", [web_corpus]), tmp_path)  # a new run removes the dead run's temp dir
    assert [p.name for p in datasets.iterdir()] == ["k"]
    assert (datasets / "k" / MANIFEST).is_file() and m["documents"] == 12
    assert np.array_equal(
        PackedDataset(datasets / "k").tokens(0, 5), PackedDataset(datasets / "k").tokens(0, 5)
    )
