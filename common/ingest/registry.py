"""The dataset registry: the ``datasets/`` directory is the source of truth (no database to drift).

A dataset exists exactly when ``datasets/<name>/manifest.json`` exists. Deleting first renames
the directory to a hidden ``.trash-`` name (atomic: the dataset disappears at once for readers
and lists), then removes the files.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from tokenmill.common.data.dataset import MANIFEST, read_manifest
from tokenmill.common.errors import InvalidArgument, NotFound
from tokenmill.common.ingest.workspace import clean_stale_temps, datasets_dir
from tokenmill.common.names import validate_name


def summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """The fields lists and tables show."""
    tokens = manifest.get("tokens", {})
    return {
        "name": manifest.get("name", ""),
        "created_at": manifest.get("created_at", 0.0),
        "documents": manifest.get("documents", 0),
        "train_tokens": tokens.get("train", 0),
        "val_tokens": tokens.get("val", 0),
        "vocab_size": manifest.get("vocab_size", 0),
        "token_dtype": manifest.get("token_dtype", ""),
        "stages": manifest.get("stages", []),
        "job_id": manifest.get("job_id", ""),
    }


class DatasetRegistry:
    def __init__(self, data_dir: str | os.PathLike[str]):
        self.root = datasets_dir(data_dir)

    def _check(self, name: str) -> Path:
        validate_name(name, what="dataset")
        return self.root / name

    def path(self, name: str) -> Path:
        path = self._check(name)
        if not (path / MANIFEST).is_file():
            raise NotFound(f"dataset {name!r} not found; list datasets with 'tokenmill data list'")
        return path

    def get(self, name: str) -> dict[str, Any]:
        return read_manifest(self.path(name))

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            d.name for d in self.root.iterdir() if not d.name.startswith(".") and (d / MANIFEST).is_file()
        )

    def list(self, page_size: int = 50, page_token: str = "") -> tuple[list[dict[str, Any]], str]:
        """Manifests by name; ``page_token`` is the last name of the previous page."""
        if page_size < 0:
            raise InvalidArgument("page_size must be >= 0")
        page_size = min(page_size or 50, 1000)
        names = [n for n in self.names() if n > page_token]
        page = names[:page_size]
        out = []
        for name in page:
            try:
                out.append(read_manifest(self.root / name))
            except NotFound:  # deleted between listing and reading
                continue
        return out, (page[-1] if len(names) > page_size else "")

    def delete(self, name: str) -> bool:
        path = self._check(name)
        if not (path / MANIFEST).is_file():
            return False
        trash = self.root / f".trash-{name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def clean(self) -> int:
        """Remove temp directories of dead runs and leftover trash; returns how many went."""
        n = len(clean_stale_temps(self.root))
        if self.root.is_dir():
            for d in self.root.iterdir():
                if d.name.startswith(".trash-"):
                    shutil.rmtree(d, ignore_errors=True)
                    n += 1
        return n
