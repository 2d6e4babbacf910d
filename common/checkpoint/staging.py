"""The staging directory: where same-host clients write upload chunks for the store to adopt.

`staging/<upload_id>/` belongs to one open upload; it goes when the upload is committed or
aborted, and a sweep (on open and at GC) removes the ones whose upload is gone, such as those a
killed client left. Only a backend with the `LocalFiles` capability has one; on any other every
method here is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from tokenmill.common.checkpoint.format import STAGING_PREFIX, staging_key
from tokenmill.common.checkpoint.state import StoreState
from tokenmill.common.errors import FailedPrecondition, InvalidArgument
from tokenmill.common.storage import LocalFiles, remove_path


class StagingArea:
    def __init__(self, state: StoreState):
        self.files: LocalFiles | None = state.files
        self.url = state.backend.url

    def require_files(self) -> LocalFiles:
        """The backend's files; FAILED_PRECONDITION (use UploadChunks) when it has none."""
        if self.files is None:
            raise FailedPrecondition(
                f"the store {self.url} is not a local directory, so nothing can be staged in it; "
                "send the chunks with UploadChunks"
            )
        return self.files

    def _base(self, files: LocalFiles) -> Path:
        return files.path(STAGING_PREFIX.rstrip("/"))

    def create(self) -> None:
        """Make `staging/`; clients add one directory per upload under it."""
        if self.files is not None:
            self._base(self.files).mkdir(exist_ok=True)

    def open_dir(self, upload_id: str) -> int:
        """An O_NOFOLLOW directory fd of the upload's staging directory (the caller closes it).

        Why a descriptor: every later open and rename is relative to it, so a symlink swapped in
        for the directory's path cannot redirect them."""
        files = self.require_files()
        staging = files.path(staging_key(upload_id))
        try:
            return os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise FailedPrecondition(
                f"upload {upload_id} has no staging directory {staging}: write the chunks there first "
                "(or send them with UploadChunks)"
            ) from None
        except OSError as exc:  # a symlink (ELOOP) or a file (ENOTDIR) where the directory belongs
            files.remove_tree(staging_key(upload_id))
            raise InvalidArgument(
                f"upload {upload_id}: {staging} is not a plain directory ({exc.strerror}); it was "
                "removed, stage the chunks again"
            ) from None

    def remove(self, upload_id: str) -> None:
        """Drop one upload's staging directory (chunks staged twice or deduplicated meanwhile)."""
        if self.files is not None and len(upload_id) == 32:
            with contextlib.suppress(InvalidArgument, OSError):
                self.files.remove_tree(staging_key(upload_id))

    def sweep(self, is_open: Callable[[str], bool], *, dry_run: bool) -> int:
        """Remove staging directories whose upload is not open (committed, aborted, expired or
        never begun); returns how many there were."""
        if self.files is None:
            return 0
        base = self._base(self.files)
        try:
            names = sorted(os.listdir(base))
        except (FileNotFoundError, NotADirectoryError):
            return 0
        doomed = []
        for upload_id in names:
            try:
                staging_key(upload_id)
            except InvalidArgument:
                doomed.append(upload_id)  # nothing a client may create
                continue
            if not is_open(upload_id):
                doomed.append(upload_id)
        if not dry_run:
            for upload_id in doomed:
                remove_path(base / upload_id)
        return len(doomed)
