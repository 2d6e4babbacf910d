"""Validation of everything a client names: models, tags, refs, tensor and file entries.

Model names and tags become storage key components, and file entries become paths when a
checkpoint is exported, so they are checked against a strict allow-list (no path traversal, no
absolute paths, bounded lengths) before anything touches the backend.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.errors import InvalidArgument

MAX_NAME = 100
MAX_TAG = 64
MAX_ENTRY = 512
MAX_FILE = 256
RESERVED_TAGS = frozenset({"latest"})

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_FILE_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_HINT = "use letters, digits, '.', '_' and '-' (starting with a letter or digit)"


def validate_name(name: str) -> str:
    """A model name: one safe path component, at most MAX_NAME characters."""
    if not isinstance(name, str) or not name:
        raise InvalidArgument("checkpoint name is empty; give a model name such as 'demo-model'")
    if len(name) > MAX_NAME:
        raise InvalidArgument(f"checkpoint name is {len(name)} characters; the limit is {MAX_NAME}")
    if not _NAME.match(name) or ".." in name:
        raise InvalidArgument(f"invalid checkpoint name {name!r}: {_HINT}; no '/', '..' or absolute paths")
    return name


def validate_tag(tag: str, *, allow_reserved: bool = False) -> str:
    """A tag: like a name, not all digits (that would read as a version), not reserved."""
    if not isinstance(tag, str) or not tag:
        raise InvalidArgument("tag is empty; give a tag such as 'best' or 'step-2000'")
    if len(tag) > MAX_TAG:
        raise InvalidArgument(f"tag {tag[:20]!r}... is {len(tag)} characters; the limit is {MAX_TAG}")
    if not _TAG.match(tag) or ".." in tag:
        raise InvalidArgument(f"invalid tag {tag!r}: {_HINT}")
    if tag.isdigit():
        raise InvalidArgument(f"tag {tag!r} is all digits and would be read as a version number")
    if tag in RESERVED_TAGS and not allow_reserved:
        raise InvalidArgument(f"tag {tag!r} is reserved: it always means the newest version")
    return tag


def validate_entry_name(name: str) -> str:
    """A tensor name: printable, bounded; never used as a path."""
    if not isinstance(name, str) or not name:
        raise InvalidArgument("tensor name is empty")
    if len(name) > MAX_ENTRY:
        raise InvalidArgument(f"tensor name {name[:40]!r}... is {len(name)} characters; limit {MAX_ENTRY}")
    if not name.isprintable():
        raise InvalidArgument(f"tensor name {name!r} contains non-printable characters")
    return name


def validate_file_name(name: str) -> str:
    """A file entry: a relative path of safe components (it becomes a path on export)."""
    if not isinstance(name, str) or not name:
        raise InvalidArgument("file name is empty; give a relative path such as 'tokenizer.json'")
    if len(name) > MAX_FILE:
        raise InvalidArgument(f"file name {name[:40]!r}... is {len(name)} characters; limit {MAX_FILE}")
    if name.startswith("/") or "\\" in name or ":" in name:
        raise InvalidArgument(f"invalid file name {name!r}: must be a relative path without '\\' or ':'")
    for part in name.split("/"):
        if part in ("", ".", "..") or not _FILE_PART.match(part):
            raise InvalidArgument(
                f"invalid file name {name!r}: component {part!r} is not allowed; {_HINT}, no '..'"
            )
    return name


@dataclass(frozen=True)
class Ref:
    """A parsed reference: `name`, `name:version` or `name:tag` (selector '' = latest)."""

    name: str
    selector: str = ""

    @property
    def is_version(self) -> bool:
        return self.selector.isdigit()

    def __str__(self) -> str:
        return f"{self.name}:{self.selector}" if self.selector else self.name


def parse_ref(ref: str) -> Ref:
    if not isinstance(ref, str) or not ref:
        raise InvalidArgument("checkpoint reference is empty; use 'name', 'name:version' or 'name:tag'")
    if ref.count(":") > 1:
        raise InvalidArgument(
            f"invalid checkpoint reference {ref!r}: use 'name', 'name:version' or 'name:tag'"
        )
    name, _, selector = ref.partition(":")
    validate_name(name)
    if ":" in ref and not selector:
        raise InvalidArgument(f"invalid checkpoint reference {ref!r}: nothing after ':'")
    if selector and not selector.isdigit():
        validate_tag(selector, allow_reserved=True)
    if selector.isdigit():
        if len(selector) > 12 or int(selector) < 1:
            raise InvalidArgument(f"invalid version {selector!r} in {ref!r}: versions are 1, 2, 3, ...")
        selector = str(int(selector))
    return Ref(name, selector)
