"""The ingest pipeline driver: sources -> per-document stages (process pool) -> exact and near dedup
-> tokenizer -> packed shards -> manifest, published atomically.

Why it is shaped this way:

* Streaming with bounded memory: the driver reads batches lazily and keeps at most
  ``2 * workers`` batches in flight; survivors go to a length-prefixed spill file and their
  signatures to a flat ``uint32`` file that is memory-mapped for LSH. The driver holds only 16
  bytes per surviving document (its content hash).
* Atomic publication: everything is written under ``datasets/.tmp-<name>-<run>/``; the manifest
  is written last inside it, then the directory is renamed to ``datasets/<name>``. A dataset is
  visible only with its manifest, so a killed job never leaves a half dataset registered. A
  restarted job (same run id) or any later run for the same name removes temp directories whose
  owning process is gone.
* Cooperative cancel: ``check_cancel()`` runs between batches of every phase.
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from tokenmill.common.data.dataset import MANIFEST, TOKENIZER, ShardWriter, token_dtype_for, write_json_atomic
from tokenmill.common.errors import AlreadyExists, FailedPrecondition, NotFound
from tokenmill.common.ingest import tokenizer as tk
from tokenmill.common.ingest.dedup import MinHashConfig, lsh_probability, near_duplicates
from tokenmill.common.ingest.sources import SourceStats, iter_sources, validate_sources
from tokenmill.common.ingest.spec import IngestSpec
from tokenmill.common.ingest.stages import BatchResult, DocumentChain, StageCount, init_worker, process_batch
from tokenmill.common.inputs import check_input_allowed
from tokenmill.common.procs import pid_alive

ProgressFn = Callable[[dict[str, Any]], None]
_LEN = struct.Struct("<Q")
FORMAT_VERSION = 1


def datasets_dir(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / "datasets"


# ------------------------------------------------------------------------------------------ temp dirs


def clean_stale_temps(root: Path, name: str | None = None) -> list[Path]:
    """Remove ``.tmp-*`` run directories whose owner process (on this host) is gone."""
    removed = []
    if not root.is_dir():
        return removed
    prefix = f".tmp-{name}-" if name else ".tmp-"
    for d in root.iterdir():
        if not d.is_dir() or not d.name.startswith(prefix):
            continue
        try:
            owner = json.loads((d / "owner.json").read_text())
        except (OSError, ValueError):
            owner = {}
        if owner.get("host") == socket.gethostname() and pid_alive(int(owner.get("pid", 0))):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


# ------------------------------------------------------------------------------------------ spill file


class _Spill:
    """Length-prefixed UTF-8 documents, appended in order and read back sequentially."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.count = 0

    def append(self, text: str) -> None:
        data = text.encode("utf-8", "surrogatepass")
        self._f.write(_LEN.pack(len(data)))
        self._f.write(data)
        self.count += 1

    def close(self) -> None:
        self._f.close()

    def read(self, keep: np.ndarray | None = None) -> Iterator[str]:
        with open(self.path, "rb", buffering=1 << 20) as f:
            for i in range(self.count):
                (n,) = _LEN.unpack(f.read(_LEN.size))
                if keep is not None and not keep[i]:
                    f.seek(n, os.SEEK_CUR)
                    continue
                yield f.read(n).decode("utf-8", "surrogatepass")


# ------------------------------------------------------------------------------------------ progress


class _Progress:
    def __init__(self, fn: ProgressFn | None, interval: float = 0.5):
        self.fn, self.interval = fn, interval
        self.start = time.monotonic()
        self._last = 0.0

    def emit(self, force: bool = False, **data: Any) -> None:
        if self.fn is None:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        data["elapsed_s"] = round(now - self.start, 3)
        self.fn(data)


def _batches(it: Iterator[Any], size: int, limit: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for n, raw in enumerate(it, 1):
        batch.append((raw.id, raw.text, raw.encoding_errors))
        if len(batch) == size:
            yield batch
            batch = []
        if limit and n >= limit:
            break
    if batch:
        yield batch


# ------------------------------------------------------------------------------------------ the run


def resolve_tokenizer(spec: IngestSpec, root: Path, input_roots: Sequence[str] = ()) -> Path | None:
    """The tokenizer.json to reuse, or None to train one; validated before any work starts."""
    if not spec.tokenizer:
        return None
    if spec.tokenizer.startswith("dataset:"):
        other = spec.tokenizer.split(":", 1)[1]
        path = root / other / TOKENIZER
        if not (root / other / MANIFEST).is_file() or not path.is_file():
            raise NotFound(
                f"tokenizer source dataset {other!r} not found; list datasets with 'tokenmill data list'"
            )
        return path
    path = Path(check_input_allowed(spec.tokenizer, input_roots, what="tokenizer"))
    tk.load_tokenizer(path)
    return path


def check_input_locations(spec: IngestSpec, input_roots: Sequence[str]) -> None:
    """Only the `input_roots` checks of `preflight` (sources and a tokenizer file): cheap, and valid
    even when the rest of preflight is skipped (an idempotent resubmit of a finished job)."""
    for src in spec.sources:
        check_input_allowed(src, input_roots, what="source")
    if spec.tokenizer and not spec.tokenizer.startswith("dataset:"):
        check_input_allowed(spec.tokenizer, input_roots, what="tokenizer")


def preflight(spec: IngestSpec, data_dir: str | os.PathLike[str], input_roots: Sequence[str] = ()) -> None:
    """Everything that can be rejected before a job is queued (the RPC calls this).

    `input_roots` (config.input_roots) limits where sources and a tokenizer file may be read from."""
    spec.validate()
    validate_sources(spec.sources, input_roots)
    root = datasets_dir(data_dir)
    if (root / spec.name / MANIFEST).is_file():
        raise AlreadyExists(
            f"dataset {spec.name!r} already exists; delete it first ('tokenmill data delete {spec.name}') "
            "or choose another name"
        )
    resolve_tokenizer(spec, root, input_roots)


def run_ingest(
    spec: IngestSpec,
    data_dir: str | os.PathLike[str],
    *,
    run_id: str = "",
    job_id: str = "",
    progress: ProgressFn | None = None,
    check_cancel: Callable[[], None] | None = None,
    input_roots: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the whole pipeline and publish ``datasets/<name>``; returns the manifest."""
    preflight(spec, data_dir, input_roots)
    root = datasets_dir(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / spec.name
    if final.exists() and not (final / MANIFEST).exists():
        shutil.rmtree(final)  # a directory without a manifest is not a dataset (stray copy)
    clean_stale_temps(root, spec.name)
    run_id = run_id or job_id or uuid.uuid4().hex[:12]
    tmp = root / f".tmp-{spec.name}-{run_id}"
    if tmp.exists():
        shutil.rmtree(tmp)  # our own previous attempt
    tmp.mkdir()
    (tmp / "owner.json").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    try:
        manifest = _run(
            spec, tmp, root, run_id, _Progress(progress), check_cancel or (lambda: None), input_roots
        )
        manifest["job_id"] = job_id
        (tmp / "owner.json").unlink()
        shutil.rmtree(tmp / "work", ignore_errors=True)
        write_json_atomic(tmp / MANIFEST, manifest)
        try:
            os.rename(tmp, final)
        except OSError:
            if (final / MANIFEST).exists():
                raise AlreadyExists(f"dataset {spec.name!r} was created by another job meanwhile") from None
            raise
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _run(
    spec: IngestSpec,
    tmp: Path,
    root: Path,
    run_id: str,
    prog: _Progress,
    check_cancel: Callable[[], None],
    input_roots: Sequence[str],
) -> dict[str, Any]:
    started = time.time()
    work = tmp / "work"
    work.mkdir()
    chain = DocumentChain(spec)
    counts = chain.new_counts()
    read_stats = SourceStats()
    spill = _Spill(work / "docs.bin")
    sig_path = work / "signatures.u32"
    hashes: list[bytes] = []
    seen: set[bytes] = set()
    exact = StageCount("exact_dedup")
    docs_read = 0

    def absorb(res: BatchResult) -> None:
        nonlocal docs_read
        for name, c in res.counts.items():
            counts[name].add(c)
        docs_read += res.counts["normalize"].docs_in
        keep_rows = []
        for i, (text, h) in enumerate(zip(res.texts, res.hashes, strict=True)):
            n = len(text.encode("utf-8", "surrogatepass"))
            exact.docs_in += 1
            exact.bytes_in += n
            if h in seen:
                exact.reasons["duplicate"] += 1
                continue
            seen.add(h)
            exact.docs_out += 1
            exact.bytes_out += n
            spill.append(text)
            hashes.append(h)
            keep_rows.append(i)
        if res.signatures.size and keep_rows:
            sig_file.write(np.ascontiguousarray(res.signatures[keep_rows]).tobytes())

    def report(phase: str, force: bool = False) -> None:
        elapsed = max(1e-9, time.monotonic() - prog.start)
        kept = {name: round(c.kept_fraction, 4) for name, c in counts.items()}
        kept["exact_dedup"] = round(exact.kept_fraction, 4)
        prog.emit(
            force,
            phase=phase,
            docs=docs_read,
            bytes=read_stats.bytes,
            docs_per_s=round(docs_read / elapsed, 1),
            bytes_per_s=round(read_stats.bytes / elapsed, 1),
            kept=kept,
            kept_docs=exact.docs_out,
        )

    batches = _batches(
        iter_sources(spec.sources, spec.source_options(), read_stats, input_roots),
        spec.batch_size,
        spec.max_documents,
    )
    workers = spec.workers
    with open(sig_path, "wb") as sig_file:
        if workers == 1:
            for batch in batches:
                check_cancel()
                absorb(chain.process(batch))
                report("filter")
        else:
            # spawn, not fork: the gRPC server that calls us has threads. ProcessPoolExecutor (unlike
            # multiprocessing.Pool) raises BrokenProcessPool when a worker dies instead of hanging.
            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=init_worker, initargs=(spec.to_dict(),)
            ) as pool:
                inflight: collections.deque = collections.deque()
                try:
                    for batch in batches:
                        check_cancel()
                        inflight.append(pool.submit(process_batch, batch))
                        while len(inflight) >= 2 * workers or (inflight and inflight[0].done()):
                            absorb(_result(inflight.popleft()))
                            report("filter")
                    while inflight:
                        check_cancel()
                        absorb(_result(inflight.popleft()))
                        report("filter")
                finally:
                    for fut in inflight:
                        fut.cancel()
    spill.close()
    report("filter", force=True)
    check_cancel()

    # near-duplicates: buckets + clusters over the memory-mapped signatures
    n = spill.count
    near = StageCount("near_dedup", docs_in=n, bytes_in=exact.bytes_out)
    keep = np.ones(n, dtype=bool)
    minhash: dict[str, Any] = {"enabled": not spec.skip_near_dedup}
    if chain.hasher is not None and n:
        cfg = chain.hasher.config
        sigs = np.memmap(sig_path, dtype=np.uint32, mode="r", shape=(n, cfg.num_perm))
        if spec.dedup_backend == "ray":
            from tokenmill.common.ingest.dedup_ray import near_duplicates_ray

            result = near_duplicates_ray(sigs, cfg)
        else:
            result = near_duplicates(sigs, chain.hasher)
        keep = result.keep
        near.reasons["near_duplicate"] = result.removed
        near.reasons["clusters"] = result.clusters
        near.reasons["candidate_pairs"] = result.candidate_pairs
        near.reasons["verified_pairs"] = result.verified_pairs
        minhash.update(_minhash_doc(cfg), backend=spec.dedup_backend)
        del sigs
    near.docs_out = int(keep.sum())
    prog.emit(True, phase="near_dedup", kept_docs=near.docs_out, removed=n - near.docs_out)
    check_cancel()
    if near.docs_out == 0:
        raise FailedPrecondition(
            f"no documents survived filtering ({docs_read} read); check the sources, the text_field "
            f"({spec.text_field!r}) and the preset ({spec.preset!r}); per-stage counts: "
            + json.dumps([c.to_dict() for c in [*counts.values(), exact]])
        )

    # tokenizer: reuse or train on the surviving documents
    reuse = resolve_tokenizer(spec, root, input_roots)
    if reuse is not None:
        tok = tk.load_tokenizer(reuse)
        shutil.copyfile(reuse, tmp / TOKENIZER)
        tok_info = {"source": spec.tokenizer, "trained": False}
    else:
        prog.emit(True, phase="tokenizer", docs=near.docs_out)
        tok = tk.train_tokenizer(spec_texts(spill, keep, check_cancel), spec.vocab_size, length=near.docs_out)
        tok.save(str(tmp / TOKENIZER))
        tok_info = {"source": "trained", "trained": True, "requested_vocab_size": spec.vocab_size}
    vocab = tk.vocab_size(tok)
    eos = tk.eos_id(tok)
    tok_info.update({"vocab_size": vocab, "eos_id": eos, "eos_token": tk.EOS})

    # split: deterministic on (content hash, seed); at least one val document when asked for
    val_mask = _val_mask([h for h, k in zip(hashes, keep, strict=True) if k], spec.val_fraction, spec.seed)
    pack = StageCount("pack", docs_in=near.docs_out)
    writers = {
        split: ShardWriter(
            tmp, split, vocab_size=vocab, eos_id=eos, max_tokens_per_shard=spec.max_tokens_per_shard
        )
        for split in ("train", "val")
    }
    tokens = {"train": 0, "val": 0}
    docs = {"train": 0, "val": 0}
    i = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal i
        first = i == 0
        for text, enc in zip(batch, tok.encode_batch(batch, add_special_tokens=False), strict=True):
            split = "val" if val_mask[i] else "train"
            writers[split].add(np.asarray(enc.ids, dtype=np.int64))
            tokens[split] += len(enc.ids) + 1
            docs[split] += 1
            pack.bytes_in += len(text.encode("utf-8", "surrogatepass"))
            i += 1
        batch.clear()
        check_cancel()
        total = tokens["train"] + tokens["val"]
        prog.emit(first or i == near.docs_out, phase="pack", docs=i, of=near.docs_out, tokens=total)

    for text in spill.read(keep):
        batch.append(text)
        if len(batch) >= 1024:
            flush()
    if batch:
        flush()
    splits = {split: w.close() for split, w in writers.items()}
    pack.docs_out = i
    pack.bytes_out = (
        sum(e["tokens"] for s in splits.values() for e in s) * np.dtype(token_dtype_for(vocab)).itemsize
    )
    pack.reasons.update({"train_documents": docs["train"], "val_documents": docs["val"]})
    near.bytes_out = pack.bytes_in

    read = StageCount(
        "read",
        docs_in=read_stats.docs + sum(read_stats.skipped.values()),
        docs_out=docs_read,
        bytes_in=read_stats.bytes,
        bytes_out=counts["normalize"].bytes_in,
        reasons=collections.Counter(read_stats.skipped),
    )
    read.reasons["files"] = read_stats.files
    if spec.max_documents and read_stats.docs > docs_read:
        read.reasons["over_max_documents"] = read_stats.docs - docs_read
    stages = [read, *counts.values(), exact, near, pack]
    finished = time.time()
    return {
        "format_version": FORMAT_VERSION,
        "name": spec.name,
        "created_at": finished,
        "run_id": run_id,
        "token_dtype": token_dtype_for(vocab),
        "vocab_size": vocab,
        "eos_id": eos,
        "documents": i,
        "tokens": tokens,
        "splits": splits,
        "stages": [s.to_dict() for s in stages],
        "tokenizer": tok_info,
        "dedup": minhash,
        "config": spec.to_dict(),
        "stats": {
            "seconds": round(finished - started, 3),
            "workers": spec.workers,
            "docs_per_s": round(docs_read / max(1e-9, finished - started), 2),
            "bytes_per_s": round(read_stats.bytes / max(1e-9, finished - started), 2),
        },
    }


def _result(fut: Future) -> BatchResult:
    try:
        return fut.result()
    except BrokenProcessPool:
        raise RuntimeError(
            "an ingest worker process died (killed, or out of memory); lower num_workers or max_doc_bytes"
        ) from None


def spec_texts(spill: _Spill, keep: np.ndarray, check_cancel: Callable[[], None]) -> Iterator[str]:
    for j, text in enumerate(spill.read(keep)):
        if j % 1024 == 0:
            check_cancel()
        yield text


def _val_mask(hashes: list[bytes], fraction: float, seed: int) -> np.ndarray:
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


def _minhash_doc(cfg: MinHashConfig) -> dict[str, Any]:
    return {
        "shingles": f"word {cfg.ngram}-grams",
        "bands": cfg.bands,
        "rows": cfg.rows,
        "num_perm": cfg.num_perm,
        "lsh_threshold": round(cfg.lsh_threshold, 4),
        "verify_threshold": cfg.threshold,
        "candidate_probability": {
            str(s): round(lsh_probability(s, cfg.bands, cfg.rows), 4) for s in (0.5, 0.7, 0.8, 0.9)
        },
    }
