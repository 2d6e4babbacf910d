"""The MinHash stages on Ray Data (a real local Ray instance) give the same clusters as the local path."""

from __future__ import annotations

import numpy as np
import pytest

from services.ingest.engine.dedup import MinHashConfig, MinHasher, near_duplicates
from tests.fixtures.ingest import english_doc, mutate

pytestmark = pytest.mark.slow


def test_ray_buckets_and_signatures_match_local(ray_local):
    from services.ingest.engine.dedup_ray import near_duplicates_ray, signatures_ray

    cfg = MinHashConfig()
    docs = []
    for i in range(20):
        base = english_doc(500 + i, 200)
        docs += [base, mutate(base, 0.95, seed=i)]
    docs.append(docs[0])
    hasher = MinHasher(cfg)
    local_sigs = np.stack([hasher.signature(d) for d in docs])
    ray_sigs = signatures_ray(docs, cfg, parallelism=2)
    assert np.array_equal(ray_sigs, local_sigs)
    local = near_duplicates(local_sigs, hasher)
    remote = near_duplicates_ray(ray_sigs, cfg, parallelism=2)
    assert np.array_equal(remote.representative, local.representative)
    assert remote.removed == local.removed >= 20
