"""Reading versions back: verified chunk streams for downloads, and whole-store verification.

Every chunk is hashed as it is read, so corruption surfaces as DATA_LOSS naming the version,
entry and chunk instead of as wrong weights. Reads run in the shared pool, a few chunks ahead of
the one being sent, so hashing overlaps the network.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass

from tokenmill.common.checkpoint.catalog import Catalog
from tokenmill.common.checkpoint.manifest import Entry, chunk_lengths
from tokenmill.common.checkpoint.records import ReadChunk, VerifyReport, Version
from tokenmill.common.checkpoint.state import StoreState
from tokenmill.common.errors import DataLoss, InvalidArgument, NotFound

MAX_STREAMS = 64


@dataclass(frozen=True)
class _PlannedChunk:
    entry: str
    is_file: bool
    index: int
    offset: int
    digest: str
    size: int


class Reads:
    def __init__(self, state: StoreState, catalog: Catalog):
        self.state = state
        self.catalog = catalog

    def read(
        self,
        ref: str,
        tensors: list[str],
        files: list[str],
        *,
        stream_index: int,
        stream_count: int,
        prefetch: int,
    ) -> Iterator[ReadChunk]:
        """Verified chunks of the selected entries (everything when both lists are empty).

        With stream_count > 1 only every stream_count-th chunk (starting at stream_index) is
        returned, so a client can pull one checkpoint over several parallel streams. The version is
        resolved and its implicit read lease taken together, under the metadata lock, on the first
        `next()`, and the lease ends when the iterator is exhausted or closed.
        """
        if stream_count < 1 or not (0 <= stream_index < stream_count) or stream_count > MAX_STREAMS:
            raise InvalidArgument(
                f"stream_index {stream_index} / stream_count {stream_count} out of range (count 1..{MAX_STREAMS})"
            )
        return self._stream(ref, tensors, files, stream_index, stream_count, max(1, prefetch))

    def _stream(
        self,
        ref: str,
        tensors: list[str],
        files: list[str],
        stream_index: int,
        stream_count: int,
        prefetch: int,
    ) -> Iterator[ReadChunk]:
        state = self.state
        with state.meta:
            name, version = self.catalog.resolve(ref)
            rec = self.catalog.load(name, version)
            plan = _plan(rec, tensors, files)[stream_index::stream_count]
            state.readers[(name, version)] += 1

        def load(item: _PlannedChunk) -> bytes:
            kind = "file" if item.is_file else "tensor"
            what = f"checkpoint '{rec.ref}' {kind} '{item.entry}' chunk {item.index}; run 'tokenmill ckpt verify'"
            return state.chunks.get(item.digest, what=what, expected_size=item.size)

        pending: deque[tuple[_PlannedChunk, Future[bytes]]] = deque()
        items = iter(plan)
        try:
            # keep `prefetch` chunks being read and verified in the pool while one is being sent
            for item in itertools.islice(items, prefetch):
                pending.append((item, state.pool.submit(load, item)))
            while pending:
                item, fut = pending.popleft()
                nxt = next(items, None)
                if nxt is not None:
                    pending.append((nxt, state.pool.submit(load, nxt)))
                yield ReadChunk(item.entry, item.is_file, item.index, item.offset, fut.result())
        finally:
            for _, fut in pending:
                fut.cancel()
            with state.meta:
                state.readers[(name, version)] -= 1
                if state.readers[(name, version)] <= 0:
                    del state.readers[(name, version)]

    def verify(self, ref: str) -> VerifyReport:
        """Check the manifest of one version (or of every version) and hash every chunk they name;
        problems name the manifest file, or the version, entry and chunk."""
        recs, problems = self._load_for_verify(ref)
        uses: dict[str, list[str]] = {}
        sizes: dict[str, int] = {}
        for rec in recs:
            m = rec.manifest
            for kind, entries in (("tensor", m.tensors), ("file", m.files)):
                for e in entries:
                    for i, (d, n) in enumerate(
                        zip(e.chunks, chunk_lengths(e.nbytes, m.chunk_size), strict=True)
                    ):
                        uses.setdefault(d, []).append(f"{rec.ref} {kind} {e.name} chunk {i}")
                        sizes[d] = n
        digests = sorted(uses)
        results = list(self.state.pool.map(lambda d: self.state.chunks.check(d, sizes[d]), digests))
        problems += [
            f"{use} ({d[:16]}...): {res}"
            for d, res in zip(digests, results, strict=True)
            if res
            for use in uses[d]
        ]
        return VerifyReport(not problems, len(digests), problems)

    def _load_for_verify(self, ref: str) -> tuple[list[Version], list[str]]:
        """The records to check, and a problem (naming its file) for each damaged manifest."""
        refs = [self.catalog.resolve(ref)] if ref else self.catalog.all_refs()
        recs: list[Version] = []
        problems: list[str] = []
        for name, version in refs:
            try:
                recs.append(self.catalog.load(name, version, fresh=True))
            except DataLoss as exc:
                problems.append(str(exc))
            except NotFound:
                if ref:
                    raise
        return recs, problems


def _plan(rec: Version, tensors: list[str], files: list[str]) -> list[_PlannedChunk]:
    """Every chunk of the selected entries, tensors first, each with its offset in its entry."""
    m = rec.manifest
    if not tensors and not files:
        t_entries: list[Entry] = list(m.tensors)
        f_entries: list[Entry] = list(m.files)
    else:
        t_entries, f_entries = [], []
        for name in dict.fromkeys(tensors):
            tensor = m.tensor(name)
            if tensor is None:
                raise NotFound(f"checkpoint {rec.ref!r} has no tensor {name!r}")
            t_entries.append(tensor)
        for name in dict.fromkeys(files):
            file = m.file(name)
            if file is None:
                raise NotFound(
                    f"checkpoint {rec.ref!r} has no file {name!r}; files: {[f.name for f in m.files]}"
                )
            f_entries.append(file)
    plan = []
    for is_file, entries in ((False, t_entries), (True, f_entries)):
        for e in entries:
            offset = 0
            for i, (d, size) in enumerate(zip(e.chunks, chunk_lengths(e.nbytes, m.chunk_size), strict=True)):
                plan.append(_PlannedChunk(e.name, is_file, i, offset, d, size))
                offset += size
    return plan
