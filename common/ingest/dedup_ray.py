"""The MinHash stages on Ray Data, for corpora whose signatures or buckets outgrow one process.

Same three stages and the same results as ``dedup.near_duplicates`` (tested against it):

1. signatures: ``map_batches`` over a dataset of ``{"doc": int, "text": str}`` rows, one MinHasher
   per worker (``signatures_ray``); or reuse signatures already computed by the local pool.
2. buckets: every (band, key, doc) triple is a row; ``groupby(["band", "key"])`` shuffles rows
   with equal keys to one worker, which emits a star of candidate pairs around the lowest doc.
3. clusters: candidate pairs (few compared with documents) are verified against the signatures
   and merged with union-find on the driver, like datatrove's single-task cluster stage.

Ray is imported lazily; this module is optional (the ``ray`` extra).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tokenmill.common.ingest.dedup import (
    MinHashConfig,
    MinHasher,
    NearDupResult,
    connected_components,
    verify_pairs,
)


def _band_rows(batch: dict[str, np.ndarray], config: MinHashConfig) -> dict[str, np.ndarray]:
    hasher = MinHasher(config)
    sigs = np.stack(list(batch["sig"])).astype(np.uint32)
    keys = hasher.band_keys(sigs)  # [n, bands]
    n, bands = keys.shape
    return {
        "band": np.tile(np.arange(bands, dtype=np.int64), n),
        "key": keys.reshape(-1).astype(np.uint64),
        "doc": np.repeat(batch["doc"].astype(np.int64), bands),
    }


def _bucket_pairs(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    docs = np.sort(group["doc"])
    if docs.size < 2:
        return {"a": np.empty(0, dtype=np.int64), "b": np.empty(0, dtype=np.int64)}
    return {"a": np.full(docs.size - 1, docs[0], dtype=np.int64), "b": docs[1:]}


def signatures_ray(texts: list[str], config: MinHashConfig, *, parallelism: int = 0) -> np.ndarray:
    """``[N, num_perm]`` signatures computed by Ray workers (rows keep their input order)."""
    import ray.data

    def sign(batch: dict[str, Any]) -> dict[str, Any]:
        hasher = MinHasher(config)
        return {"doc": batch["doc"], "sig": np.stack([hasher.signature(str(t)) for t in batch["text"]])}

    ds = ray.data.from_items(
        [{"doc": i, "text": t} for i, t in enumerate(texts)], override_num_blocks=parallelism or None
    )
    out = np.empty((len(texts), config.num_perm), dtype=np.uint32)
    for batch in ds.map_batches(sign, batch_format="numpy").iter_batches(batch_format="numpy"):
        out[batch["doc"]] = batch["sig"]
    return out


def near_duplicates_ray(sigs: np.ndarray, config: MinHashConfig, *, parallelism: int = 0) -> NearDupResult:
    """Buckets on Ray Data, verification + clusters on the driver."""
    import ray.data

    n = len(sigs)
    if n == 0:
        return NearDupResult(np.empty(0, dtype=np.int64), 0, 0)
    items = ray.data.from_items(
        [{"doc": i, "sig": np.asarray(sigs[i], dtype=np.uint32)} for i in range(n)],
        override_num_blocks=parallelism or None,
    )
    # ray types a batch UDF as one-argument; the second (config) comes from fn_kwargs
    rows = items.map_batches(_band_rows, fn_kwargs={"config": config}, batch_format="numpy")  # type: ignore[arg-type]
    pairs_ds = rows.groupby(["band", "key"]).map_groups(_bucket_pairs, batch_format="numpy")
    chunks = [
        np.stack([b["a"], b["b"]], axis=1) for b in pairs_ds.iter_batches(batch_format="numpy") if len(b["a"])
    ]
    pairs = np.unique(np.concatenate(chunks), axis=0) if chunks else np.empty((0, 2), dtype=np.int64)
    verified = verify_pairs(sigs, pairs, config.threshold)
    return NearDupResult(connected_components(n, verified), len(pairs), len(verified))
