"""Where a run builds its dataset, and how the dataset becomes visible: atomically, or not at all.

Everything is written under ``datasets/.tmp-<name>-<run>/``; the manifest is written last inside it,
then the directory is renamed to ``datasets/<name>``. A dataset is visible only with its manifest,
so a killed job never leaves a half dataset registered. The temp directory records its owner
(host and pid): a restarted job (same run id) or any later run for the same name removes temp
directories whose owning process is gone.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from tokenmill.common.data.dataset import MANIFEST, write_json_atomic
from tokenmill.common.errors import AlreadyExists
from tokenmill.common.procs import pid_alive

OWNER = "owner.json"
WORK = "work"  # scratch files of the run (spill, signatures), removed before publication


def datasets_dir(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / "datasets"


def clean_stale_temps(root: Path, name: str | None = None) -> list[Path]:
    """Remove ``.tmp-*`` run directories whose owner process (on this host) is gone."""
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    prefix = f".tmp-{name}-" if name else ".tmp-"
    for d in root.iterdir():
        if not d.is_dir() or not d.name.startswith(prefix):
            continue
        try:
            owner = json.loads((d / OWNER).read_text())
        except (OSError, ValueError):
            owner = {}
        if owner.get("host") == socket.gethostname() and pid_alive(int(owner.get("pid", 0))):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def begin_run(root: Path, name: str, run_id: str) -> Path:
    """A fresh, owned temp directory for run ``run_id`` of dataset ``name`` (leftovers cleared first)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    if final.exists() and not (final / MANIFEST).exists():
        shutil.rmtree(final)  # a directory without a manifest is not a dataset (stray copy)
    clean_stale_temps(root, name)
    tmp = root / f".tmp-{name}-{run_id}"
    if tmp.exists():
        shutil.rmtree(tmp)  # our own previous attempt
    tmp.mkdir()
    (tmp / OWNER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    return tmp


def publish(tmp: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Drop the run's scratch files, write the manifest last, and rename ``tmp`` to ``final``."""
    (tmp / OWNER).unlink()
    shutil.rmtree(tmp / WORK, ignore_errors=True)
    write_json_atomic(tmp / MANIFEST, manifest)
    try:
        os.rename(tmp, final)
    except OSError:
        if (final / MANIFEST).exists():
            raise AlreadyExists(f"dataset {final.name!r} was created by another job meanwhile") from None
        raise
