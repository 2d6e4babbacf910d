"""Damaged records in the blob backend: naming them, describing what is wrong, setting them aside.

Why one place: a truncated or garbled JSON record (a manifest, a tags document, an upload session)
must never stop the store. Each kind is handled where it is read (a damaged manifest quarantines
its version, see catalog.py; a damaged tags document is rebuilt; a damaged session is set aside),
and all of them describe the damage the same way, naming the file an operator has to look at.
"""

from __future__ import annotations

import json
import logging
import time

from tokenmill.common.errors import InvalidArgument
from tokenmill.common.storage import BlobStore

log = logging.getLogger("tokenmill.checkpoint")

QUARANTINE = "quarantine/"

# Everything decoding a damaged record can raise: bad JSON or UTF-8 (ValueError), missing fields
# (KeyError), wrong types (TypeError, AttributeError), absurd numbers (OverflowError), nesting too
# deep (RecursionError), and a record that parses but does not validate (InvalidArgument).
PARSE_ERRORS = (
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    OverflowError,
    RecursionError,
    InvalidArgument,
)


def object_location(backend: BlobStore, key: str) -> str:
    """The file (local backend) or object URL holding `key`, as an operator would look for it."""
    files = backend.local_files()
    if files is not None:
        return str(files.path(key))
    return f"{backend.url.rstrip('/')}/{key}"


def describe(exc: BaseException) -> str:
    """What is wrong with a record, in a few words: 'is not valid JSON (...)' and the like."""
    if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
        what = "is not valid JSON"
    elif isinstance(exc, KeyError):
        return f"is missing the field {exc}"
    elif isinstance(exc, RecursionError):
        return "is nested too deeply to be a record"
    else:
        what = "does not have the expected shape"
    detail = str(exc) or type(exc).__name__
    if len(detail) > 200:
        detail = detail[:200] + "..."
    return f"{what} ({detail})"


def set_aside(backend: BlobStore, key: str, raw: bytes) -> str:
    """Move a damaged record to `quarantine/<key>.<ms>` (kept for inspection, out of the way of
    the store); returns where the copy is."""
    copy_key = f"{QUARANTINE}{key}.{int(time.time() * 1000)}"
    backend.put(copy_key, raw)
    backend.delete(key)
    return object_location(backend, copy_key)
