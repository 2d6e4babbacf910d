"""Model selectors (`name`, `name:version`, `name:tag`) matched exactly against what a replica serves.

A replica serves one resolved version; a request names it by bare name (any version of it), by that
exact version number, or by a tag that pointed at it when it loaded (`latest` when it was started
with a bare name). Anything else is NOT_FOUND: comparing only the part before ':' let
`relmodel:../../x` be served by whatever version was loaded. Invalid syntax is INVALID_ARGUMENT,
checked with the same rules the checkpoint store applies to names and tags.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tokenmill.common.errors import InvalidArgument, NotFound
from tokenmill.common.names import validate_name, validate_tag


@dataclass(frozen=True)
class Served:
    """What one replica serves: the resolved `name:version` ref and the tags it was resolved through."""

    ref: str
    tags: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.ref.partition(":")[0]

    @property
    def version(self) -> str:
        return self.ref.partition(":")[2]

    def describe(self) -> str:
        return f"{self.ref} (tags: {', '.join(self.tags)})" if self.tags else self.ref


@dataclass(frozen=True)
class Selector:
    name: str
    qualifier: str = ""  # "" = any version; all digits = a version; otherwise a tag

    @classmethod
    def parse(cls, text: str) -> Selector | None:
        """None for "" (any served model); INVALID_ARGUMENT for anything not name[:version|tag]."""
        if not text:
            return None
        name, sep, qualifier = text.partition(":")
        validate_name(name, what="model", field=f"model {text!r}: the name")
        if not sep:
            return cls(name)
        if not qualifier or ":" in qualifier:
            raise InvalidArgument(f"model {text!r} is not NAME, NAME:VERSION or NAME:TAG")
        if not qualifier.isdigit():
            validate_tag(qualifier, allow_reserved=True)
        elif int(qualifier) < 1 or qualifier != str(int(qualifier)):
            raise InvalidArgument(f"model {text!r}: a version is a number from 1 without leading zeros")
        return cls(name, qualifier)

    def matches(self, served: Served) -> bool:
        if self.name != served.name:
            return False
        if not self.qualifier:
            return True
        if self.qualifier.isdigit():
            return self.qualifier == served.version
        return self.qualifier in served.tags


def check_served(model: str, served: Sequence[Served], where: str = "the replicas serve") -> list[Served]:
    """The entries of `served` that `model` selects; NOT_FOUND (saying what is served) when none."""
    selector = Selector.parse(model)
    if selector is None:
        return list(served)
    chosen = [s for s in served if selector.matches(s)]
    if not chosen:
        raise NotFound(f"model {model!r} is not served; {where} {describe(served)}")
    return chosen


def describe(served: Iterable[Served]) -> str:
    return ", ".join(sorted({s.describe() for s in served})) or "nothing"
