"""Per-document stages (normalise -> filters -> PII -> hashes/signature), run inside worker processes.

A worker is initialised once with the spec (``init_worker``) and then maps batches of raw
documents to ``BatchResult``: the surviving cleaned texts with their content hash and MinHash
signature, plus per-stage counts that the driver sums. Everything here is picklable and free of
global state other than the per-process chain, so ``multiprocessing`` and Ray can both run it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tokenmill.common.ingest.dedup import MinHasher, content_hash
from tokenmill.common.ingest.doc import Doc
from tokenmill.common.ingest.normalize import normalize_text
from tokenmill.common.ingest.pii import PiiScrubber
from tokenmill.common.ingest.spec import IngestSpec, build_filters

Batch = list[tuple[str, str, int]]  # raw documents as (id, text, encoding errors)


@dataclass
class StageCount:
    stage: str
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    reasons: Counter = field(default_factory=Counter)

    def add(self, other: StageCount) -> None:
        self.docs_in += other.docs_in
        self.docs_out += other.docs_out
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.reasons.update(other.reasons)

    @property
    def kept_fraction(self) -> float:
        return self.docs_out / self.docs_in if self.docs_in else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "reasons": dict(sorted(self.reasons.items())),
        }


@dataclass
class BatchResult:
    ids: list[str]
    texts: list[str]
    hashes: list[bytes]
    signatures: np.ndarray  # [len(texts), num_perm] uint32 (empty when near-dedup is off)
    counts: dict[str, StageCount]


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


class DocumentChain:
    """The configured per-document chain. ``stage_names`` lists the stages in order."""

    def __init__(self, spec: IngestSpec):
        self.spec = spec
        self.filters = build_filters(spec)
        self.scrubber = PiiScrubber(code=spec.preset == "code") if spec.pii else None
        self.hasher = None if spec.skip_near_dedup else MinHasher(spec.minhash_config())
        self.stage_names = ["normalize", *(f.name for f in self.filters)] + (["pii"] if self.scrubber else [])

    def new_counts(self) -> dict[str, StageCount]:
        return {name: StageCount(name) for name in self.stage_names}

    def process(self, batch: Batch) -> BatchResult:
        counts = self.new_counts()
        ids: list[str] = []
        texts: list[str] = []
        hashes: list[bytes] = []
        sigs: list[np.ndarray] = []
        norm = counts["normalize"]
        for doc_id, raw, enc_errors in batch:
            size = _nbytes(raw)
            norm.docs_in += 1
            norm.bytes_in += size
            text, changed = normalize_text(raw)
            if enc_errors:
                norm.reasons["encoding_errors"] += 1
            if changed:
                norm.reasons["changed"] += 1
            if not text.strip():
                norm.reasons["empty"] += 1
                continue
            size = _nbytes(text) if text != raw else size
            norm.docs_out += 1
            norm.bytes_out += size
            doc = Doc(doc_id, text)
            dropped = False
            for f in self.filters:
                c = counts[f.name]
                c.docs_in += 1
                c.bytes_in += size
                reason = f(doc)
                if reason is not None:
                    c.reasons[reason] += 1
                    dropped = True
                    break
                if doc.text is not text:
                    text = doc.text
                    size = _nbytes(text)
                    c.reasons["modified"] += 1
                c.docs_out += 1
                c.bytes_out += size
            if dropped:
                continue
            if self.scrubber is not None:
                c = counts["pii"]
                c.docs_in += 1
                c.bytes_in += size
                scrubbed, found = self.scrubber.scrub(text)
                if found:
                    c.reasons.update(found)
                    c.reasons["documents_changed"] += 1
                    text = scrubbed
                    size = _nbytes(text)
                c.docs_out += 1
                c.bytes_out += size
            ids.append(doc_id)
            texts.append(text)
            hashes.append(content_hash(text))
            if self.hasher is not None:
                sigs.append(self.hasher.signature(text))
        if self.hasher is not None and sigs:
            signatures = np.stack(sigs)
        else:
            width = self.hasher.config.num_perm if self.hasher else 0
            signatures = np.empty((0, width), dtype=np.uint32)
        return BatchResult(ids, texts, hashes, signatures, counts)


_CHAIN: DocumentChain | None = None


def init_worker(spec_dict: dict[str, Any]) -> None:
    global _CHAIN
    _CHAIN = DocumentChain(IngestSpec.from_dict(spec_dict))


def process_batch(batch: Batch) -> BatchResult:
    assert _CHAIN is not None, "init_worker was not called in this process"
    return _CHAIN.process(batch)
