"""Finishing what a crash interrupted, run each time a store opens.

A version exists exactly when its manifest exists, and the manifest is published only after every
chunk it names is durable, so a crash leaves the old state or the new one. What can be left
undone is bookkeeping after the manifest: the commit's tags (re-applied from the manifest, which
records them, for every version past the tags document's `applied_through`), the closing of its
upload session, temp files of interrupted writes, and staging directories of gone uploads.

Damage never stops recovery: a damaged manifest quarantines its version only (catalog.py), a
damaged tags document is rebuilt, and a damaged upload session is set aside (uploads.py).
"""

from __future__ import annotations

from tokenmill.common.checkpoint.catalog import Catalog
from tokenmill.common.checkpoint.records import UPLOADS, upload_id_of
from tokenmill.common.checkpoint.staging import StagingArea
from tokenmill.common.checkpoint.state import StoreState
from tokenmill.common.checkpoint.uploads import Uploads


def recover(state: StoreState, catalog: Catalog, uploads: Uploads, staging: StagingArea) -> None:
    """Apply pending commit tags, settle committed sessions, drop leftovers of interrupted writes."""
    state.backend.remove_stale_temps()
    committed = _apply_pending_tags(catalog)
    for key in list(state.backend.list(UPLOADS)):
        upload_id = upload_id_of(key)
        if upload_id in committed:
            session = uploads.load_session(upload_id)
            if session is not None:
                uploads.settle(session, committed[upload_id])
    staging.sweep(uploads.is_open, dry_run=False)


def _apply_pending_tags(catalog: Catalog) -> dict[str, str]:
    """Re-apply the commit tags of versions newer than each tags document's mark; returns the
    upload id -> ref of every committed version (their sessions may still be open)."""
    committed: dict[str, str] = {}
    for name in catalog.model_names():
        doc = catalog.tags(name)
        changed = False
        for version in catalog.version_numbers(name):
            rec = catalog.load_or_none(name, version)  # damaged: quarantined, logged, skipped
            if rec is not None and rec.upload_id:
                committed[rec.upload_id] = rec.ref
            if version > doc.applied_through:
                for tag in rec.commit_tags if rec is not None else []:
                    doc.tags[tag] = version
                doc.applied_through = version  # past a damaged version too: its number stays used
                changed = True
        if changed:
            catalog.save_tags(name, doc)
    return committed
