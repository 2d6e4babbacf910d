"""Type-check the libraries and services with mypy, under their import names (tokenmill.common.…).

mypy names a module by its folder, and `common/` and `services/` sit beside the `tokenmill` package
rather than inside it (tokenmill/__init__.py says why). So this lays out the installed shape as a tree
of symlinks under build/typecheck/ and checks that: an error at
`build/typecheck/tokenmill/common/jobs/queue.py:12` is `common/jobs/queue.py` line 12. Settings are
in pyproject.toml ([tool.mypy]).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / "build" / "typecheck"
CHECKED = ("common", "services")


def link_tree() -> Path:
    package = TREE / "tokenmill"
    shutil.rmtree(TREE, ignore_errors=True)
    package.mkdir(parents=True)
    shutil.copy(ROOT / "tokenmill" / "__init__.py", package / "__init__.py")
    (package / "v1").symlink_to(ROOT / "tokenmill" / "v1", target_is_directory=True)
    for folder in CHECKED:
        (package / folder).symlink_to(ROOT / folder, target_is_directory=True)
    return package


def main() -> int:
    package = link_tree()
    args = ["--config-file", str(ROOT / "pyproject.toml"), *(str(package / f) for f in CHECKED)]
    out, err, status = api.run(args)
    sys.stdout.write(out)
    sys.stderr.write(err)
    return status


if __name__ == "__main__":
    sys.exit(main())
