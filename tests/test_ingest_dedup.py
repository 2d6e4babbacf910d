"""MinHash + LSH near-duplicate detection: planted pairs of known Jaccard similarity."""

from __future__ import annotations

import numpy as np
import pytest

from services.ingest.engine.dedup import (
    MinHashConfig,
    MinHasher,
    candidate_pairs,
    connected_components,
    content_hash,
    lsh_probability,
    near_duplicates,
)
from tests.fixtures.ingest import english_doc, mutate

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
