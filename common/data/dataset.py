"""Packed token datasets: the on-disk format, a writer, and a resumable sampler for trainers.

A dataset is a directory ``<data_dir>/datasets/<name>/`` (see docs/contracts.md "Datasets")::

    manifest.json      written last and atomically; a dataset without it does not exist
    tokenizer.json     HF tokenizers byte-level BPE
    train-00000.bin    flat little-endian tokens; every document is followed by eos_id
    train-00000.idx    little-endian uint64 start offsets (in tokens) of the documents in the .bin

Why flat shards + memmap: trainers on a GPU box read random windows with no per-sample decode
and no Python objects per document, and the OS page cache shares the pages between workers.
The sampler treats all shards of a split as one token stream cut into non-overlapping windows of
``seq_len + 1`` tokens (the extra token gives the shifted targets), visits them in a seeded
permutation per epoch, and records how many windows the whole job consumed: restoring that number
resumes exactly, also on a different world size.

Only numpy, torch and the standard library are imported (plus ``tokenmill.common.errors``, pure Python).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenmill.common.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
SPLITS = ("train", "val")
INDEX_DTYPE = np.dtype("<u8")
FORMAT_VERSION = 1


def token_dtype_for(vocab_size: int) -> str:
    """uint16 halves disk and page-cache use whenever every id fits in 16 bits."""
    if vocab_size <= 0:
        raise InvalidArgument(f"vocab_size must be positive, got {vocab_size}")
    return "uint16" if vocab_size <= 2**16 else "uint32"


def _np_dtype(name: str) -> np.dtype:
    if name not in ("uint16", "uint32"):
        raise DataLoss(f"unsupported token_dtype {name!r} in manifest; expected 'uint16' or 'uint32'")
    return np.dtype("<u2" if name == "uint16" else "<u4")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write to a temp file in the same directory, fsync, then rename: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of the dataset directory ``path``; NotFound when it is not a complete dataset."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise NotFound(f"no dataset at {path} (no {MANIFEST}); list datasets with 'tokenmill data list'")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataLoss(f"{mpath} is unreadable or not JSON ({exc}); re-run the ingest job") from None
    for key in ("token_dtype", "eos_id", "splits"):
        if key not in manifest:
            raise DataLoss(f"{mpath} lacks '{key}'; re-run the ingest job")
    return manifest


# --------------------------------------------------------------------------------------------- writer


@dataclass
class _OpenShard:
    path: Path
    bin_file: Any
    offsets: list[int]
    tokens: int
    hasher: Any


class ShardWriter:
    """Appends documents (token id sequences) to ``<split>-NNNNN.bin/.idx`` shards in ``out_dir``.

    Each document is followed by ``eos_id``. A new shard starts once the current one holds
    ``max_tokens_per_shard`` tokens (documents are never split across shards). ``close()`` returns
    the manifest entries ``{"path", "tokens", "documents", "sha256"}``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        split: str,
        *,
        vocab_size: int,
        eos_id: int,
        max_tokens_per_shard: int = 256 * 1024 * 1024,
    ):
        if split not in SPLITS:
            raise InvalidArgument(f"split must be one of {SPLITS}, got {split!r}")
        if not 0 <= eos_id < vocab_size:
            raise InvalidArgument(f"eos_id {eos_id} is outside the vocabulary [0, {vocab_size})")
        if max_tokens_per_shard < 1:
            raise InvalidArgument("max_tokens_per_shard must be >= 1")
        self.out_dir = Path(out_dir)
        self.split = split
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.dtype = _np_dtype(token_dtype_for(vocab_size))
        self.max_tokens = max_tokens_per_shard
        self._shard: _OpenShard | None = None
        self._done: list[dict[str, Any]] = []
        self._closed = False

    def _open(self) -> _OpenShard:
        path = self.out_dir / f"{self.split}-{len(self._done):05d}.bin"
        self._shard = _OpenShard(path, open(path, "wb"), [], 0, hashlib.sha256())  # noqa: SIM115 (closed in _finish)
        return self._shard

    def _finish(self) -> None:
        shard = self._shard
        if shard is None:
            return
        shard.bin_file.flush()
        os.fsync(shard.bin_file.fileno())
        shard.bin_file.close()
        idx_path = shard.path.with_suffix(".idx")
        with open(idx_path, "wb") as f:
            f.write(np.asarray(shard.offsets, dtype=INDEX_DTYPE).tobytes())
            f.flush()
            os.fsync(f.fileno())
        self._done.append(
            {
                "path": shard.path.name,
                "tokens": shard.tokens,
                "documents": len(shard.offsets),
                "sha256": shard.hasher.hexdigest(),
            }
        )
        self._shard = None

    def add(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Append one document; ``eos_id`` is added after it."""
        if self._closed:
            raise FailedPrecondition("ShardWriter is closed")
        arr = np.asarray(tokens)
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= self.vocab_size):
            raise InvalidArgument(f"token ids must lie in [0, {self.vocab_size})")
        buf = np.empty(arr.size + 1, dtype=self.dtype)
        buf[:-1] = arr
        buf[-1] = self.eos_id
        shard = self._shard or self._open()
        shard.offsets.append(shard.tokens)
        data = buf.tobytes()
        shard.bin_file.write(data)
        shard.hasher.update(data)
        shard.tokens += buf.size
        if shard.tokens >= self.max_tokens:
            self._finish()

    def add_many(self, docs: Iterable[Sequence[int] | np.ndarray]) -> None:
        for doc in docs:
            self.add(doc)

    def close(self) -> list[dict[str, Any]]:
        if not self._closed:
            self._finish()
            self._closed = True
        return list(self._done)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._shard is not None:
            self._shard.bin_file.close()
        self._closed = True


# --------------------------------------------------------------------------------------------- reader


class PackedDataset:
    """Read-only, memory-mapped view of one split of a packed dataset.

    ``tokens(start, stop)`` reads a slice of the split's concatenated token stream (crossing shard
    boundaries as needed); ``document(i)`` returns one document without its trailing eos.
    """

    def __init__(self, path: str | os.PathLike[str], split: str = "train", *, verify: bool = False):
        if split not in SPLITS:
            raise InvalidArgument(f"split must be one of {SPLITS}, got {split!r}")
        self.path = Path(path)
        self.split = split
        self.manifest = read_manifest(self.path)
        self.token_dtype = self.manifest["token_dtype"]
        self.dtype = _np_dtype(self.token_dtype)
        self.eos_id = int(self.manifest["eos_id"])
        self.vocab_size = int(self.manifest.get("vocab_size", 0))
        entries = self.manifest["splits"].get(split, [])
        self._bins: list[np.ndarray] = []
        self._idx: list[np.ndarray] = []
        for entry in entries:
            bin_path = self.path / entry["path"]
            idx_path = bin_path.with_suffix(".idx")
            if not bin_path.is_file() or not idx_path.is_file():
                raise DataLoss(f"shard {bin_path} (or its .idx) is missing; re-run the ingest job")
            if verify and sha256_file(bin_path) != entry["sha256"]:
                raise DataLoss(f"shard {bin_path} does not match its sha256 in the manifest")
            expected = int(entry["tokens"]) * self.dtype.itemsize
            if bin_path.stat().st_size != expected:
                raise DataLoss(
                    f"shard {bin_path} has {bin_path.stat().st_size} bytes, manifest says {expected}"
                )
            if int(entry["tokens"]) == 0:
                continue
            self._bins.append(np.memmap(bin_path, dtype=self.dtype, mode="r"))
            idx = np.fromfile(idx_path, dtype=INDEX_DTYPE)
            if idx.size != int(entry["documents"]):
                raise DataLoss(f"index {idx_path} has {idx.size} entries, manifest says {entry['documents']}")
            self._idx.append(idx)
        sizes = np.array([b.size for b in self._bins], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        doc_counts = np.array([i.size for i in self._idx], dtype=np.int64)
        self._doc_starts = np.concatenate([[0], np.cumsum(doc_counts)]).astype(np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self._starts[-1])

    @property
    def num_documents(self) -> int:
        return int(self._doc_starts[-1])

    def __len__(self) -> int:
        return self.num_tokens

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the split's stream as a fresh int64 array."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise InvalidArgument(f"token range [{start}, {stop}) outside [0, {self.num_tokens})")
        out = np.empty(stop - start, dtype=np.int64)
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos, written = start, 0
        while written < out.size:
            local = pos - int(self._starts[shard])
            take = min(self._bins[shard].size - local, out.size - written)
            out[written : written + take] = self._bins[shard][local : local + take]
            written += take
            pos += take
            shard += 1
        return out

    def document(self, i: int) -> np.ndarray:
        """Document ``i`` of the split (without its eos) as an int64 array."""
        if not 0 <= i < self.num_documents:
            raise InvalidArgument(f"document {i} outside [0, {self.num_documents})")
        shard = int(np.searchsorted(self._doc_starts, i, side="right")) - 1
        local = i - int(self._doc_starts[shard])
        idx, data = self._idx[shard], self._bins[shard]
        begin = int(idx[local])
        end = int(idx[local + 1]) if local + 1 < idx.size else data.size
        return np.asarray(data[begin : end - 1], dtype=np.int64)

    def documents(self) -> Iterable[np.ndarray]:
        for i in range(self.num_documents):
            yield self.document(i)


class TokenSampler:
    """Deterministic, resumable, rank-sharded batches of ``seq_len`` windows.

    Window ``w`` is tokens ``[w*seq_len, w*seq_len + seq_len + 1)`` of the split's stream; there are
    ``(num_tokens - 1) // seq_len`` windows. Epoch ``e`` visits them in the permutation drawn from
    ``seed`` and ``e``. The job consumes ``world_size * batch_size`` windows per step from that
    endless sequence; rank ``r`` takes the ``r``-th block of ``batch_size``. ``state_dict()`` records
    the global number of windows consumed, so a restore continues exactly where the job stopped,
    even with another world size or per-rank batch size.
    """

    def __init__(
        self,
        dataset: PackedDataset,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        if seq_len < 1 or batch_size < 1:
            raise InvalidArgument(f"seq_len and batch_size must be >= 1 (got {seq_len}, {batch_size})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise InvalidArgument(f"rank {rank} must lie in [0, world_size={world_size})")
        self.dataset = dataset
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = int(seed)
        self.num_windows = max(0, (dataset.num_tokens - 1) // seq_len)
        if self.num_windows == 0:
            raise FailedPrecondition(
                f"split '{dataset.split}' of {dataset.path} has {dataset.num_tokens} tokens, fewer than "
                f"seq_len+1={seq_len + 1}; use a shorter seq_len or ingest more data"
            )
        self.consumed = 0  # windows consumed by the whole job (all ranks)
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    @property
    def epoch(self) -> int:
        return self.consumed // self.num_windows

    def _window(self, g: int) -> int:
        epoch, offset = divmod(g, self.num_windows)
        if epoch != self._perm_epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._perm = rng.permutation(self.num_windows)
            self._perm_epoch = epoch
        return int(self._perm[offset])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)`` LongTensors of shape ``[batch_size, seq_len]``; targets are shifted by one."""
        base = self.consumed + self.rank * self.batch_size
        rows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for i in range(self.batch_size):
            w = self._window(base + i)
            rows[i] = self.dataset.tokens(w * self.seq_len, w * self.seq_len + self.seq_len + 1)
        self.consumed += self.world_size * self.batch_size
        data = torch.from_numpy(rows)
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()

    def __iter__(self) -> TokenSampler:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "consumed": self.consumed,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_windows": self.num_windows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the seed, seq_len and data must be the ones it was saved with."""
        for key in ("consumed", "seed", "seq_len", "num_windows"):
            if key not in state:
                raise InvalidArgument(f"sampler state lacks '{key}'")
        if int(state["seq_len"]) != self.seq_len or int(state["num_windows"]) != self.num_windows:
            raise FailedPrecondition(
                f"sampler state was saved for seq_len={state['seq_len']} over {state['num_windows']} windows, "
                f"this sampler has seq_len={self.seq_len} over {self.num_windows}; resume with the same "
                "dataset and seq_len"
            )
        if int(state["seed"]) != self.seed:
            raise FailedPrecondition(f"sampler state has seed {state['seed']}, this sampler {self.seed}")
        self.consumed = int(state["consumed"])
