"""Type-check the libraries and services with mypy, under their import names (tokenmill.common.…).

mypy names a module by its folder, and `common/` and `services/` sit beside the `tokenmill` package
rather than inside it (tokenmill/__init__.py says why). So this lays out the installed shape as a tree
of symlinks under build/typecheck/ and checks that from there: an error at
`tokenmill/common/jobs/queue.py:12` is `common/jobs/queue.py` line 12. Settings are in
pyproject.toml ([tool.mypy]).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / "build" / "typecheck"
CHECKED = ("common", "services")


def link_tree() -> Path:
    """Create (or reuse) the tree; idempotent, so concurrent runs do not pull it from under each other."""
    package = TREE / "tokenmill"
    package.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "tokenmill" / "__init__.py", package / "__init__.py")
    for name, target in [("v1", ROOT / "tokenmill" / "v1"), *((f, ROOT / f) for f in CHECKED)]:
        link = package / name
        if not (link.is_symlink() and link.resolve() == target):
            link.unlink(missing_ok=True)
            link.symlink_to(target, target_is_directory=True)
    return package


def main() -> int:
    link_tree()
    os.chdir(TREE)  # module names start here: tokenmill/common/jobs/queue.py is tokenmill.common.jobs.queue
    out, err, status = api.run(
        ["--config-file", str(ROOT / "pyproject.toml"), *(f"tokenmill/{f}" for f in CHECKED)]
    )
    sys.stdout.write(out)
    sys.stderr.write(err)
    return status


if __name__ == "__main__":
    sys.exit(main())
