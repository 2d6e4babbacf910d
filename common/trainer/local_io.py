"""CheckpointIO over the checkpoint store engine, run in this process on a local directory.

The trainer's local mode (engine tests, bench scripts, a GPU box without the services) keeps its
checkpoints exactly as the checkpoint service does: the same engine (`CheckpointStore`) on the same
directory layout, so versions, tags, ``latest`` and the name rules are the store's, and a checkpoint
server started on that directory serves them.

Every worker process opens the store, but upload sessions live in the process that began them, so
writes use the store's same-host protocol: each rank writes its chunk files and a list of its
entries into the upload's staging directory; rank 0 (which began the upload) then registers every
rank's entries, has the store adopt the chunks (re-hashed, fsynced, renamed into place) and commits.
One training job per directory at a time: the engine treats the directory as its own (opening it
tidies what a crash left), as the checkpoint service does with its store.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from tokenmill.common.checkpoint import CheckpointStore, FileEntry, Manifest, ShardInfo, TensorEntry
from tokenmill.common.checkpoint.format import (
    Layout,
    chunk_file_name,
    digest_of,
    dtype_name,
    layout_of,
    split_chunks,
    staging_key,
    tensor_bytes,
    torch_dtype,
)
from tokenmill.common.checkpoint.manifest import DEFAULT_CHUNK_SIZE, Entry
from tokenmill.common.checkpoint.same_host import MAX_ADOPT
from tokenmill.common.errors import FailedPrecondition, InvalidArgument, NotFound
from tokenmill.common.storage import LocalBlobStore, write_temp_file
from tokenmill.common.trainer.checkpoint_io import CheckpointIO, manifest_metadata

ENTRIES_SUFFIX = ".entries.json"  # staging/<upload id>/rank-<r>.entries.json: one rank's entries


class LocalCheckpointIO:
    """Checkpoints in a checkpoint store directory, through the store engine in this process."""

    def __init__(self, root: str | os.PathLike[str], *, chunk_size: int = DEFAULT_CHUNK_SIZE):
        self.root = Path(root).resolve()
        self.store = CheckpointStore(LocalBlobStore(self.root))
        self.chunk_size = chunk_size
        self._manifests: dict[str, Manifest] = {}  # by resolved ref

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
        manifest = Manifest(
            config=dict(config), metrics=scalars, lineage=lineage_text, chunk_size=self.chunk_size
        )
        return self.store.begin_upload(name, manifest, tags=list(tags)).upload_id

    def write(
        self,
        upload_id: str,
        rank: int,
        tensors: Mapping[str, torch.Tensor],
        shards: Mapping[str, dict[str, Any]],
        files: Mapping[str, bytes] = {},  # noqa: B006 (read-only)
    ) -> None:
        staging = self.root / staging_key(upload_id)
        staging.mkdir(parents=True, exist_ok=True)
        staged: set[str] = set()
        entries: dict[str, list[dict[str, Any]]] = {"tensors": [], "files": []}
        for key, t in tensors.items():
            dtype = dtype_name(t.dtype)
            if dtype is None:
                raise InvalidArgument(f"tensor {key!r}: dtype {t.dtype} has no safetensors name")
            view = tensor_bytes(t)
            info = shards.get(key)
            entry = TensorEntry(
                key,
                dtype,
                list(t.shape),
                len(view),
                self._stage(staging, view, staged),
                ShardInfo.from_json(info) if info else None,
            )
            entries["tensors"].append(entry.to_json())
        for fname, data in files.items():
            view = memoryview(data).cast("B")
            entries["files"].append(FileEntry(fname, len(view), self._stage(staging, view, staged)).to_json())
        _publish(staging / f"rank-{rank:05d}{ENTRIES_SUFFIX}", json.dumps(entries).encode())

    def _stage(self, staging: Path, view: memoryview, staged: set[str]) -> list[str]:
        """Write the chunks of `view` into the staging directory; their digests. No fsync here: the
        store fsyncs every chunk it adopts."""
        digests = []
        for chunk in split_chunks(view, self.chunk_size):
            digest = digest_of(chunk)
            if digest not in staged:
                _publish(staging / chunk_file_name(digest), chunk, fsync=False)
                staged.add(digest)
            digests.append(digest)
        return digests

    def commit(self, upload_id: str) -> str:
        staging = self.root / staging_key(upload_id)
        tensors: list[TensorEntry] = []
        files: list[FileEntry] = []
        for path in sorted(staging.glob(f"rank-*{ENTRIES_SUFFIX}")):
            entries = json.loads(path.read_bytes())
            tensors += [TensorEntry.from_json(t) for t in entries["tensors"]]
            files += [FileEntry.from_json(f) for f in entries["files"]]
        missing = self.store.extend_upload(upload_id, tensors, files).missing_chunks
        for i in range(0, len(missing), MAX_ADOPT):
            self.store.adopt_staged(upload_id, missing[i : i + MAX_ADOPT])
        return self.store.commit(upload_id).ref

    # reading
    def resolve(self, ref: str) -> str | None:
        try:
            name, version = self.store.resolve(ref)
        except NotFound:
            return None
        return f"{name}:{version}"

    def _manifest(self, ref: str) -> tuple[str, Manifest]:
        """(resolved ref, its manifest); committed versions are immutable, so both are cached."""
        if ref not in self._manifests:
            resolved = self.resolve(ref)
            if resolved is None:
                raise NotFound(f"checkpoint {ref!r} not found under {self.root}")
            if resolved not in self._manifests:
                self._manifests[resolved] = self.store.get(resolved).manifest
            ref = resolved
        return ref, self._manifests[ref]

    def layout(self, ref: str) -> Layout:
        return layout_of(self._manifest(ref)[1].tensors)

    def read_pieces(self, ref: str, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        resolved, manifest = self._manifest(ref)
        entries = {t.name: t for t in manifest.tensors}
        unknown = [k for k in keys if k not in entries]
        if unknown:
            raise NotFound(f"checkpoint {resolved} has no piece(s) {unknown[:5]}")
        raw = self._read(resolved, [entries[k] for k in keys], [])
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            e = entries[key]
            dtype = torch_dtype(e.dtype)
            if dtype is None:
                raise FailedPrecondition(
                    f"tensor {key!r} has dtype {e.dtype} that this torch cannot represent"
                )
            buf = raw[key]
            flat = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
            out[key] = flat.view(dtype).reshape(e.shape)
        return out

    def read_files(self, ref: str, names: Sequence[str]) -> dict[str, bytes]:
        resolved, manifest = self._manifest(ref)
        entries = {f.name: f for f in manifest.files}
        unknown = [n for n in names if n not in entries]
        if unknown:
            raise NotFound(f"checkpoint {resolved} has no file(s) {unknown}; files: {sorted(entries)}")
        raw = self._read(resolved, [], [entries[n] for n in names])
        return {n: bytes(raw[n]) for n in names}

    def _read(
        self, ref: str, tensors: Sequence[TensorEntry], files: Sequence[FileEntry]
    ) -> dict[str, bytearray]:
        """The bytes of these entries of `ref`, by name (the store verifies every chunk it reads)."""
        entries: list[Entry] = [*tensors, *files]
        out = {e.name: bytearray(e.nbytes) for e in entries}
        wanted_t, wanted_f = [e.name for e in tensors if e.nbytes], [e.name for e in files if e.nbytes]
        if wanted_t or wanted_f:  # both empty would make the store read everything
            for chunk in self.store.read(ref, wanted_t, wanted_f):
                out[chunk.entry][chunk.offset : chunk.offset + len(chunk.data)] = chunk.data
        return out


def _publish(target: Path, data: bytes | memoryview, *, fsync: bool = True) -> None:
    """Write `target` atomically (temp file, rename): a rank killed meanwhile leaves no torn file."""
    os.replace(write_temp_file(target, data, fsync=fsync), target)


def local_checkpoint_io(spec: Mapping[str, Any]) -> CheckpointIO:
    """The engine's own factory: ``{"kind": "local", "root": path}`` only. Other kinds (the checkpoint
    service) are the trainer service's business: it passes its factory, so the engine never imports
    upward."""
    if spec.get("kind") != "local":
        raise InvalidArgument(
            f"checkpoint io kind {spec.get('kind')!r} needs a factory that knows it (the trainer service "
            "passes tokenmill.services.trainer.io_factory.make_checkpoint_io); this one builds only 'local'"
        )
    return LocalCheckpointIO(spec["root"])
