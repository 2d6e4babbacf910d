"""Engines are libraries: importing one must not pull in the service stack (gRPC, Redis, Ray,
generated stubs), so a GPU box with only torch can run them. Each import runs in a fresh
interpreter, since this test process has long since imported everything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("grpc", "redis", "ray", "tokenmill.v1")
ENGINES = (
    "tokenmill.common.model.transformer",
    "tokenmill.common.model.lora",
    "tokenmill.common.model.quant",
    "tokenmill.common.data.dataset",
    "tokenmill.common.trainer.worker",
    "tokenmill.common.trainer.backends.local",
    "tokenmill.common.trainer.backends.ray_backend",
    "tokenmill.common.inference",
    "tokenmill.common.ingest.pipeline",
    "tokenmill.common.checkpoint",
)

PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
forbidden = sys.argv[2].split(",")
print(json.dumps(sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden))))
"""


@pytest.mark.parametrize("module", ENGINES)
def test_engine_imports_without_the_service_stack(module):
    out = subprocess.run(
        [sys.executable, "-c", PROBE, module, ",".join(FORBIDDEN)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, f"importing {module} failed:\n{out.stderr[-3000:]}"
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert not loaded, f"importing {module} pulled in {loaded}"
