"""Where checkpoints go: a small protocol, a local-directory implementation, and ShardInfo helpers.

Every rank writes only the rows of each tensor it owns (FSDP2 shards dim 0), as *pieces* named
``{logical_name}@{row_offset,0,...}`` with a ShardInfo ``{"logical_name", "offsets", "global_shape"}`` (the
layout the checkpoint store's manifest records, docs/contracts.md "Checkpoint client"). A reader asks
for the rows it needs under *its* world size and gets them assembled from whatever pieces overlap,
so a checkpoint written by N workers loads on M.

Nothing here pickles: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tokenmill.common.errors import DataLoss, InvalidArgument, NotFound

Layout = dict[str, list[dict[str, Any]]]  # logical name -> pieces {"key", "offsets", "shape", "global_shape"}


def piece_key(name: str, offsets: Sequence[int]) -> str:
    return f"{name}@{','.join(str(int(o)) for o in offsets)}"


def shard_info(name: str, offsets: Sequence[int], global_shape: Sequence[int]) -> dict[str, Any]:
    return {
        "logical_name": name,
        "offsets": [int(o) for o in offsets],
        "global_shape": [int(s) for s in global_shape],
    }


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


# ------------------------------------------------------------------------------------------- reading
def read_rows(io: CheckpointIO, ref: str, layout: Layout, name: str, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` (dim 0) of logical tensor ``name``, assembled from overlapping pieces."""
    pieces = layout.get(name)
    if not pieces:
        raise NotFound(f"checkpoint {ref} has no tensor {name!r}")
    gshape = pieces[0]["global_shape"]
    if not 0 <= start <= stop <= (gshape[0] if gshape else 1):
        raise InvalidArgument(f"rows [{start}, {stop}) outside {name} of shape {gshape}")
    needed = (
        [p for p in pieces if p["offsets"][0] < stop and p["offsets"][0] + p["shape"][0] > start]
        if gshape
        else pieces
    )
    loaded = io.read_pieces(ref, [p["key"] for p in needed])
    if not gshape:  # scalar
        return loaded[needed[0]["key"]].clone()
    first = loaded[needed[0]["key"]]
    out = torch.empty((stop - start, *gshape[1:]), dtype=first.dtype)
    covered = 0
    for p in needed:
        t = loaded[p["key"]]
        off = p["offsets"][0]
        lo, hi = max(start, off), min(stop, off + p["shape"][0])
        out[lo - start : hi - start] = t[lo - off : hi - off]
        covered += hi - lo
    if covered != stop - start:
        raise DataLoss(f"checkpoint {ref}: pieces of {name} cover {covered} of rows [{start}, {stop})")
    return out


def read_full(io: CheckpointIO, ref: str, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Whole logical tensors (for single-process consumers: tests, export, small models)."""
    layout = io.layout(ref)
    out = {}
    for name in names if names is not None else layout:
        g = layout[name][0]["global_shape"]
        out[name] = read_rows(io, ref, layout, name, 0, g[0] if g else 1)
    return out


# ------------------------------------------------------------------------------------ local directory
_VERSION_RE = re.compile(r"^v(\d+)$")


class LocalCheckpointIO:
    """Checkpoints as directories ``<root>/<name>/v<N>/``: one safetensors file per rank plus
    ``manifest.json``, written last and atomically (a version without it does not exist).

    Useful on a GPU box without the store (bench scripts) and for engine tests. Tags live in
    ``<root>/<name>/tags.json``; ``latest`` always names the newest version.
    """

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    # writing
    def begin(self, name, *, config, tags=(), metrics=None, lineage=None) -> str:
        if not name or "/" in name or ":" in name:
            raise InvalidArgument(f"checkpoint name {name!r} must be non-empty without '/' or ':'")
        upload_id = uuid.uuid4().hex
        d = self.root / ".uploads" / upload_id
        d.mkdir(parents=True)
        (d / "upload.json").write_text(
            json.dumps(
                {
                    "name": name,
                    "config": config,
                    "tags": list(tags),
                    "metrics": metrics or {},
                    "lineage": lineage or {},
                }
            )
        )
        return upload_id

    def _upload_dir(self, upload_id: str) -> Path:
        d = self.root / ".uploads" / upload_id
        if not (d / "upload.json").is_file():
            raise NotFound(f"upload {upload_id} not found (expired or already committed)")
        return d

    def write(self, upload_id, rank, tensors, shards, files={}) -> None:  # noqa: B006
        d = self._upload_dir(upload_id)
        plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(plain, str(d / f"rank-{rank:05d}.safetensors"))
        for fname, data in files.items():
            (d / "files").mkdir(exist_ok=True)
            (d / "files" / fname).write_bytes(data)
        index = {}
        for key, t in plain.items():
            info = shards.get(key) or shard_info(key, [0] * t.dim(), list(t.shape))
            index[key] = {**info, "shape": list(t.shape), "file": f"rank-{rank:05d}.safetensors"}
        (d / f"rank-{rank:05d}.json").write_text(json.dumps(index))

    def commit(self, upload_id: str) -> str:
        d = self._upload_dir(upload_id)
        meta = json.loads((d / "upload.json").read_text())
        layout: Layout = {}
        for idx in sorted(d.glob("rank-*.json")):
            for key, info in json.loads(idx.read_text()).items():
                layout.setdefault(info["logical_name"], []).append({"key": key, **info})
        files = sorted(p.name for p in (d / "files").iterdir()) if (d / "files").is_dir() else []
        with self._lock:
            name_dir = self.root / meta["name"]
            name_dir.mkdir(exist_ok=True)
            version = 1 + max(
                (int(m.group(1)) for p in name_dir.iterdir() if (m := _VERSION_RE.match(p.name))), default=0
            )
            manifest = {
                "name": meta["name"],
                "version": str(version),
                "created_at": time.time(),
                "config": meta["config"],
                "metrics": meta["metrics"],
                "lineage": meta["lineage"],
                "tags": meta["tags"],
                "tensors": layout,
                "files": files,
            }
            (d / "manifest.json").write_text(json.dumps(manifest))
            os.replace(d, name_dir / f"v{version}")
            tags = self._tags(meta["name"])
            for tag in [*meta["tags"], "latest"]:
                tags[tag] = str(version)
            tmp = name_dir / "tags.json.tmp"
            tmp.write_text(json.dumps(tags))
            os.replace(tmp, name_dir / "tags.json")
        return f"{meta['name']}:{version}"

    def abort(self, upload_id: str) -> None:
        shutil.rmtree(self.root / ".uploads" / upload_id, ignore_errors=True)

    # reading
    def _tags(self, name: str) -> dict[str, str]:
        p = self.root / name / "tags.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def resolve(self, ref: str) -> str | None:
        name, _, sel = ref.partition(":")
        sel = sel or "latest"
        version = sel if sel.isdigit() else self._tags(name).get(sel)
        if version is None or not (self.root / name / f"v{version}" / "manifest.json").is_file():
            return None
        return f"{name}:{version}"

    def _dir(self, ref: str) -> Path:
        resolved = self.resolve(ref)
        if resolved is None:
            raise NotFound(f"checkpoint {ref!r} not found under {self.root}")
        name, _, version = resolved.partition(":")
        return self.root / name / f"v{version}"

    def manifest(self, ref: str) -> dict[str, Any]:
        return json.loads((self._dir(ref) / "manifest.json").read_text())

    def layout(self, ref: str) -> Layout:
        return self.manifest(ref)["tensors"]

    def read_pieces(self, ref: str, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        d = self._dir(ref)
        by_key = {p["key"]: p for pieces in self.layout(ref).values() for p in pieces}
        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for k in keys:
            if k not in by_key:
                raise NotFound(f"checkpoint {ref} has no piece {k!r}")
            by_file.setdefault(by_key[k]["file"], []).append(k)
        for fname, ks in by_file.items():
            with safe_open(str(d / fname), framework="pt") as f:
                for k in ks:
                    out[k] = f.get_tensor(k)
        return out

    def read_files(self, ref: str, names: Sequence[str]) -> dict[str, bytes]:
        d = self._dir(ref) / "files"
        out = {}
        for n in names:
            if not (d / n).is_file():
                raise NotFound(f"checkpoint {ref} has no file {n!r}")
            out[n] = (d / n).read_bytes()
        return out


IoFactory = Callable[[Mapping[str, Any]], CheckpointIO]
"""Builds a CheckpointIO from a JSON spec inside each worker process (workers cannot share one)."""


def local_checkpoint_io(spec: Mapping[str, Any]) -> CheckpointIO:
    """The engine's own factory: ``{"kind": "local", "root": path}`` only. Other kinds (the checkpoint
    store) are the service's business: it passes its factory, so the engine never imports upward."""
    if spec.get("kind") != "local":
        raise InvalidArgument(
            f"checkpoint io kind {spec.get('kind')!r} needs a factory that knows it (the trainer service "
            "passes tokenmill.services.trainer.io_factory.make_checkpoint_io); this one builds only 'local'"
        )
    return LocalCheckpointIO(spec["root"])


def resolve_io_factory(factory: IoFactory | str) -> IoFactory:
    """A factory given as a callable, or as a dotted path ``"package.module:function"`` (what travels
    to worker processes that must import it themselves)."""
    if callable(factory):
        return factory
    module, sep, attr = str(factory).partition(":")
    if not sep or not module or not attr:
        raise InvalidArgument(f"io factory {factory!r}: use 'package.module:function'")
    import importlib

    fn = getattr(importlib.import_module(module), attr, None)
    if not callable(fn):
        raise InvalidArgument(f"io factory {factory!r}: {module} has no callable {attr!r}")
    return fn
