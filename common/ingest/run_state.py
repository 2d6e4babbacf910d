"""What one ingest run carries from phase to phase, in one explicit object.

The phases (``tokenmill.common.ingest.phases``) read what earlier phases left here and add their own
results; nothing is passed through closures. The manifest is assembled from this state at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokenmill.common.ingest.sources import SourceStats
from tokenmill.common.ingest.spec import IngestSpec
from tokenmill.common.ingest.spill import SpillFile
from tokenmill.common.ingest.stages import DocumentChain, StageCount
from tokenmill.common.ingest.workspace import WORK

ProgressFn = Callable[[dict[str, Any]], None]
SPLITS = ("train", "val")


class Progress:
    """Progress events for a watcher, throttled to one per ``interval`` unless forced."""

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


@dataclass
class RunState:
    """One run of the pipeline: its inputs, its paths, and every count and result so far."""

    spec: IngestSpec
    tmp: Path  # the dataset being built (datasets/.tmp-<name>-<run>/)
    root: Path  # datasets/ (a reused tokenizer is looked up there)
    run_id: str
    job_id: str
    progress: Progress
    check_cancel: Callable[[], None]
    input_roots: Sequence[str]
    chain: DocumentChain
    spill: SpillFile
    started: float = field(default_factory=time.time)

    # read/filter: the per-document stages, then exact dedup into the spill file
    read_stats: SourceStats = field(default_factory=SourceStats)
    counts: dict[str, StageCount] = field(default_factory=dict)
    exact: StageCount = field(default_factory=lambda: StageCount("exact_dedup"))
    docs_read: int = 0
    hashes: list[bytes] = field(default_factory=list)  # content hash per spilled document
    seen: set[bytes] = field(default_factory=set)

    # dedup: which spilled documents survive near dedup
    near: StageCount = field(default_factory=lambda: StageCount("near_dedup"))
    keep: np.ndarray = field(default_factory=lambda: np.ones(0, dtype=bool))
    dedup_info: dict[str, Any] = field(default_factory=dict)

    # tokenize/pack
    tokenizer_info: dict[str, Any] = field(default_factory=dict)
    vocab_size: int = 0
    eos_id: int = 0
    pack: StageCount = field(default_factory=lambda: StageCount("pack"))
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    split_docs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    splits: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        spec: IngestSpec,
        tmp: Path,
        root: Path,
        *,
        run_id: str,
        job_id: str,
        progress: Progress,
        check_cancel: Callable[[], None],
        input_roots: Sequence[str],
    ) -> RunState:
        """The state of a run about to start in ``tmp`` (its scratch folder is made here)."""
        (tmp / WORK).mkdir()
        chain = DocumentChain(spec)
        return cls(
            spec=spec,
            tmp=tmp,
            root=root,
            run_id=run_id,
            job_id=job_id,
            progress=progress,
            check_cancel=check_cancel,
            input_roots=input_roots,
            chain=chain,
            spill=SpillFile(tmp / WORK / "docs.bin"),
            counts=chain.new_counts(),
        )

    @property
    def signatures_path(self) -> Path:
        """MinHash signatures of the spilled documents, a flat ``uint32`` file (memory-mapped for LSH)."""
        return self.tmp / WORK / "signatures.u32"

    @property
    def documents(self) -> int:
        """Documents packed so far."""
        return self.split_docs["train"] + self.split_docs["val"]
