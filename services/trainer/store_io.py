"""CheckpointIO over the checkpoint store service (common/clients/checkpoint.py).

Each worker process builds its own client from a JSON spec; rank 0 opens the upload, every rank
``attach(upload_id).add(...)``s its own shard pieces, rank 0 commits. Reads fetch only the pieces a
rank's rows overlap. Manifests of committed versions are immutable, so they are cached per ref.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tokenmill.common import errors
from tokenmill.common.clients.checkpoint import CheckpointClient
from tokenmill.common.trainer.checkpoint_io import Layout


class StoreCheckpointIO:
    def __init__(self, client: CheckpointClient):
        self.client = client
        self._layouts: dict[str, Layout] = {}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> StoreCheckpointIO:
        """``{"kind": "store", "address", "token", "tls": ClientTls fields or None}``."""
        return cls(
            CheckpointClient(spec["address"], token=spec.get("token") or None, tls=spec.get("tls") or None)
        )

    # writing
    def begin(self, name, *, config, tags=(), metrics=None, lineage=None) -> str:
        up = self.client.begin(
            name,
            config=config,
            tags=tags,
            metrics=_scalars(metrics or {}),
            lineage={k: str(v) for k, v in (lineage or {}).items() if v},
        )
        return up.upload_id

    def write(self, upload_id, rank, tensors, shards, files={}) -> None:  # noqa: B006
        self.client.attach(upload_id).add(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, shards=shards, files=dict(files)
        )

    def commit(self, upload_id: str) -> str:
        return self.client.attach(upload_id).commit().ref

    # reading
    def resolve(self, ref: str) -> str | None:
        try:
            return self.client.get(ref, include_manifest=False).ref
        except errors.NotFound:
            return None

    def layout(self, ref: str) -> Layout:
        resolved = self.resolve(ref)
        if resolved is None:
            raise errors.NotFound(f"checkpoint {ref!r} not found; list them with 'tokenmill ckpt list'")
        if resolved not in self._layouts:
            manifest = self.client.get(resolved, include_manifest=True).manifest
            layout: Layout = {}
            for t in manifest.tensors:
                shape = [int(s) for s in t.shape]
                if t.HasField("shard") and t.shard.logical_name:
                    name = t.shard.logical_name
                    offsets = [int(o) for o in t.shard.offsets]
                    gshape = [int(s) for s in t.shard.global_shape]
                else:
                    name, offsets, gshape = t.name, [0] * len(shape), shape
                layout.setdefault(name, []).append(
                    {"key": t.name, "offsets": offsets, "shape": shape, "global_shape": gshape}
                )
            self._layouts[resolved] = layout
        return self._layouts[resolved]

    def read_pieces(self, ref: str, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.client.load_raw(ref, list(keys))[1]

    def read_files(self, ref: str, names: Sequence[str]) -> dict[str, bytes]:
        return self.client.load_files(ref, list(names))


def _scalars(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool))}
