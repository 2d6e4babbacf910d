"""Named failpoints for crash drills and tests (the idea of etcd's gofail).

Production code marks the places where a crash matters with ``failpoints.hit("name", **context)``.
Every name is listed in ``FAILPOINTS`` below, so the drills a build supports are one read away, and a
spec naming anything else is refused rather than silently never firing.

Off unless enabled, and free when off: ``hit`` returns at its first line when no failpoint is
armed. They are armed by the ``TOKENMILL_FAILPOINTS`` environment variable (read once, at import, so
worker processes inherit it), a JSON object::

    {"checkpoint.before_manifest": {"action": "pause", "marker": "/tmp/reached"},
     "trainer.after_step": {"action": "kill", "when": {"step": 4, "rank": 1, "attempt": 1}}}

Actions: ``pause`` (write ``marker`` if given, then sleep until the test kills the process),
``kill`` (SIGKILL this process, the way an OOM killer or a node loss would), ``raise`` (raise
``FailpointError``), ``trigger`` (``hit`` returns True and the caller injects the fault itself, e.g.
a NaN loss). ``when`` fires only where every key equals the context the call site passes.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV = "TOKENMILL_FAILPOINTS"

FAILPOINTS: dict[str, str] = {
    "checkpoint.manifest_temp": "store: a manifest's temp file is written, not yet renamed into place",
    "checkpoint.before_manifest": "store: a version's chunks are stored, its manifest not yet written",
    "checkpoint.after_manifest": "store: the manifest is published, the upload session not yet closed",
    "trainer.after_step": "trainer worker: an optimizer step finished (context: step, rank, attempt)",
    "trainer.loss": "trainer worker: a step's loss is computed (trigger = make it NaN; context as above)",
    "ingest.phase_done": "ingest run: a phase finished (context: phase = filter|dedup|pack|publish)",
    "compress.after_layer": "compress worker: a linear layer is compressed (context: layer, attempt)",
    "inference.routed_taken": "replica: routed requests taken from the stream, not yet accepted (context: replica)",
}

ACTIONS = ("pause", "kill", "raise", "trigger")


class FailpointError(RuntimeError):
    """Raised by a failpoint armed with the ``raise`` action."""


@dataclass(frozen=True)
class Failpoint:
    name: str
    action: str
    marker: str = ""
    when: Mapping[str, Any] = field(default_factory=dict)

    def matches(self, context: Mapping[str, Any]) -> bool:
        return all(context.get(key) == value for key, value in self.when.items())


def parse(raw: str) -> dict[str, Failpoint]:
    """The armed failpoints from a spec string; a malformed spec raises ValueError naming the fault."""
    if not raw.strip():
        return {}
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ENV} is not JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{ENV} must be a JSON object of failpoint name -> settings")
    armed = {}
    for name, settings in spec.items():
        if name not in FAILPOINTS:
            raise ValueError(f"{ENV}: unknown failpoint {name!r}; known: {', '.join(sorted(FAILPOINTS))}")
        if not isinstance(settings, dict) or settings.get("action") not in ACTIONS:
            raise ValueError(f"{ENV}: {name} needs an 'action', one of {', '.join(ACTIONS)}")
        unknown = set(settings) - {"action", "marker", "when"}
        if unknown:
            raise ValueError(f"{ENV}: {name} has unknown settings {sorted(unknown)}")
        when = settings.get("when", {})
        if not isinstance(when, dict):
            raise ValueError(f"{ENV}: {name}.when must be an object of context key -> value")
        armed[name] = Failpoint(name, settings["action"], str(settings.get("marker", "")), when)
    return armed


_armed: dict[str, Failpoint] = parse(os.environ.get(ENV, ""))


def arm(spec: Mapping[str, Any] | None) -> None:
    """Replace the armed set in this process (tests); ``None`` or ``{}`` disarms everything."""
    global _armed
    _armed = parse(json.dumps(dict(spec or {})))


def env_value(spec: Mapping[str, Any]) -> str:
    """The ``TOKENMILL_FAILPOINTS`` value that arms ``spec`` in a child process (validated here)."""
    raw = json.dumps(dict(spec))
    parse(raw)
    return raw


def hit(name: str, **context: Any) -> bool:
    """Run the failpoint ``name`` if it is armed and its ``when`` matches; True only for ``trigger``."""
    if not _armed:
        return False
    point = _armed.get(name)
    if point is None or not point.matches(context):
        return False
    if point.action == "trigger":
        return True
    if point.action == "raise":
        raise FailpointError(f"failpoint {name} fired")
    if point.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if point.marker:
        Path(point.marker).write_text(name)
    while True:  # pause: the drill kills this process while it waits here
        time.sleep(0.05)
