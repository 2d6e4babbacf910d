"""The trainer service's CheckpointIO factory: a local store directory or the checkpoint service.

It lives in the service layer because the store IO imports the gRPC client; the engine's backends
take it as a parameter (`io_factory`), so the engine never imports the service that runs it.
Module-level on purpose: worker processes (spawned or Ray) receive it by reference and import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenmill.common.errors import InvalidArgument
from tokenmill.common.trainer.checkpoint_io import CheckpointIO
from tokenmill.common.trainer.local_io import LocalCheckpointIO

DOTTED = "tokenmill.services.trainer.io_factory:make_checkpoint_io"


def make_checkpoint_io(spec: Mapping[str, Any]) -> CheckpointIO:
    """``{"kind": "local", "root": path}`` or ``{"kind": "store", "address", "token", "tls"}``."""
    kind = spec.get("kind")
    if kind == "local":
        return LocalCheckpointIO(spec["root"])
    if kind == "store":
        from tokenmill.services.trainer.store_io import StoreCheckpointIO

        return StoreCheckpointIO.from_spec(spec)
    raise InvalidArgument(f"unknown checkpoint io kind {kind!r}; use 'local' or 'store'")
