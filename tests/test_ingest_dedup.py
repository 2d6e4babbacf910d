"""MinHash + LSH near-duplicate detection: planted pairs of known Jaccard similarity."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest

from tests.fixtures.ingest import english_doc, mutate
from tokenmill.common.ingest.dedup import (
    MinHashConfig,
    MinHasher,
    candidate_pairs,
    connected_components,
    content_hash,
    lsh_probability,
    near_duplicates,
    spacy_like_split,
)

H = MinHasher(MinHashConfig())


def jaccard(a: str, b: str, n: int = 5) -> float:
    def shingles(t: str) -> set[tuple[str, ...]]:
        w = MinHasher.simplify(t)
        return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}

    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def test_probability_curve_documented_values():
    cfg = MinHashConfig()
    assert cfg.num_perm == 260
    assert lsh_probability(0.9, cfg.bands, cfg.rows) > 0.99
    assert lsh_probability(0.5, cfg.bands, cfg.rows) < 0.005
    assert 0.78 < cfg.lsh_threshold < 0.81


def test_signature_is_deterministic_and_estimates_jaccard():
    a = english_doc(1, 400)
    b = mutate(a, 0.7, seed=2)
    sa, sb = H.signature(a), H.signature(b)
    assert np.array_equal(sa, MinHasher(MinHashConfig()).signature(a))
    assert sa.dtype == np.uint32 and sa.shape == (260,)
    assert abs((sa == sb).mean() - jaccard(a, b)) < 0.1
    assert content_hash("x") == content_hash("x") != content_hash("y")


def test_short_and_empty_texts():
    assert np.array_equal(H.signature("one two"), H.signature("One two!"))  # simplified equal
    assert not np.array_equal(H.signature("one two"), H.signature("one three"))
    assert (H.signature("") == 0xFFFFFFFF).all()


def test_planted_near_duplicates_recall_and_no_false_merges():
    docs: list[str] = []
    high: list[tuple[int, int]] = []
    low: list[tuple[int, int]] = []
    for i in range(60):
        base = english_doc(1000 + i, 300)
        docs.append(base)
        b = len(docs) - 1
        for k, target in enumerate((0.91, 0.94, 0.97)):
            docs.append(mutate(base, target, seed=i * 10 + k))
            high.append((b, len(docs) - 1))
        far = mutate(base, 0.35, seed=i * 10 + 7)
        docs.append(far)
        low.append((b, len(docs) - 1))
    sigs = np.stack([H.signature(d) for d in docs])
    res = near_duplicates(sigs, H)
    rep = res.representative
    measured_high = [(a, b) for a, b in high if jaccard(docs[a], docs[b]) >= 0.9]
    assert len(measured_high) >= 150
    recall = np.mean([rep[a] == rep[b] for a, b in measured_high])
    assert recall >= 0.95, recall
    for a, b in low:
        assert jaccard(docs[a], docs[b]) < 0.5
        assert rep[a] != rep[b], "a pair below Jaccard 0.5 was merged"
    # distinct base documents never merge with each other
    bases = [a for a, _ in low]
    assert len({int(rep[b]) for b in bases}) == len(bases)
    assert res.keep[bases].all(), "the first-read document represents its cluster"


def test_buckets_and_components():
    keys = np.array([[1, 5], [2, 5], [1, 6], [3, 7]], dtype=np.uint64)
    pairs = candidate_pairs(keys)
    assert {tuple(p) for p in pairs.tolist()} == {(0, 2), (0, 1)}
    rep = connected_components(4, pairs)
    assert rep.tolist() == [0, 0, 0, 3]
    assert connected_components(3, np.array([[2, 1], [1, 0]])).tolist() == [0, 0, 0]


@pytest.mark.parametrize("bands,rows", [(14, 8), (9, 13)])
def test_other_band_configs_work(bands, rows):
    h = MinHasher(MinHashConfig(bands=bands, rows=rows))
    a = english_doc(5, 200)
    sigs = np.stack([h.signature(a), h.signature(a + " extra words here"), h.signature(english_doc(6, 200))])
    res = near_duplicates(sigs, h)
    assert res.keep.tolist() == [True, False, True]


def _datatrove_reference(text: str, seed: int, num_perm: int, words: list[str]) -> np.ndarray:
    """datatrove's sha1/32-bit MinHash written out in Python integers: SHA-1 of each space-joined
    5-gram (first 4 bytes, little-endian), ((a*h + b) mod 2^64) mod (2^61 - 1), low 32 bits, min."""
    p = (1 << 61) - 1
    gen = np.random.RandomState(seed)
    a = gen.randint(1, p, dtype=np.uint64, size=num_perm).tolist()
    b = gen.randint(0, p, dtype=np.uint64, size=num_perm).tolist()
    hs = {
        struct.unpack("<I", hashlib.sha1(" ".join(words[i : i + 5]).encode()).digest()[:4])[0]
        for i in range(len(words) - 4)
    }
    return np.array(
        [min(((h * ak + bk) % 2**64) % p & 0xFFFFFFFF for h in hs) for ak, bk in zip(a, b, strict=True)],
        dtype=np.uint32,
    )


@pytest.mark.parametrize("seed", [1, 7])
def test_datatrove_sha1_family_matches_reference_bit_for_bit(seed):
    cfg = MinHashConfig(bands=4, rows=5, seed=seed, hash_family="datatrove-sha1")
    h = MinHasher(cfg)
    text = english_doc(11, 120) + " Café 3.14 cannot, naïve!"
    ref = _datatrove_reference(text, seed, cfg.num_perm, MinHasher.simplify(text))
    assert np.array_equal(h.signature(text), ref)
    assert not np.array_equal(MinHasher(MinHashConfig(bands=4, rows=5, seed=seed)).signature(text), ref)


def test_datatrove_sha1_family_matches_datatrove_itself():
    minhash = pytest.importorskip("datatrove.pipeline.dedup.minhash")  # bench-only extra
    hashing = pytest.importorskip("datatrove.utils.hashing")
    cfg = minhash.MinhashConfig(
        num_buckets=4, hashes_per_bucket=5, hash_config=hashing.HashConfig(precision=32, hash_fc="sha1")
    )
    step = minhash.MinhashDedupSignature(output_folder="/tmp", config=cfg)
    text = english_doc(12, 150)
    step.word_tokenizer = type("Ws", (), {"word_tokenize": staticmethod(str.split)})()  # no spaCy
    ref = np.concatenate([np.array(x, dtype=np.uint32) for x in step.get_signature(step.get_shingles(text))])
    ours = MinHasher(MinHashConfig(bands=4, rows=5, hash_family="datatrove-sha1")).signature(text)
    assert np.array_equal(ours, ref)


def test_datatrove_family_finds_planted_duplicates():
    h = MinHasher(MinHashConfig(hash_family="datatrove-sha1", word_split="spacy-like"))
    a = english_doc(21, 300)
    docs = [a, mutate(a, 0.95, seed=3), english_doc(22, 300)]
    res = near_duplicates(np.stack([h.signature(d) for d in docs]), h)
    assert res.keep.tolist() == [True, False, True]


def test_spacy_like_split_follows_spacy_english_rules():
    assert spacy_like_split("i cannot say id dont know") == [
        "i",
        "can",
        "not",
        "say",
        "i",
        "d",
        "do",
        "nt",
        "know",
    ]
    assert spacy_like_split("weigh 0g and 0kg of em0t") == [
        "weigh",
        "0",
        "g",
        "and",
        "0",
        "kg",
        "of",
        "em0",
        "t",
    ]
    assert spacy_like_split("└── ‘item °f") == ["└", "─", "─", "‘", "item", "°", "f"]
    assert spacy_like_split("plain words stay") == ["plain", "words", "stay"]
    h = MinHasher(MinHashConfig(word_split="spacy-like"))
    assert h.words("I cannot!") == ["i", "can", "not"]


def test_unknown_hash_family_or_split_is_rejected():
    with pytest.raises(ValueError, match="hash_family"):
        MinHashConfig(hash_family="md5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="word_split"):
        MinHashConfig(word_split="nltk")  # type: ignore[arg-type]
