"""Typed gRPC clients, one per service (see docs/contracts.md "Clients").

Re-exported lazily: each client lives in its own module written by the service's owner, and
importing this package must not fail because one of them is missing or broken; the error
surfaces only when that client is used.
"""

from __future__ import annotations

import importlib
from typing import Any

from tokenmill.common.clients.base import BaseClient, ClientTls, JobsClientMixin

_LAZY = {
    "CheckpointClient": "tokenmill.common.clients.checkpoint",
    "IngestClient": "tokenmill.common.clients.ingest",
    "TrainerClient": "tokenmill.common.clients.trainer",
    "CompressClient": "tokenmill.common.clients.compress",
    "InferenceClient": "tokenmill.common.clients.inference",
}

__all__ = ["BaseClient", "ClientTls", "JobsClientMixin", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
