"""What only the store names: refs (`name[:version|tag]`) and tensor entries.

Model names, tags and file entries are checked by `tokenmill.common.names`, shared with the other
services, so what they accept at submit the store accepts too.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.common.errors import InvalidArgument
from tokenmill.common.names import validate_name, validate_tag

MAX_ENTRY = 512


def validate_entry_name(name: str) -> str:
    """A tensor name: printable, bounded; never used as a path."""
    if not isinstance(name, str) or not name:
        raise InvalidArgument("tensor name is empty")
    if len(name) > MAX_ENTRY:
        raise InvalidArgument(f"tensor name {name[:40]!r}... is {len(name)} characters; limit {MAX_ENTRY}")
    if not name.isprintable():
        raise InvalidArgument(f"tensor name {name!r} contains non-printable characters")
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
