"""Where checkpoints go: the engine's small protocol, reading logical tensors, and IO factories.

Every rank writes only the rows of each tensor it owns (FSDP2 shards dim 0), as shard *pieces* named
and placed as the checkpoint format says (tokenmill.common.checkpoint.format: ``piece_name``, a
ShardInfo ``{"logical_name", "offsets", "global_shape"}``). A reader asks for the rows it needs under
*its* world size and gets them assembled from whatever pieces overlap, so a checkpoint written by N
workers loads on M. Two implementations: the checkpoint store in this process on a local directory
(local_io.py) and the checkpoint service (the trainer service's store_io.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch

from tokenmill.common.checkpoint.format import Layout, assemble
from tokenmill.common.errors import InvalidArgument, NotFound


class CheckpointIO(Protocol):
    """The engine's whole view of checkpoint storage (multi-rank upload + sliced reads)."""

    def begin(
        self,
        name: str,
        *,
        config: dict[str, Any],
        tags: Sequence[str] = (),
        metrics: dict[str, Any] | None = None,
        lineage: dict[str, str] | None = None,
    ) -> str:
        """Rank 0: open an upload; returns its id, which rank 0 broadcasts to the other ranks.
        ``lineage`` keys: parent (checkpoint ref), dataset, job_id."""

    def write(
        self,
        upload_id: str,
        rank: int,
        tensors: Mapping[str, torch.Tensor],
        shards: Mapping[str, dict[str, Any]],
        files: Mapping[str, bytes] = {},  # noqa: B006 (read-only)
    ) -> None:
        """Every rank: add its pieces (keys of ``tensors``; ShardInfo per sharded piece) and files."""

    def commit(self, upload_id: str) -> str:
        """Rank 0, after a barrier: make the version visible; returns its ref ``name:version``."""

    def resolve(self, ref: str) -> str | None:
        """``name``, ``name:version`` or ``name:tag`` -> ``name:version``; None when absent."""

    def layout(self, ref: str) -> Layout: ...

    def read_pieces(self, ref: str, keys: Sequence[str]) -> dict[str, torch.Tensor]: ...

    def read_files(self, ref: str, names: Sequence[str]) -> dict[str, bytes]: ...


def manifest_metadata(
    metrics: Mapping[str, Any] | None, lineage: Mapping[str, Any] | None
) -> tuple[dict[str, Any], dict[str, str]]:
    """(metrics, lineage) as a manifest records them: scalar metrics only, non-empty lineage as text."""
    scalars = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str, bool))}
    return scalars, {k: str(v) for k, v in (lineage or {}).items() if v}


# ------------------------------------------------------------------------------------------- reading
def read_tensor(
    io: CheckpointIO, ref: str, layout: Layout, name: str, index: Sequence[slice] = ()
) -> torch.Tensor:
    """Logical tensor ``name`` of ``ref`` (or its ``index`` slice), read from the pieces it needs."""
    pieces = layout.get(name)
    if not pieces:
        raise NotFound(f"checkpoint {ref} has no tensor {name!r}")
    return assemble(pieces, lambda keys: io.read_pieces(ref, keys), index)


def read_full(io: CheckpointIO, ref: str, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Whole logical tensors (for single-process consumers: tests, export, small models)."""
    layout = io.layout(ref)
    return {name: read_tensor(io, ref, layout, name) for name in (names if names is not None else layout)}


# ----------------------------------------------------------------------------------------- factories
IoFactory = Callable[[Mapping[str, Any]], CheckpointIO]
"""Builds a CheckpointIO from a JSON spec inside each worker process (workers cannot share one)."""


def resolve_io_factory(factory: IoFactory | str) -> IoFactory:
    """A factory given as a callable, or as a dotted path ``"package.module:function"`` (what travels
    to worker processes that must import it themselves)."""
    if callable(factory):
        return factory
    module, sep, attr = str(factory).partition(":")
    if not sep or not module or not attr:
        raise InvalidArgument(f"io factory {factory!r}: use 'package.module:function'")
    fn = getattr(importlib.import_module(module), attr, None)
    if not callable(fn):
        raise InvalidArgument(f"io factory {factory!r}: {module} has no callable {attr!r}")
    return fn
