"""The ingest pipeline's entry points: ``preflight`` (what the RPC rejects before queueing a job) and
``run_ingest`` (one whole run: sources -> filters -> dedup -> tokenizer -> packed shards -> manifest).

A run is four phases over one ``RunState`` (``tokenmill.common.ingest.phases``), built in a temp
directory that is published atomically or removed (``tokenmill.common.ingest.workspace``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from tokenmill.common import failpoints
from tokenmill.common.data.dataset import MANIFEST
from tokenmill.common.errors import AlreadyExists, FailedPrecondition
from tokenmill.common.ingest import phases, workspace
from tokenmill.common.ingest.run_state import Progress, ProgressFn, RunState
from tokenmill.common.ingest.sources import validate_sources
from tokenmill.common.ingest.spec import IngestSpec
from tokenmill.common.ingest.tokenizer import resolve_tokenizer
from tokenmill.common.inputs import check_input_allowed


def check_input_locations(spec: IngestSpec, input_roots: Sequence[str]) -> None:
    """Only the `input_roots` checks of `preflight` (sources and a tokenizer file): cheap, and valid
    even when the rest of preflight is skipped (an idempotent resubmit of a finished job)."""
    for src in spec.sources:
        check_input_allowed(src, input_roots, what="source")
    if spec.tokenizer and not spec.tokenizer.startswith("dataset:"):
        check_input_allowed(spec.tokenizer, input_roots, what="tokenizer")


def preflight(spec: IngestSpec, data_dir: str | os.PathLike[str], input_roots: Sequence[str] = ()) -> None:
    """Everything that can be rejected before a job is queued (the RPC calls this).

    `input_roots` (config.input_roots) limits where sources and a tokenizer file may be read from."""
    spec.validate()
    if spec.dedup_backend == "ray" and importlib.util.find_spec("ray") is None:
        raise FailedPrecondition(
            "dedup_backend 'ray' needs Ray on the ingest service (pip install 'tokenmill[ray]'); "
            "use dedup_backend 'local' or install it"
        )
    validate_sources(spec.sources, input_roots)
    root = workspace.datasets_dir(data_dir)
    if (root / spec.name / MANIFEST).is_file():
        raise AlreadyExists(
            f"dataset {spec.name!r} already exists; delete it first ('tokenmill data delete {spec.name}') "
            "or choose another name"
        )
    resolve_tokenizer(spec.tokenizer, root, input_roots)


def run_ingest(
    spec: IngestSpec,
    data_dir: str | os.PathLike[str],
    *,
    run_id: str = "",
    job_id: str = "",
    progress: ProgressFn | None = None,
    check_cancel: Callable[[], None] | None = None,
    input_roots: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the whole pipeline and publish ``datasets/<name>``; returns the manifest.

    ``check_cancel`` raises to stop the run (it is called between batches of every phase); a stopped
    or failed run leaves nothing behind."""
    preflight(spec, data_dir, input_roots)
    root = workspace.datasets_dir(data_dir)
    run_id = run_id or job_id or uuid.uuid4().hex[:12]
    tmp = workspace.begin_run(root, spec.name, run_id)
    try:
        state = RunState.create(
            spec,
            tmp,
            root,
            run_id=run_id,
            job_id=job_id,
            progress=Progress(progress),
            check_cancel=check_cancel or (lambda: None),
            input_roots=input_roots,
        )
        phases.read_and_filter(state)
        failpoints.hit("ingest.phase_done", phase="filter")
        phases.near_dedup(state)
        failpoints.hit("ingest.phase_done", phase="dedup")
        phases.tokenize_and_pack(state)
        failpoints.hit("ingest.phase_done", phase="pack")
        manifest = phases.publish(state)
        failpoints.hit("ingest.phase_done", phase="publish")
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
