"""The MinHash stages on Ray Data (a real local Ray instance) give the same clusters as the local path."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from tests.fixtures.ingest import english_doc, mutate
from tokenmill.common.ingest.dedup import MinHashConfig, MinHasher, near_duplicates

pytestmark = pytest.mark.slow


def test_ray_buckets_and_signatures_match_local(ray_local):
    from tokenmill.common.ingest.dedup_ray import near_duplicates_ray, signatures_ray

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


def test_pipeline_with_ray_dedup_backend(ray_local, tmp_path):
    from tests.fixtures.ingest import write_jsonl
    from tokenmill.common.ingest.pipeline import run_ingest
    from tokenmill.common.ingest.spec import IngestSpec

    docs = []
    for i in range(6):
        base = english_doc(900 + i, 150)
        docs += [{"text": textwrap.fill(base, 80)}, {"text": textwrap.fill(mutate(base, 0.95, seed=i), 80)}]
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    common = {"sources": [str(src)], "preset": "code", "num_workers": 1, "vocab_size": 400}
    ray_m = run_ingest(IngestSpec(name="r", dedup_backend="ray", **common), tmp_path)
    local_m = run_ingest(IngestSpec(name="l", **common), tmp_path)
    near = [next(s for s in m["stages"] if s["stage"] == "near_dedup") for m in (ray_m, local_m)]
    assert near[0]["reasons"] == near[1]["reasons"] and near[0]["reasons"]["near_duplicate"] == 6
    assert ray_m["dedup"]["backend"] == "ray" and ray_m["tokens"] == local_m["tokens"]
