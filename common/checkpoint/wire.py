"""Zero-copy codecs for the two bulk messages of CheckpointService: UploadChunk and DownloadChunk.

Why: moving a 4 MiB chunk through protobuf objects costs three copies per side (construct,
serialise, parse + field access), which on a small machine costs more than hashing it. These
functions write and read the *same protobuf wire format* by hand, so the bulk bytes are copied once
into the outgoing message and handed out as memoryview slices of the incoming one. Any other gRPC
client (grpcurl, another language) still speaks plain protobuf to the service.

Importable without torch; the server and the client both use it.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass

MALLOC_TUNING_ENV = "TOKENMILL_CHECKPOINT_MALLOC_TUNING"  # "0" turns tune_malloc off
_tuned: bool | None = None
_tune_lock = threading.Lock()

# protobuf wire types
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


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
        elif wire == _I64:
            pos += 8
        elif wire == _I32:
            pos += 4
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


def encode_download_chunk(msg: RawDownloadChunk | object) -> bytes:
    """DownloadChunk{1 entry, 2 is_file, 3 index, 4 offset, 5 data}; protobuf messages pass through."""
    if not isinstance(msg, RawDownloadChunk):
        return msg.SerializeToString()  # type: ignore[attr-defined]
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

    Every chunk read, received or serialised is a fresh 4 MiB buffer (gRPC hands each message over
    as a new bytes object); with glibc's defaults each one can be a new mmap whose pages fault in
    (and are zeroed) on first touch, which costs as much CPU as hashing it: measured ~0.4 CPU-s/GB
    on the loading client alone. A 32 MiB mmap threshold and a 512 MiB trim threshold let the
    allocator reuse the same memory. Both the server and CheckpointClient call this (the client
    with arena_max=None: it lives in other services' processes, whose thread/arena balance it must
    not change); a no-op off glibc or with TOKENMILL_CHECKPOINT_MALLOC_TUNING=0."""
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
