"""Shared benchmark plumbing: describe the machine, print a table, write bench/results/<name>.json."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine_description() -> str:
    """CPU model and core count, plus the GPU name when torch sees one."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores"
    try:
        import torch

        if torch.cuda.is_available():
            desc += f", {torch.cuda.get_device_name(0)}"
        desc += f", torch {torch.__version__}"
    except ImportError:
        pass
    return desc


def target(value: float, goal: float, higher_is_better: bool = True) -> dict[str, Any]:
    met = value >= goal if higher_is_better else value <= goal
    return {"value": value, "goal": goal, "met": bool(met)}


def write_report(
    name: str,
    figures: dict[str, Any],
    baseline: dict[str, Any],
    ratios: dict[str, float],
    targets: dict[str, dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Print a table of every figure and write the JSON result file the docs quote."""
    report = {
        "machine": machine_description(),
        "figures": figures,
        "baseline": baseline,
        "ratios": ratios,
        "targets": targets,
        **(extra or {}),
    }
    rows = [(f"figure {k}", v) for k, v in figures.items()]
    rows += [(f"baseline {k}", v) for k, v in baseline.items()]
    rows += [(f"ratio {k}", v) for k, v in ratios.items()]
    rows += [
        (f"target {k}", f"{t['value']:.4g} vs goal {t['goal']} -> {'met' if t['met'] else 'NOT met'}")
        for k, t in targets.items()
    ]
    width = max(len(r[0]) for r in rows) if rows else 10
    print(f"== {name} on {report['machine']}")
    for label, value in rows:
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"  {label:<{width}}  {shown}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return path
