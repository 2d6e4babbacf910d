"""Where services may read client-named inputs: the `input_roots` setting, enforced in one place.

A client names files the service then reads with its own permissions (ingest sources, SFT data,
tokenizers). On a shared deployment that must not reach `/etc` or another tenant's data, so every
such name is checked against `config.input_roots` (local directories and/or `s3://` prefixes)
after resolving `..` and symlinks: a symlink inside an allowed root that points outside is outside.
Empty roots mean "anywhere the process can read" (a single-user workstation).
Engine-safe: imports nothing but `tokenmill.common.errors`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenmill.common.errors import InvalidArgument, PermissionDenied

SETTING = "input_roots (env TOKENMILL_INPUT_ROOTS)"
S3 = "s3://"
MAX_PATH = 4096  # Linux PATH_MAX; longer names fail in the kernel ("File name too long")
MAX_COMPONENT = 255  # NAME_MAX, in bytes


def _s3_inside(url: str, root: str) -> bool:
    root = root.rstrip("/")
    return url == root or url.startswith(root + "/")


def _denied(what: str, value: str, roots: Sequence[str]) -> PermissionDenied:
    return PermissionDenied(
        f"{what} {value!r} is outside the allowed input locations {list(roots)}; move it under one of "
        f"them, or have the operator add its location to the {SETTING} setting"
    )


def _check_length(what: str, value: str) -> None:
    """Bounded before any filesystem call, so an oversized name is the client's error, not an OSError."""
    if len(value) > MAX_PATH:
        raise InvalidArgument(
            f"{what} {value[:40]!r}... is {len(value):,} characters; the limit is {MAX_PATH}"
        )
    if value.startswith(S3):
        return
    for part in value.split("/"):
        if len(part.encode("utf-8", "surrogatepass")) > MAX_COMPONENT:
            raise InvalidArgument(
                f"{what} {value[:40]!r}...: the path component {part[:20]!r}... is longer than "
                f"{MAX_COMPONENT} bytes, the limit for one file or directory name"
            )


def check_input_allowed(path_or_url: str, roots: Sequence[str], *, what: str = "input") -> str:
    """The resolved local path (or the s3:// URL) if it lies under one of `roots`.

    PermissionDenied otherwise; InvalidArgument for a scheme other than s3://, a NUL byte or a path
    longer than the OS allows. `what` names the request field ("source", "sft_data", "tokenizer").
    """
    if not path_or_url or "\x00" in path_or_url:
        raise InvalidArgument(f"{what} {path_or_url!r} is not a valid path")
    _check_length(what, path_or_url)
    if path_or_url.startswith(S3):
        # some S3-compatible stores normalise '..' in keys, so it never counts as inside a prefix
        escapes = ".." in path_or_url[len(S3) :].split("/")
        if roots and (escapes or not any(r.startswith(S3) and _s3_inside(path_or_url, r) for r in roots)):
            raise _denied(what, path_or_url, roots)
        return path_or_url
    if "://" in path_or_url:
        raise InvalidArgument(
            f"{what} {path_or_url!r}: unsupported scheme; use a local path or s3://bucket/prefix"
        )
    resolved = Path(path_or_url).resolve()
    if roots:
        local = [Path(r).expanduser().resolve() for r in roots if not r.startswith(S3)]
        if not any(resolved.is_relative_to(root) for root in local):
            raise _denied(what, path_or_url, roots)
    return str(resolved)
