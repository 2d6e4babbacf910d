"""What `pip install .` puts on a machine: one top-level package, `tokenmill`, with the CLI under it.

The wheel is built from this checkout and installed (without dependencies, which this test
interpreter already has) into an empty target folder; the checks run from a folder outside the
checkout, so nothing can be imported from the source tree by accident.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _source_copy(dest: Path) -> Path:
    """The files a fresh clone has (tracked or not ignored): building in the checkout itself would
    reuse its build/ folder, where files deleted from the source linger and end up in the wheel."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        source = REPO / rel
        if source.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / rel)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    source = _source_copy(tmp_path_factory.mktemp("src"))
    pip_wheel = ["pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)]
    subprocess.run([sys.executable, "-m", *pip_wheel], check=True, timeout=300, cwd=out)
    (built,) = out.glob("tokenmill-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
    )
    return target


def _run(installed: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(installed)}
    return subprocess.run(
        [sys.executable, *args], cwd=installed.parent, env=env, capture_output=True, text=True, timeout=120
    )


def test_wheel_has_one_top_level_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"tokenmill"}
    for expected in (
        "tokenmill/common/jobs/__init__.py",
        "tokenmill/services/inference/server.py",
        "tokenmill/v1/inference_pb2.py",
        "tokenmill/common/cli/main.py",
    ):
        assert expected in names
    assert any(n.startswith("tokenmill/common/jobs/lua/") and n.endswith(".lua") for n in names)


def test_installed_package_imports_only_as_tokenmill(installed: Path) -> None:
    probe = (
        "import importlib.util, tokenmill.common.inference, tokenmill.services.trainer.server;"
        "print(importlib.util.find_spec('common'), importlib.util.find_spec('services'),"
        " tokenmill.common.inference.__file__)"
    )
    out = _run(installed, "-c", probe)
    assert out.returncode == 0, out.stderr[-2000:]
    common, services, engine_file = out.stdout.split()
    assert (common, services) == ("None", "None")
    assert Path(engine_file).is_relative_to(installed)


def test_installed_cli_entry_point(installed: Path) -> None:
    script = installed / "bin" / "tokenmill"
    assert script.is_file()
    out = _run(installed, str(script), "--help")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Usage: tokenmill" in out.stdout
