"""CheckpointIO over the checkpoint store service (tokenmill.common.clients.checkpoint).

Each worker process builds its own client from a JSON spec; rank 0 opens the upload, every rank
``attach(upload_id).add(...)``s its own shard pieces, rank 0 commits. Reads fetch only the pieces a
rank's rows overlap. Manifests of committed versions are immutable, so they are cached per ref.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tokenmill.common import errors
from tokenmill.common.checkpoint.format import Layout, layout_of
from tokenmill.common.clients.checkpoint import CheckpointClient
from tokenmill.common.trainer.checkpoint_io import manifest_metadata


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
    def begin(
        self,
        name: str,
        *,
        config: dict[str, Any],
        tags: Sequence[str] = (),
        metrics: dict[str, Any] | None = None,
        lineage: dict[str, str] | None = None,
    ) -> str:
        scalars, lineage_text = manifest_metadata(metrics, lineage)
        return self.client.begin(
            name, config=config, tags=tags, metrics=scalars, lineage=lineage_text
        ).upload_id

    def write(
        self,
        upload_id: str,
        rank: int,
        tensors: Mapping[str, torch.Tensor],
        shards: Mapping[str, dict[str, Any]],
        files: Mapping[str, bytes] = {},  # noqa: B006 (read-only)
    ) -> None:
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
            self._layouts[resolved] = layout_of(
                self.client.get(resolved, include_manifest=True).manifest.tensors
            )
        return self._layouts[resolved]

    def read_pieces(self, ref: str, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.client.load_raw(ref, list(keys))[1]

    def read_files(self, ref: str, names: Sequence[str]) -> dict[str, bytes]:
        return self.client.load_files(ref, list(names))
