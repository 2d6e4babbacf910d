"""The one definition of a valid client-chosen name: checkpoint (model) names, dataset names, tags and
file entries.

Names become storage key components and directory names, and file entries become paths when a
checkpoint is exported, so every service checks them against the same strict allow-list (no path
traversal, no absolute paths, bounded lengths). One definition matters: a trainer `output_name` that
passed the trainer's check but not the checkpoint store's would be rejected only after training.
Engine-safe: imports nothing but `tokenmill.common.errors`.
"""

from __future__ import annotations

import re

from tokenmill.common.errors import InvalidArgument

MAX_NAME = 100
MAX_TAG = 64
MAX_FILE = 256
RESERVED_TAGS = frozenset({"latest"})

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_FILE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
HINT = "use letters, digits, '.', '_' and '-' (starting with a letter or digit)"


def validate_name(name: str, *, what: str = "checkpoint", field: str | None = None) -> str:
    """A checkpoint or dataset name: one safe path component of at most MAX_NAME characters.

    `what` says what is named ("checkpoint", "dataset") and `field` the request field that carried it
    (e.g. "output_name"), so the message points at exactly what to change.
    """
    label = field or f"{what} name"
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"{label} is required: give a {what} name such as 'demo-model'")
    if len(name) > MAX_NAME:
        raise InvalidArgument(
            f"{label} {name[:20]!r}... is {len(name)} characters; the limit is {MAX_NAME} for a {what} name"
        )
    if not _NAME.fullmatch(name) or ".." in name:  # fullmatch: `$` would let "name\n" through
        problem = f"{field} {name!r} is not a valid {what} name" if field else f"invalid {what} name {name!r}"
        raise InvalidArgument(f"{problem}: {HINT}; no '/', '..' or absolute paths")
    return name


def validate_tag(tag: str, *, allow_reserved: bool = False) -> str:
    """A tag: like a name, not all digits (that would read as a version), not reserved."""
    if not isinstance(tag, str) or not tag:
        raise InvalidArgument("tag is empty; give a tag such as 'best' or 'step-2000'")
    if len(tag) > MAX_TAG:
        raise InvalidArgument(f"tag {tag[:20]!r}... is {len(tag)} characters; the limit is {MAX_TAG}")
    if not _NAME.fullmatch(tag) or ".." in tag:
        raise InvalidArgument(f"invalid tag {tag!r}: {HINT}; no '..'")
    if tag.isdigit():
        raise InvalidArgument(f"tag {tag!r} is all digits and would be read as a version number")
    if tag in RESERVED_TAGS and not allow_reserved:
        raise InvalidArgument(f"tag {tag!r} is reserved: it always means the newest version")
    return tag


def validate_file_name(name: str) -> str:
    """A file entry: a relative path of safe components (it becomes a path on export)."""
    if not isinstance(name, str) or not name:
        raise InvalidArgument("file name is empty; give a relative path such as 'tokenizer.json'")
    if len(name) > MAX_FILE:
        raise InvalidArgument(f"file name {name[:40]!r}... is {len(name)} characters; limit {MAX_FILE}")
    if name.startswith("/") or "\\" in name or ":" in name:
        raise InvalidArgument(f"invalid file name {name!r}: must be a relative path without '\\' or ':'")
    for part in name.split("/"):
        if part in ("", ".", "..") or not _FILE_PART.fullmatch(part):
            raise InvalidArgument(
                f"invalid file name {name!r}: component {part!r} is not allowed; {HINT}, no '..'"
            )
    return name
