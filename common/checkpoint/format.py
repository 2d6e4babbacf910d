"""The checkpoint format, written once: chunk digests, the raw wire codec, dtypes, shard naming and
shard assembly. The store engine, the gRPC server, the client and the trainer all use it.

Importable without torch, gRPC or generated stubs (the checkpoint server loads neither torch nor
this module's torch half): the few functions that handle tensors import torch when called. One
file because these are the definitions every reader and writer of a checkpoint must agree on.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from tokenmill.common.errors import DataLoss, InvalidArgument

if TYPE_CHECKING:
    import torch

# ------------------------------------------------------------------------------------------ digests
# Why BLAKE3: a chunk is hashed once by the client (dedup: "which chunks does the store lack?"), once
# by the server (it never trusts a client's digest) and once on every read (integrity). sha256 cost
# ~0.75 CPU-s per GB each time on the 2-core box; BLAKE3 (SIMD, releases the GIL) is ~4x cheaper and
# as collision-resistant for this use. Digest strings carry their algorithm, so old stores stay
# readable: ``blake3:<64 lowercase hex>`` (what clients write now) or bare ``<64 lowercase hex>``
# (sha256, the store's original format, still accepted for reads and writes).

BLAKE3 = "blake3"
SHA256 = "sha256"
ALGORITHMS = (BLAKE3, SHA256)
DEFAULT_ALGORITHM = BLAKE3

_DIGEST = re.compile(r"^(?:(blake3):)?([0-9a-f]{64})$")
_CHUNK_FILE = re.compile(r"^(?:(blake3)-)?([0-9a-f]{64})$")
CHUNK_PREFIX = "chunks/"
STAGING_PREFIX = "staging/"  # same-host uploads: staging/<upload_id>/<chunk file name>
_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")

Bytes = bytes | bytearray | memoryview


def _blake3_hex(data: Bytes) -> str:
    try:
        from blake3 import blake3
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("blake3 digests need the blake3 package: pip install blake3") from exc
    return blake3(data).hexdigest()


def _sha256_hex(data: Bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_HEX = {BLAKE3: _blake3_hex, SHA256: _sha256_hex}


def check_algorithm(algorithm: str) -> str:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown chunk hash {algorithm!r}; choose one of {ALGORITHMS}")
    return algorithm


def parse_digest(digest: str) -> tuple[str, str]:
    """(algorithm, hex) of a digest string; INVALID_ARGUMENT when it is neither accepted form."""
    m = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if m is None:
        raise InvalidArgument(
            f"invalid chunk digest {str(digest)[:80]!r}: expected 'blake3:' + 64 lowercase hex "
            "(or 64 lowercase hex for a sha256 digest)"
        )
    return (BLAKE3 if m.group(1) else SHA256), m.group(2)


def format_digest(algorithm: str, hex_digest: str) -> str:
    return hex_digest if algorithm == SHA256 else f"{algorithm}:{hex_digest}"


def digest_of(data: Bytes, algorithm: str = DEFAULT_ALGORITHM) -> str:
    """The digest string naming `data` under `algorithm` (releases the GIL for large chunks)."""
    return format_digest(algorithm, _HEX[check_algorithm(algorithm)](data))


def matches(digest: str, data: Bytes) -> tuple[bool, str]:
    """Whether `data` hashes to `digest` with the digest's own algorithm, and the actual digest."""
    algorithm, _ = parse_digest(digest)
    actual = digest_of(data, algorithm)
    return actual == digest, actual


def chunk_file_name(digest: str) -> str:
    """The file name of a chunk: ``blake3-<hex>``, or ``<hex>`` for sha256."""
    algorithm, hex_digest = parse_digest(digest)
    return hex_digest if algorithm == SHA256 else f"{algorithm}-{hex_digest}"


def chunk_key(digest: str) -> str:
    """The storage key of a chunk: ``chunks/ab/blake3-<hex>``, or ``chunks/ab/<hex>`` for sha256."""
    _, hex_digest = parse_digest(digest)
    return f"{CHUNK_PREFIX}{hex_digest[:2]}/{chunk_file_name(digest)}"


def staging_key(upload_id: str) -> str:
    """The directory (key prefix) where a same-host client stages the chunks of one upload.

    Why one shared spelling: the client writes there and the server adopts from there, and the
    server builds the path only from the upload id it issued and digests it validated."""
    if not isinstance(upload_id, str) or not _UPLOAD_ID.fullmatch(upload_id):
        raise InvalidArgument(f"invalid upload id {str(upload_id)[:80]!r}: expected 32 lowercase hex")
    return f"{STAGING_PREFIX}{upload_id}"


def digest_from_key(key: str) -> str | None:
    """The digest a chunk key names, or None for a key that is not a chunk."""
    m = _CHUNK_FILE.fullmatch(key.rsplit("/", 1)[-1])
    if m is None:
        return None
    return format_digest(m.group(1) or SHA256, m.group(2))


def split_chunks(view: memoryview, chunk_size: int) -> list[memoryview]:
    """`view` cut into consecutive chunks of `chunk_size` bytes (the last one shorter)."""
    return [view[i : i + chunk_size] for i in range(0, len(view), chunk_size)]


# ----------------------------------------------------------------------------------- wire codec
# Zero-copy codecs for the two bulk messages of CheckpointService, UploadChunk and DownloadChunk.
# Moving a 4 MiB chunk through protobuf objects costs three copies per side, which on a small machine
# costs more than hashing it; these write and read the *same protobuf wire format* by hand, copying
# the bulk bytes once into the outgoing message and handing them out as memoryview slices of the
# incoming one. Any other gRPC client (grpcurl, another language) still speaks plain protobuf.

MALLOC_TUNING_ENV = "TOKENMILL_CHECKPOINT_MALLOC_TUNING"  # "0" turns tune_malloc off
_tuned: bool | None = None
_tune_lock = threading.Lock()
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5  # protobuf wire types


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or oversized varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes | memoryview) -> list[tuple[int, int | memoryview]]:
    """(field number, value) pairs: ints for varints, memoryview slices for length-delimited."""
    buf = memoryview(data)
    pos = 0
    out: list[tuple[int, int | memoryview]] = []
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _read_varint(buf, pos)
            out.append((number, value))
        elif wire == _LEN:
            length, pos = _read_varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("truncated length-delimited field")
            out.append((number, buf[pos : pos + length]))
            pos += length
        elif wire in (_I64, _I32):
            pos += 8 if wire == _I64 else 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if pos != len(buf):
        raise ValueError("truncated message")
    return out


def _len_field(number: int, payload_len: int) -> bytes:
    return _varint((number << 3) | _LEN) + _varint(payload_len)


def _str_field(number: int, text: str) -> bytes:
    raw = text.encode()
    return _len_field(number, len(raw)) + raw if raw else b""


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3 | _VARINT) + _varint(int(value)) if value else b""


@dataclass
class RawUploadChunk:
    """UploadChunk with `data` as a view into the received message (no copy)."""

    upload_id: str
    digest: str
    data: memoryview


def encode_upload_chunk(msg: RawUploadChunk | tuple[str, str, bytes | memoryview]) -> bytes:
    """UploadChunk{1: upload_id, 2: digest, 3: data} serialised with one copy of the data."""
    upload_id, digest, data = (
        (msg.upload_id, msg.digest, msg.data) if isinstance(msg, RawUploadChunk) else msg
    )
    view = memoryview(data).cast("B")
    header = _str_field(1, upload_id) + _str_field(2, digest) + _len_field(3, len(view))
    return b"".join((header, view))


def decode_upload_chunk(data: bytes) -> RawUploadChunk:
    upload_id, digest, payload = "", "", memoryview(b"")
    for number, value in _fields(data):
        if isinstance(value, memoryview):
            if number == 1:
                upload_id = bytes(value).decode()
            elif number == 2:
                digest = bytes(value).decode()
            elif number == 3:
                payload = value
    return RawUploadChunk(upload_id, digest, payload)


@dataclass
class RawDownloadChunk:
    """DownloadChunk with `data` as a view into the received message (no copy)."""

    entry: str
    is_file: bool
    index: int
    offset: int
    data: memoryview | bytes


def encode_download_chunk(msg: RawDownloadChunk | Any) -> bytes:
    """DownloadChunk{1 entry, 2 is_file, 3 index, 4 offset, 5 data}; protobuf messages pass through."""
    if not isinstance(msg, RawDownloadChunk):
        return bytes(msg.SerializeToString())
    view = memoryview(msg.data).cast("B")
    header = (
        _str_field(1, msg.entry)
        + _int_field(2, int(msg.is_file))
        + _int_field(3, msg.index)
        + _int_field(4, msg.offset)
        + _len_field(5, len(view))
    )
    return b"".join((header, view))


def decode_download_chunk(data: bytes) -> RawDownloadChunk:
    out = RawDownloadChunk("", False, 0, 0, memoryview(b""))
    for number, value in _fields(data):
        if number == 1 and isinstance(value, memoryview):
            out.entry = bytes(value).decode()
        elif number == 2 and isinstance(value, int):
            out.is_file = bool(value)
        elif number == 3 and isinstance(value, int):
            out.index = value
        elif number == 4 and isinstance(value, int):
            out.offset = value
        elif number == 5 and isinstance(value, memoryview):
            out.data = value
    return out


def tune_malloc(*, arena_max: int | None = 4) -> bool:
    """Keep freed multi-MiB buffers in the heap instead of returning them to the OS (once per process).

    Every chunk read, received or serialised is a fresh 4 MiB buffer; with glibc's defaults each can
    be a new mmap whose pages fault in (zeroed) on first touch, measured ~0.4 CPU-s/GB on the loading
    client alone. A 32 MiB mmap threshold and a 512 MiB trim threshold let the allocator reuse the
    same memory. The server and CheckpointClient call this (the client with arena_max=None: it lives
    in other services' processes, whose thread/arena balance it must not change); a no-op off glibc
    or with TOKENMILL_CHECKPOINT_MALLOC_TUNING=0."""
    global _tuned
    with _tune_lock:
        if _tuned is not None:
            return _tuned
        _tuned = False
        if os.environ.get(MALLOC_TUNING_ENV, "1") == "0":
            return False
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:
            return False
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
        ok = bool(libc.mallopt(m_mmap_threshold, 32 << 20))
        ok &= bool(libc.mallopt(m_trim_threshold, 512 << 20))
        if arena_max is not None:
            ok &= bool(libc.mallopt(m_arena_max, arena_max))
        _tuned = ok
        return ok


# ------------------------------------------------------------------------------------------ dtypes
# safetensors dtype name -> (bytes per element, torch attribute name)
DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (1, "bool"),
    "U8": (1, "uint8"),
    "I8": (1, "int8"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "I16": (2, "int16"),
    "U16": (2, "uint16"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I32": (4, "int32"),
    "U32": (4, "uint32"),
    "F32": (4, "float32"),
    "I64": (8, "int64"),
    "U64": (8, "uint64"),
    "F64": (8, "float64"),
}
DTYPE_SIZES: dict[str, int] = {name: size for name, (size, _) in DTYPES.items()}


@functools.cache
def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {name: getattr(torch, attr) for name, (_, attr) in DTYPES.items() if hasattr(torch, attr)}


def torch_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype name; None when this torch has no such dtype."""
    return _torch_dtypes().get(name)


def dtype_name(dtype: torch.dtype) -> str | None:
    """The safetensors name of a torch dtype; None when the format has no name for it."""
    return next((name for name, d in _torch_dtypes().items() if d == dtype), None)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's raw little-endian bytes, without a copy when it is already contiguous on CPU."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return t.reshape(-1).view(torch.uint8).numpy().data


# ------------------------------------------------------------------------------------------- shards
# An FSDP shard is stored as an ordinary tensor named ``{logical}@{offsets}`` whose ShardInfo says
# where it sits in its logical tensor; a reader rebuilds any slice of the logical tensor from the
# pieces that overlap it, so a checkpoint written by N workers loads on M.


def piece_name(logical_name: str, offsets: Sequence[int]) -> str:
    """The stored name of one shard piece: ``{logical}@{offsets joined by ','}``."""
    return f"{logical_name}@{','.join(str(int(o)) for o in offsets)}"


@dataclass(frozen=True)
class Piece:
    """One stored tensor as a part of a logical tensor (an unsharded tensor is its own one piece)."""

    key: str  # the stored name
    logical_name: str
    dtype: str  # safetensors name
    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    global_shape: tuple[int, ...]


Layout = dict[str, list[Piece]]  # logical name -> its pieces


class StoredTensor(Protocol):
    """What `layout_of` reads of a manifest entry (the engine's TensorEntry or the protobuf one)."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> Iterable[int]: ...
    @property
    def shard(self) -> Any: ...


def layout_of(entries: Iterable[StoredTensor]) -> Layout:
    """Every stored tensor grouped under its logical name (a shard's ShardInfo, else its own name)."""
    layout: Layout = {}
    for e in entries:
        shape = tuple(int(s) for s in e.shape)
        shard = e.shard
        if shard is not None and shard.logical_name:
            piece = Piece(
                e.name,
                str(shard.logical_name),
                e.dtype,
                shape,
                tuple(int(o) for o in shard.offsets),
                tuple(int(s) for s in shard.global_shape),
            )
        else:
            piece = Piece(e.name, e.name, e.dtype, shape, (0,) * len(shape), shape)
        layout.setdefault(piece.logical_name, []).append(piece)
    return layout


def _bounds(index: Sequence[slice], shape: Sequence[int]) -> list[tuple[int, int]]:
    """[lo, hi) per dimension of a contiguous slice; missing trailing dimensions are whole."""
    index = list(index)
    if len(index) > len(shape) or any(not isinstance(s, slice) or s.step not in (None, 1) for s in index):
        raise InvalidArgument(f"slice {index} must be up to {len(shape)} contiguous slices (step 1)")
    index += [slice(None)] * (len(shape) - len(index))
    out = []
    for s, size in zip(index, shape, strict=True):
        lo, hi, _ = s.indices(size)
        out.append((lo, max(lo, hi)))
    return out


def _overlap(piece: Piece, bounds: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Per dimension, the global [lo, hi) the piece and the region share (empty when hi <= lo)."""
    return [
        (max(lo, off), min(hi, off + size))
        for (lo, hi), off, size in zip(bounds, piece.offsets, piece.shape, strict=True)
    ]


def assemble(
    pieces: Sequence[Piece],
    read: Callable[[list[str]], Mapping[str, torch.Tensor]],
    index: Sequence[slice] = (),
) -> torch.Tensor:
    """The logical tensor `pieces` make up, or its `index` slice, reading (``read(keys)``) only the
    pieces that overlap it. A piece that is exactly the region is returned as read, without a copy.
    DATA_LOSS when the pieces disagree on the global shape or leave part of the region uncovered."""
    import torch

    logical, gshape = pieces[0].logical_name, pieces[0].global_shape
    if any(p.global_shape != gshape for p in pieces):
        raise DataLoss(f"shard pieces of {logical!r} disagree on the global shape")
    bounds = _bounds(index, gshape)
    needed = [p for p in pieces if all(lo < hi for lo, hi in _overlap(p, bounds))]
    raw = read([p.key for p in needed])
    region = tuple(hi - lo for lo, hi in bounds)
    if len(needed) == 1 and needed[0].shape == region and _overlap(needed[0], bounds) == bounds:
        return raw[needed[0].key]
    dtype = raw[needed[0].key].dtype if needed else torch_dtype(pieces[0].dtype)
    out = torch.empty(region, dtype=dtype)
    covered = 0
    for p in needed:
        both = _overlap(p, bounds)
        src = tuple(slice(a - off, b - off) for (a, b), off in zip(both, p.offsets, strict=True))
        dst = tuple(slice(a - lo, b - lo) for (a, b), (lo, _) in zip(both, bounds, strict=True))
        out[dst] = raw[p.key][src]
        covered += math.prod(b - a for a, b in both)
    if covered != out.numel():
        raise DataLoss(f"shard pieces of {logical!r} cover {covered} of {out.numel()} elements")
    return out
