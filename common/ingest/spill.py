"""The spill file: documents that survived filtering and exact dedup, on disk in arrival order.

The driver must not hold the corpus in memory, yet near dedup decides which documents to keep only
after all of them are read. So survivors are appended here (length-prefixed UTF-8) and read back
sequentially, skipping the ones near dedup dropped.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import numpy as np

_LEN = struct.Struct("<Q")


class SpillFile:
    """Append documents while writing (``append``), then ``close`` and ``read`` them back in order."""

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

    def __enter__(self) -> SpillFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def read(self, keep: np.ndarray | None = None) -> Iterator[str]:
        """The documents in append order; with ``keep`` (one bool per document) only the kept ones."""
        with open(self.path, "rb", buffering=1 << 20) as f:
            for i in range(self.count):
                (n,) = _LEN.unpack(f.read(_LEN.size))
                if keep is not None and not keep[i]:
                    f.seek(n, os.SEEK_CUR)
                    continue
                yield f.read(n).decode("utf-8", "surrogatepass")
