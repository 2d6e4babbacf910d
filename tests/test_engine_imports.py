"""The import rules of the layout (docs/contracts.md, "Layout"), as tests.

* Engines are libraries: importing one never pulls in the service stack (gRPC, Redis, Ray, generated
  stubs), so a GPU box with only torch can run them. Checked statically over every engine module and
  everything it imports at module level, and at runtime for the entry points in a fresh interpreter.
* Libraries (`common/`) never import services; a service imports libraries and never another service.
* No import cycles at module level.
* Everything imports as `tokenmill.…`.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("grpc", "redis", "ray", "tokenmill.v1")
ENGINE_PACKAGES = (
    "tokenmill.common.model",
    "tokenmill.common.data",
    "tokenmill.common.checkpoint",
    "tokenmill.common.ingest",
    "tokenmill.common.trainer",
    "tokenmill.common.inference",
    "tokenmill.common.eval",
    "tokenmill.common.compress",
)
# Imported at runtime in a fresh interpreter: the modules a GPU benchmark or a worker process starts from.
ENGINE_ENTRY_POINTS = (
    "tokenmill.common.model.transformer",
    "tokenmill.common.model.quant",
    "tokenmill.common.compress",
    "tokenmill.common.data.dataset",
    "tokenmill.common.trainer.worker",
    "tokenmill.common.trainer.backends.local",
    "tokenmill.common.trainer.backends.ray_backend",
    "tokenmill.common.inference",
    "tokenmill.common.ingest.pipeline",
    "tokenmill.common.checkpoint",
)


def _source_modules() -> dict[str, Path]:
    """Every module under common/ and services/, by its import name."""
    modules = {}
    for top in ("common", "services"):
        for path in (REPO / top).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(["tokenmill", *parts])] = path
    return modules


MODULES = _source_modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _module_level_imports(name: str) -> Iterator[str]:
    """Absolute names imported when `name` is imported: top-level statements, not function bodies
    (a lazy import inside a function is how an engine reaches an optional backend like Ray)."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    package = name if _is_package(name) else name.rpartition(".")[0]
    for node in _top_level(tree.body):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _top_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements run at import time, looking inside if/try blocks but skipping TYPE_CHECKING ones."""
    for node in body:
        if isinstance(node, ast.If):
            if "TYPE_CHECKING" in ast.unparse(node.test):
                yield from _top_level(node.orelse)
                continue
            yield from _top_level(node.body)
            yield from _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _top_level(block)
        else:
            yield node


@cache
def direct_deps(name: str) -> frozenset[str]:
    """Modules (ours or third-party roots) that importing `name` imports directly, parents included."""
    deps = set()
    for imported in _module_level_imports(name):
        parts = imported.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in MODULES or _is_forbidden(prefix) or not imported.startswith("tokenmill."):
                deps.add(prefix)
    deps.discard(name)
    return frozenset(deps)


def closure(name: str) -> set[str]:
    seen, stack = set(), [name]
    while stack:
        for dep in direct_deps(stack.pop()):
            if dep not in seen:
                seen.add(dep)
                if dep in MODULES:
                    stack.append(dep)
    return seen


def _is_forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def _service_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "services" else None


ENGINE_MODULES = sorted(m for m in MODULES if m.startswith(ENGINE_PACKAGES))


@pytest.mark.parametrize("module", ENGINE_MODULES)
def test_engine_module_never_imports_the_service_stack(module):
    bad = sorted(m for m in closure(module) if _is_forbidden(m))
    assert not bad, f"{module} imports (directly or through our modules) {bad}"


def test_libraries_never_import_services():
    offenders = {
        m: sorted(d for d in direct_deps(m) if d.startswith("tokenmill.services"))
        for m in MODULES
        if m.startswith("tokenmill.common")
    }
    assert not {m: d for m, d in offenders.items() if d}


def test_services_never_import_each_other():
    offenders = {}
    for module in MODULES:
        own = _service_of(module)
        if own is None:
            continue
        others = sorted(d for d in direct_deps(module) if _service_of(d) not in (None, own))
        if others:
            offenders[module] = others
    assert not offenders


def test_no_module_level_import_cycles():
    """Tarjan's strongly connected components over our module-level import graph."""
    graph = {m: [d for d in direct_deps(m) if d in MODULES and not _is_ancestor(d, m)] for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in graph[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for node in graph:
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def _is_ancestor(package: str, module: str) -> bool:
    """A package's __init__ runs before its submodules; importing a parent is not a cycle edge."""
    return module.startswith(package + ".")


def test_everything_imports_under_tokenmill():
    stray = {
        m: sorted(i for i in _module_level_imports(m) if i.split(".")[0] in ("common", "services"))
        for m in MODULES
    }
    assert not {m: i for m, i in stray.items() if i}


PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
forbidden = sys.argv[2].split(",")
print(json.dumps(sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden))))
"""


@pytest.mark.slow  # a fresh interpreter per entry point
@pytest.mark.parametrize("module", ENGINE_ENTRY_POINTS)
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
