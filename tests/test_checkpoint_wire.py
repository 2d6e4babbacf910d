"""The zero-copy codecs write and read exactly the protobuf wire format of the generated messages."""

from __future__ import annotations

import os

import pytest

from tokenmill.common.checkpoint.format import (
    RawDownloadChunk,
    decode_download_chunk,
    decode_upload_chunk,
    encode_download_chunk,
    encode_upload_chunk,
)
from tokenmill.v1 import checkpoint_pb2 as pb


@pytest.mark.parametrize("size", [0, 1, 127, 128, 70_000])
def test_download_chunk_matches_protobuf(size):
    data = os.urandom(size)
    raw = RawDownloadChunk("model.layers.0.mlp.up_proj.weight", True, 300, 2**40 + 5, memoryview(data))
    msg = pb.DownloadChunk.FromString(encode_download_chunk(raw))
    assert (msg.entry, msg.is_file, msg.index, msg.offset, msg.data) == (
        raw.entry,
        True,
        300,
        2**40 + 5,
        data,
    )
    back = decode_download_chunk(msg.SerializeToString())
    assert (back.entry, back.is_file, back.index, back.offset, bytes(back.data)) == (
        raw.entry,
        True,
        300,
        2**40 + 5,
        data,
    )
    # protobuf messages pass through the encoder unchanged
    assert encode_download_chunk(msg) == msg.SerializeToString()


def test_upload_chunk_matches_protobuf():
    data = os.urandom(5000)
    encoded = encode_upload_chunk(("u" * 32, "d" * 64, memoryview(data)))
    msg = pb.UploadChunk.FromString(encoded)
    assert (msg.upload_id, msg.digest, msg.data) == ("u" * 32, "d" * 64, data)
    back = decode_upload_chunk(msg.SerializeToString())
    assert (back.upload_id, back.digest, bytes(back.data)) == ("u" * 32, "d" * 64, data)


def test_unknown_fields_are_skipped_and_truncation_is_an_error():
    msg = pb.UploadChunk(upload_id="a", digest="b", data=b"xyz").SerializeToString()
    extra = (
        bytes([(9 << 3) | 0, 5, (10 << 3) | 2, 2, 1, 2, (11 << 3) | 5, 0, 0, 0, 0, (12 << 3) | 1]) + b"\0" * 8
    )
    back = decode_upload_chunk(msg + extra)
    assert (back.upload_id, bytes(back.data)) == ("a", b"xyz")
    for bad in (msg[:-1], b"\x1a\x80", bytes([(1 << 3) | 3])):
        with pytest.raises(ValueError):
            decode_upload_chunk(bad)


def test_tune_malloc_runs_once_and_can_be_turned_off():
    """Process-wide, so checked in fresh interpreters: applied once (glibc), off with the env var."""
    import os
    import subprocess
    import sys

    code = (
        "from tokenmill.common.checkpoint.format import tune_malloc; "
        "print(tune_malloc(arena_max=None), tune_malloc())"
    )
    env = {k: v for k, v in os.environ.items() if k != "TOKENMILL_CHECKPOINT_MALLOC_TUNING"}
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert on.stdout.split() == ["True", "True"]
    env["TOKENMILL_CHECKPOINT_MALLOC_TUNING"] = "0"
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert off.stdout.split() == ["False", "False"]
