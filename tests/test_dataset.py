"""Packed shard format, reader and the resumable, rank-sharded sampler (common/data/dataset.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tokenmill.common.data.dataset import (
    MANIFEST,
    PackedDataset,
    ShardWriter,
    TokenSampler,
    read_manifest,
    token_dtype_for,
    write_json_atomic,
)
from tokenmill.common.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound

VOCAB = 300
EOS = 0


def _build(tmp_path, docs, *, vocab=VOCAB, max_tokens=50, val_docs=()):
    out = tmp_path / "ds"
    out.mkdir()
    splits = {}
    for split, items in (("train", docs), ("val", val_docs)):
        with ShardWriter(out, split, vocab_size=vocab, eos_id=EOS, max_tokens_per_shard=max_tokens) as w:
            w.add_many(items)
            splits[split] = w.close()
    write_json_atomic(
        out / MANIFEST,
        {
            "name": "ds",
            "token_dtype": token_dtype_for(vocab),
            "vocab_size": vocab,
            "eos_id": EOS,
            "splits": splits,
            "stages": [],
            "config": {},
        },
    )
    return out


def _docs(n=40, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, size=int(rng.integers(1, 30))) for _ in range(n)]


def test_dtype_choice():
    assert token_dtype_for(65536) == "uint16"
    assert token_dtype_for(65537) == "uint32"
    with pytest.raises(InvalidArgument):
        token_dtype_for(0)


def test_round_trip_across_shards(tmp_path):
    docs = _docs()
    path = _build(tmp_path, docs)
    manifest = read_manifest(path)
    assert len(manifest["splits"]["train"]) > 1, "max_tokens=50 must split into several shards"
    ds = PackedDataset(path, "train", verify=True)
    assert ds.num_documents == len(docs)
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ds.document(i), doc)
    stream = np.concatenate([np.append(d, EOS) for d in docs])
    assert ds.num_tokens == stream.size
    np.testing.assert_array_equal(ds.tokens(0, ds.num_tokens), stream)
    np.testing.assert_array_equal(ds.tokens(45, 160), stream[45:160])
    raw = np.fromfile(path / "train-00000.bin", dtype="<u2")
    np.testing.assert_array_equal(raw, stream[: raw.size])
    assert PackedDataset(path, "val").num_tokens == 0


def test_uint32_when_vocab_is_large(tmp_path):
    docs = [np.array([70000, 5, 99999])]
    path = _build(tmp_path, docs, vocab=100000)
    ds = PackedDataset(path, "train")
    assert ds.dtype == np.dtype("<u4")
    np.testing.assert_array_equal(ds.document(0), docs[0])


def test_writer_rejects_out_of_vocab(tmp_path):
    w = ShardWriter(tmp_path, "train", vocab_size=10, eos_id=0)
    with pytest.raises(InvalidArgument):
        w.add([3, 10])
    with pytest.raises(InvalidArgument):
        ShardWriter(tmp_path, "test", vocab_size=10, eos_id=0)


def test_missing_and_corrupt_datasets(tmp_path):
    with pytest.raises(NotFound, match="tokenmill data list"):
        PackedDataset(tmp_path / "nothing")
    path = _build(tmp_path, _docs())
    with open(path / "train-00000.bin", "r+b") as f:
        f.write(b"\xff\xff")
    with pytest.raises(DataLoss, match="sha256"):
        PackedDataset(path, verify=True)
    (path / "train-00001.bin").write_bytes(b"\x00")
    with pytest.raises(DataLoss, match="bytes"):
        PackedDataset(path)
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(DataLoss):
        PackedDataset(path)


def test_sampler_shapes_targets_and_coverage(tmp_path):
    ds = PackedDataset(_build(tmp_path, _docs(80)))
    s = TokenSampler(ds, seq_len=8, batch_size=4, seed=3)
    x, y = s.next_batch()
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    seen = []
    s2 = TokenSampler(ds, seq_len=8, batch_size=1, seed=3)
    for _ in range(s2.num_windows):
        xb, _ = s2.next_batch()
        seen.append(tuple(xb[0].tolist()))
    expected = {tuple(ds.tokens(w * 8, w * 8 + 8).tolist()) for w in range(s2.num_windows)}
    assert set(seen) == expected, "one epoch visits every window exactly once"
    assert s2.epoch == 1


def test_sampler_is_deterministic_and_seed_dependent(tmp_path):
    ds = PackedDataset(_build(tmp_path, _docs(80)))
    a = [TokenSampler(ds, 8, 2, seed=5).next_batch()[0] for _ in range(2)]
    assert torch.equal(a[0], a[1])
    b = TokenSampler(ds, 8, 2, seed=6).next_batch()[0]
    assert not torch.equal(a[0], b)


def test_sampler_resume_exact_across_epochs(tmp_path):
    ds = PackedDataset(_build(tmp_path, _docs(30)))
    ref = TokenSampler(ds, 16, 3, seed=1)
    batches = [ref.next_batch() for _ in range(30)]  # crosses several epochs
    s = TokenSampler(ds, 16, 3, seed=1)
    for _ in range(11):
        s.next_batch()
    state = json.loads(json.dumps(s.state_dict()))  # survives JSON
    resumed = TokenSampler(ds, 16, 3, seed=1)
    resumed.load_state_dict(state)
    for want in batches[11:]:
        got = resumed.next_batch()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_sampler_rank_sharding_partitions_global_batch(tmp_path):
    ds = PackedDataset(_build(tmp_path, _docs(80)))
    single = TokenSampler(ds, 8, 4, seed=2)
    ranks = [TokenSampler(ds, 8, 2, rank=r, world_size=2, seed=2) for r in range(2)]
    for _ in range(5):
        whole = single.next_batch()[0]
        parts = torch.cat([r.next_batch()[0] for r in ranks])
        assert torch.equal(whole, parts)
    # resume on a different world size continues the same global sequence
    state = ranks[0].state_dict()
    one = TokenSampler(ds, 8, 4, seed=2)
    one.load_state_dict(state)
    assert torch.equal(one.next_batch()[0], single.next_batch()[0])


def test_sampler_bad_arguments(tmp_path):
    ds = PackedDataset(_build(tmp_path, _docs(3)))
    with pytest.raises(InvalidArgument):
        TokenSampler(ds, 8, 1, rank=2, world_size=2)
    with pytest.raises(FailedPrecondition, match="seq_len"):
        TokenSampler(ds, 10_000, 1)
    s = TokenSampler(ds, 4, 1, seed=1)
    with pytest.raises(FailedPrecondition):
        TokenSampler(ds, 4, 1, seed=2).load_state_dict(s.state_dict())
    with pytest.raises(FailedPrecondition):
        TokenSampler(ds, 3, 1, seed=1).load_state_dict(s.state_dict())
