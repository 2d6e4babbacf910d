"""The four phases of an ingest run, in order, each over the run's ``RunState``:

1. ``read_and_filter``: sources -> per-document stages (a process pool when workers > 1) -> exact
   dedup; survivors to the spill file, their MinHash signatures to a flat ``uint32`` file.
2. ``near_dedup``: LSH buckets and clusters over the memory-mapped signatures.
3. ``tokenize_and_pack``: reuse or train the tokenizer, split train/val, write packed shards.
4. ``publish``: assemble the manifest and publish the dataset atomically (see ``workspace``).

Memory stays bounded: at most ``2 * workers`` batches are in flight and the driver keeps 16 bytes
(a content hash) per surviving document. Cancellation is cooperative: ``check_cancel()`` runs
between batches of every phase.
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing as mp
import shutil
import time
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from tokenmill.common.data.dataset import TOKENIZER, ShardWriter, token_dtype_for
from tokenmill.common.errors import FailedPrecondition
from tokenmill.common.ingest import tokenizer as tk
from tokenmill.common.ingest import workspace
from tokenmill.common.ingest.dedup import (
    MinHashConfig,
    MinHasher,
    NearDupResult,
    lsh_probability,
    near_duplicates,
)
from tokenmill.common.ingest.run_state import SPLITS, RunState
from tokenmill.common.ingest.sources import RawDoc, iter_sources
from tokenmill.common.ingest.stages import Batch, BatchResult, StageCount, init_worker, process_batch

if TYPE_CHECKING:
    from tokenizers import Tokenizer

FORMAT_VERSION = 1
PACK_BATCH = 1024  # documents tokenized per encode_batch call (and between cancel checks)


# ------------------------------------------------------------------------------ 1. read and filter


def read_and_filter(state: RunState) -> None:
    """Read every source, run the per-document stages, and spill the first copy of each document."""
    spec = state.spec
    docs = iter_sources(spec.sources, spec.source_options(), state.read_stats, state.input_roots)
    batches = _batches(docs, spec.batch_size, spec.max_documents)
    with (
        state.spill,
        open(state.signatures_path, "wb") as signatures,
        closing(_filtered(state, batches)) as results,
    ):
        for result in results:
            _absorb(state, result, signatures)
            _report_filter(state)
    _report_filter(state, force=True)
    state.check_cancel()


def _batches(docs: Iterator[RawDoc], size: int, limit: int) -> Iterator[Batch]:
    """Batches of ``size`` documents, stopping after ``limit`` documents (0: no limit)."""
    batch: Batch = []
    for n, raw in enumerate(docs, 1):
        batch.append((raw.id, raw.text, raw.encoding_errors))
        if len(batch) == size:
            yield batch
            batch = []
        if limit and n >= limit:
            break
    if batch:
        yield batch


def _filtered(state: RunState, batches: Iterable[Batch]) -> Generator[BatchResult, None, None]:
    """Each batch through the per-document stages, in order; in this process when workers == 1."""
    if state.spec.workers > 1:
        yield from _filtered_in_pool(state, batches)
        return
    for batch in batches:
        state.check_cancel()
        yield state.chain.process(batch)


def _filtered_in_pool(state: RunState, batches: Iterable[Batch]) -> Generator[BatchResult, None, None]:
    # spawn, not fork: the gRPC server that calls us has threads. ProcessPoolExecutor (unlike
    # multiprocessing.Pool) raises BrokenProcessPool when a worker dies instead of hanging.
    workers = state.spec.workers
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=init_worker, initargs=(state.spec.to_dict(),)
    ) as pool:
        inflight: collections.deque[Future[BatchResult]] = collections.deque()
        try:
            for batch in batches:
                state.check_cancel()
                inflight.append(pool.submit(process_batch, batch))
                while len(inflight) >= 2 * workers or (inflight and inflight[0].done()):
                    yield _result(inflight.popleft())
            while inflight:
                state.check_cancel()
                yield _result(inflight.popleft())
        finally:
            for fut in inflight:
                fut.cancel()


def _result(fut: Future[BatchResult]) -> BatchResult:
    try:
        return fut.result()
    except BrokenProcessPool:
        raise RuntimeError(
            "an ingest worker process died (killed, or out of memory); lower num_workers or max_doc_bytes"
        ) from None


def _absorb(state: RunState, res: BatchResult, signatures: IO[bytes]) -> None:
    """Add a batch's stage counts, then exact dedup: spill each content hash's first document."""
    for name, count in res.counts.items():
        state.counts[name].add(count)
    state.docs_read += res.counts["normalize"].docs_in
    exact = state.exact
    keep_rows = []
    for i, (text, h) in enumerate(zip(res.texts, res.hashes, strict=True)):
        n = len(text.encode("utf-8", "surrogatepass"))
        exact.docs_in += 1
        exact.bytes_in += n
        if h in state.seen:
            exact.reasons["duplicate"] += 1
            continue
        state.seen.add(h)
        exact.docs_out += 1
        exact.bytes_out += n
        state.spill.append(text)
        state.hashes.append(h)
        keep_rows.append(i)
    if res.signatures.size and keep_rows:
        signatures.write(np.ascontiguousarray(res.signatures[keep_rows]).tobytes())


def _report_filter(state: RunState, force: bool = False) -> None:
    elapsed = max(1e-9, time.monotonic() - state.progress.start)
    kept = {name: round(c.kept_fraction, 4) for name, c in state.counts.items()}
    kept["exact_dedup"] = round(state.exact.kept_fraction, 4)
    state.progress.emit(
        force,
        phase="filter",
        docs=state.docs_read,
        bytes=state.read_stats.bytes,
        docs_per_s=round(state.docs_read / elapsed, 1),
        bytes_per_s=round(state.read_stats.bytes / elapsed, 1),
        kept=kept,
        kept_docs=state.exact.docs_out,
    )


# ------------------------------------------------------------------------------ 2. near dedup


def near_dedup(state: RunState) -> None:
    """Mark near-duplicates in ``state.keep``; fail the run when no document is left."""
    spec = state.spec
    n = state.spill.count
    near = state.near = StageCount("near_dedup", docs_in=n, bytes_in=state.exact.bytes_out)
    state.keep = np.ones(n, dtype=bool)
    state.dedup_info = {"enabled": not spec.skip_near_dedup}
    hasher = state.chain.hasher
    if hasher is not None and n:
        result = _near_duplicates(state, hasher)
        state.keep = result.keep
        near.reasons["near_duplicate"] = result.removed
        near.reasons["clusters"] = result.clusters
        near.reasons["candidate_pairs"] = result.candidate_pairs
        near.reasons["verified_pairs"] = result.verified_pairs
        state.dedup_info.update(_minhash_doc(hasher.config), backend=spec.dedup_backend)
    near.docs_out = int(state.keep.sum())
    state.progress.emit(True, phase="near_dedup", kept_docs=near.docs_out, removed=n - near.docs_out)
    state.check_cancel()
    if near.docs_out == 0:
        raise FailedPrecondition(
            f"no documents survived filtering ({state.docs_read} read); check the sources, the "
            f"text_field ({spec.text_field!r}) and the preset ({spec.preset!r}); per-stage counts: "
            + json.dumps([c.to_dict() for c in [*state.counts.values(), state.exact]])
        )


def _near_duplicates(state: RunState, hasher: MinHasher) -> NearDupResult:
    """Buckets + clusters over the spilled signatures, memory-mapped (unmapped on return)."""
    cfg = hasher.config
    sigs = np.memmap(
        state.signatures_path, dtype=np.uint32, mode="r", shape=(state.spill.count, cfg.num_perm)
    )
    if state.spec.dedup_backend == "ray":
        from tokenmill.common.ingest.dedup_ray import near_duplicates_ray

        return near_duplicates_ray(sigs, cfg)
    return near_duplicates(sigs, hasher)


def _minhash_doc(cfg: MinHashConfig) -> dict[str, Any]:
    """The manifest's description of the MinHash settings (and what they catch)."""
    return {
        "shingles": f"word {cfg.ngram}-grams",
        "hash_family": cfg.hash_family,
        "word_split": cfg.word_split,
        "bands": cfg.bands,
        "rows": cfg.rows,
        "num_perm": cfg.num_perm,
        "lsh_threshold": round(cfg.lsh_threshold, 4),
        "verify_threshold": cfg.threshold,
        "candidate_probability": {
            str(s): round(lsh_probability(s, cfg.bands, cfg.rows), 4) for s in (0.5, 0.7, 0.8, 0.9)
        },
    }


# ------------------------------------------------------------------------------ 3. tokenize and pack


def tokenize_and_pack(state: RunState) -> None:
    """Get the tokenizer, then tokenize the kept documents into train/val shards."""
    _pack(state, _tokenizer(state))


def _tokenizer(state: RunState) -> Tokenizer:
    """Reuse the spec's tokenizer or train one on the kept documents; saved into the dataset."""
    spec = state.spec
    reuse = tk.resolve_tokenizer(spec.tokenizer, state.root, state.input_roots)
    if reuse is not None:
        tok = tk.load_tokenizer(reuse)
        shutil.copyfile(reuse, state.tmp / TOKENIZER)
        info: dict[str, Any] = {"source": spec.tokenizer, "trained": False}
    else:
        kept = state.near.docs_out
        state.progress.emit(True, phase="tokenizer", docs=kept)
        texts = _cancellable(state.spill.read(state.keep), state)
        tok = tk.train_tokenizer(texts, spec.vocab_size, length=kept)
        tok.save(str(state.tmp / TOKENIZER))
        info = {"source": "trained", "trained": True, "requested_vocab_size": spec.vocab_size}
    state.vocab_size = tk.vocab_size(tok)
    state.eos_id = tk.eos_id(tok)
    info.update({"vocab_size": state.vocab_size, "eos_id": state.eos_id, "eos_token": tk.EOS})
    state.tokenizer_info = info
    return tok


def _cancellable(texts: Iterator[str], state: RunState) -> Iterator[str]:
    """``texts``, checking for cancellation every ``PACK_BATCH`` documents (tokenizer training)."""
    for j, text in enumerate(texts):
        if j % PACK_BATCH == 0:
            state.check_cancel()
        yield text


def _pack(state: RunState, tok: Tokenizer) -> None:
    spec = state.spec
    kept_hashes = [h for h, k in zip(state.hashes, state.keep, strict=True) if k]
    val_mask = _val_mask(kept_hashes, spec.val_fraction, spec.seed)
    state.pack = StageCount("pack", docs_in=state.near.docs_out)
    writers = {
        split: ShardWriter(
            state.tmp,
            split,
            vocab_size=state.vocab_size,
            eos_id=state.eos_id,
            max_tokens_per_shard=spec.max_tokens_per_shard,
        )
        for split in SPLITS
    }
    batch: list[str] = []
    for text in state.spill.read(state.keep):
        batch.append(text)
        if len(batch) >= PACK_BATCH:
            _pack_batch(state, tok, batch, val_mask, writers)
            batch = []
    if batch:
        _pack_batch(state, tok, batch, val_mask, writers)
    state.splits = {split: w.close() for split, w in writers.items()}
    state.pack.docs_out = state.documents
    itemsize = np.dtype(token_dtype_for(state.vocab_size)).itemsize
    state.pack.bytes_out = sum(e["tokens"] for s in state.splits.values() for e in s) * itemsize
    state.pack.reasons.update(
        {"train_documents": state.split_docs["train"], "val_documents": state.split_docs["val"]}
    )
    state.near.bytes_out = state.pack.bytes_in


def _pack_batch(
    state: RunState,
    tok: Tokenizer,
    batch: list[str],
    val_mask: np.ndarray,
    writers: dict[str, ShardWriter],
) -> None:
    first = state.documents == 0
    for text, enc in zip(batch, tok.encode_batch(batch, add_special_tokens=False), strict=True):
        split = "val" if val_mask[state.documents] else "train"
        writers[split].add(np.asarray(enc.ids, dtype=np.int64))
        state.tokens[split] += len(enc.ids) + 1
        state.split_docs[split] += 1
        state.pack.bytes_in += len(text.encode("utf-8", "surrogatepass"))
    state.check_cancel()
    done, total = state.documents, state.near.docs_out
    tokens = state.tokens["train"] + state.tokens["val"]
    state.progress.emit(first or done == total, phase="pack", docs=done, of=total, tokens=tokens)


def _val_mask(hashes: list[bytes], fraction: float, seed: int) -> np.ndarray:
    """Deterministic on (content hash, seed); at least one val document when asked for, never all."""
    n = len(hashes)
    if n == 0 or fraction <= 0:
        return np.zeros(n, dtype=bool)
    salt = seed.to_bytes(8, "little", signed=False)
    u = np.array(
        [int.from_bytes(hashlib.blake2b(h, digest_size=8, key=salt).digest(), "little") for h in hashes],
        dtype=np.uint64,
    )
    mask = u < np.uint64(min(fraction, 1.0) * 2**64 - 1)
    if not mask.any() and n >= 2:
        mask[int(np.argmin(u))] = True
    if mask.all() and n >= 2:
        mask[int(np.argmax(u))] = False
    return mask


# ------------------------------------------------------------------------------ 4. publish


def publish(state: RunState) -> dict[str, Any]:
    """Write the manifest and make the dataset visible as ``datasets/<name>``; returns the manifest."""
    manifest = _manifest(state)
    workspace.publish(state.tmp, state.root / state.spec.name, manifest)
    return manifest


def _read_stage(state: RunState) -> StageCount:
    """The ``read`` stage: what the sources held, what was skipped, and what went on to be filtered."""
    stats = state.read_stats
    read = StageCount(
        "read",
        docs_in=stats.docs + sum(stats.skipped.values()),
        docs_out=state.docs_read,
        bytes_in=stats.bytes,
        bytes_out=state.counts["normalize"].bytes_in,
        reasons=collections.Counter(stats.skipped),
    )
    read.reasons["files"] = stats.files
    if state.spec.max_documents and stats.docs > state.docs_read:
        read.reasons["over_max_documents"] = stats.docs - state.docs_read
    return read


def _manifest(state: RunState) -> dict[str, Any]:
    stages = [_read_stage(state), *state.counts.values(), state.exact, state.near, state.pack]
    finished = time.time()
    seconds = max(1e-9, finished - state.started)
    return {
        "format_version": FORMAT_VERSION,
        "name": state.spec.name,
        "created_at": finished,
        "run_id": state.run_id,
        "token_dtype": token_dtype_for(state.vocab_size),
        "vocab_size": state.vocab_size,
        "eos_id": state.eos_id,
        "documents": state.documents,
        "tokens": state.tokens,
        "splits": state.splits,
        "stages": [s.to_dict() for s in stages],
        "tokenizer": state.tokenizer_info,
        "dedup": state.dedup_info,
        "config": state.spec.to_dict(),
        "stats": {
            "seconds": round(finished - state.started, 3),
            "workers": state.spec.workers,
            "docs_per_s": round(state.docs_read / seconds, 2),
            "bytes_per_s": round(state.read_stats.bytes / seconds, 2),
        },
        "job_id": state.job_id,
    }
