"""`CheckpointClient`: save and load model artifacts through the checkpoint store service.

The facade over the client's parts: core.py (connection, settings, versions, leases), uploads.py
(saving), downloads.py (loading, shard assembly) and same_host.py (staged writes and direct reads
when the store's directory is visible here); this module adds the management calls and the Hugging
Face layout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tokenmill.common.clients.checkpoint.downloads import DownloadsMixin
from tokenmill.common.clients.checkpoint.uploads import UploadsMixin
from tokenmill.v1 import checkpoint_pb2 as pb


class CheckpointClient(UploadsMixin, DownloadsMixin):
    """Saving sends only the chunks the store lacks; loading pulls a version over parallel streams
    (or reads the store's files on the same host); FSDP shard pieces are stored as ordinary tensors
    named ``{logical}@{offsets}`` (tokenmill.common.checkpoint.format) that `load` reassembles and
    `load_slice` reads any slice of. Constructor options: see `ClientCore`."""

    def set_tag(self, ref: str, tag: str) -> pb.CheckpointVersion:
        return self._unary(self.stub.SetTag, pb.SetTagRequest(ref=ref, tag=tag))

    def delete_tag(self, name: str, tag: str) -> bool:
        return self._unary(self.stub.DeleteTag, pb.DeleteTagRequest(name=name, tag=tag)).deleted

    def delete(self, ref: str, *, force: bool = False) -> bool:
        return self._unary(
            self.stub.DeleteCheckpoint, pb.DeleteCheckpointRequest(ref=ref, force=force)
        ).deleted

    def retention(
        self, name: str, keep_last: int, *, keep_tagged: bool = True, dry_run: bool = False
    ) -> list[str]:
        request = pb.ApplyRetentionRequest(
            name=name, keep_last=keep_last, keep_tagged=keep_tagged, dry_run=dry_run
        )
        return list(self._unary(self.stub.ApplyRetention, request).deleted)

    def gc(self, *, dry_run: bool = False) -> pb.CollectGarbageResponse:
        return self._unary(self.stub.CollectGarbage, pb.CollectGarbageRequest(dry_run=dry_run))

    def verify(self, ref: str = "") -> pb.VerifyResponse:
        return self._unary(self.stub.Verify, pb.VerifyRequest(ref=ref), timeout=None)

    def stats(self) -> pb.StoreStats:
        return self._unary(self.stub.GetStoreStats, pb.GetStoreStatsRequest())

    def export_hf(self, ref: str, out_dir: str | os.PathLike[str]) -> Path:
        from tokenmill.common.model.hf_layout import export_hf

        return export_hf(self, ref, out_dir)

    def import_hf(self, in_dir: str | os.PathLike[str], name: str, **kwargs: Any) -> pb.CheckpointVersion:
        from tokenmill.common.model.hf_layout import import_hf

        return import_hf(self, in_dir, name, **kwargs)
