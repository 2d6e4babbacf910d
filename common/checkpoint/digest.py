"""Chunk digests of the checkpoint store: which hash names a chunk, spelled in the digest itself.

Why BLAKE3: a chunk is hashed once by the client (dedup: "which chunks does the store lack?"),
once by the server (it never trusts a client's digest) and once on every read (integrity). With
sha256 that was ~0.75 CPU-seconds per GB each time on the 2-core box, most of the store's CPU
cost; BLAKE3 (SIMD, releases the GIL) is ~4x cheaper and just as collision-resistant for this use.

Digest strings carry their algorithm, so the format is explicit and old stores stay readable:

* ``blake3:<64 lowercase hex>``: what clients write now;
* ``<64 lowercase hex>`` (bare): sha256, the store's original format, still accepted for reads
  and writes so versions committed before BLAKE3 keep loading and verifying.

Importable without torch or gRPC: the store engine and the client both use it.
"""

from __future__ import annotations

import hashlib
import re

from tokenmill.common.errors import InvalidArgument

BLAKE3 = "blake3"
SHA256 = "sha256"
ALGORITHMS = (BLAKE3, SHA256)
DEFAULT_ALGORITHM = BLAKE3

_DIGEST = re.compile(r"^(?:(blake3):)?([0-9a-f]{64})$")
_CHUNK_FILE = re.compile(r"^(?:(blake3)-)?([0-9a-f]{64})$")
CHUNK_PREFIX = "chunks/"
STAGING_PREFIX = "staging/"  # same-host uploads: staging/<upload_id>/<chunk file name>
_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")


def _blake3_hex(data: bytes | bytearray | memoryview) -> str:
    try:
        from blake3 import blake3
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("blake3 digests need the blake3 package: pip install blake3") from exc
    return blake3(data).hexdigest()


def _sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


_HEX = {BLAKE3: _blake3_hex, SHA256: _sha256_hex}


def check_algorithm(algorithm: str) -> str:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown chunk hash {algorithm!r}; choose one of {ALGORITHMS}")
    return algorithm


def parse_digest(digest: str) -> tuple[str, str]:
    """(algorithm, hex) of a digest string; INVALID_ARGUMENT when it is neither accepted form."""
    m = _DIGEST.match(digest) if isinstance(digest, str) else None
    if m is None:
        raise InvalidArgument(
            f"invalid chunk digest {str(digest)[:80]!r}: expected 'blake3:' + 64 lowercase hex "
            "(or 64 lowercase hex for a sha256 digest)"
        )
    return (BLAKE3 if m.group(1) else SHA256), m.group(2)


def format_digest(algorithm: str, hex_digest: str) -> str:
    return hex_digest if algorithm == SHA256 else f"{algorithm}:{hex_digest}"


def digest_of(data: bytes | bytearray | memoryview, algorithm: str = DEFAULT_ALGORITHM) -> str:
    """The digest string naming `data` under `algorithm` (releases the GIL for large chunks)."""
    return format_digest(algorithm, _HEX[check_algorithm(algorithm)](data))


def matches(digest: str, data: bytes | bytearray | memoryview) -> tuple[bool, str]:
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
    if not isinstance(upload_id, str) or not _UPLOAD_ID.match(upload_id):
        raise InvalidArgument(f"invalid upload id {str(upload_id)[:80]!r}: expected 32 lowercase hex")
    return f"{STAGING_PREFIX}{upload_id}"


def digest_from_key(key: str) -> str | None:
    """The digest a chunk key names, or None for a key that is not a chunk."""
    m = _CHUNK_FILE.match(key.rsplit("/", 1)[-1])
    if m is None:
        return None
    return format_digest(m.group(1) or SHA256, m.group(2))
