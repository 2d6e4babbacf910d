"""Metrics recorded with a committed version after the fact (e.g. evaluation results).

Why not in the manifest: a committed manifest never changes (it is cached, its bytes are the commit
record), but a version is evaluated later, and again with other suites. So each model has one
mutable document, `metrics/<name>.json` = {"versions": {"<version>": {key: value}}}, changed only by
read-merge-write under the store's metadata lock (the same rule as the tags document): a merge
replaces the keys it names and keeps the others, so recording the same values twice is a no-op.
Keys are "<namespace>/<key>", e.g. "eval/python/python_next_line/acc".

A damaged document is set aside (quarantine/, logged) and starts empty: the numbers can be
recorded again by re-running what produced them, and nothing else depends on them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tokenmill.common.checkpoint.damage import PARSE_ERRORS, describe, log, set_aside
from tokenmill.common.errors import InvalidArgument, NotFound
from tokenmill.common.storage import BlobStore

MAX_KEY = 200
MAX_PER_CALL = 1000
MAX_PER_VERSION = 10_000
_SEGMENT = re.compile(r"[A-Za-z0-9_.@+-]+")


def metrics_key(name: str) -> str:
    return f"metrics/{name}.json"


@dataclass
class MetricsDoc:
    """One model's recorded metrics, by version number."""

    versions: dict[int, dict[str, float]] = field(default_factory=dict)

    def of(self, version: int) -> dict[str, float]:
        return dict(self.versions.get(version, {}))

    def to_json(self) -> dict[str, Any]:
        return {"versions": {str(v): m for v, m in sorted(self.versions.items())}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MetricsDoc:
        return cls({int(v): {str(k): float(x) for k, x in m.items()} for v, m in d["versions"].items()})


def check_path(what: str, value: str) -> None:
    """'/'-separated segments of letters, digits and _ . @ + - (pass@1, bits_per_byte, ...)."""
    if not value or len(value) > MAX_KEY:
        raise InvalidArgument(f"{what} must be 1 to {MAX_KEY} characters, got {len(value)}")
    for segment in value.split("/"):
        if not _SEGMENT.fullmatch(segment):
            raise InvalidArgument(
                f"{what} {value!r}: use '/'-separated parts of letters, digits and _ . @ + - "
                "(e.g. 'eval/python/python_next_line/acc')"
            )


def qualified(namespace: str, values: Mapping[str, float]) -> dict[str, float]:
    """`values` under `namespace`, every key and value checked (INVALID_ARGUMENT naming the bad one)."""
    check_path("namespace", namespace)
    if not values:
        raise InvalidArgument("metrics is empty: give at least one key and value to record")
    if len(values) > MAX_PER_CALL:
        raise InvalidArgument(f"{len(values)} metrics in one call; the limit is {MAX_PER_CALL}")
    out = {}
    for key, value in values.items():
        check_path("metric key", key)
        if not math.isfinite(value):
            raise InvalidArgument(f"metric {key!r} is {value}; only finite numbers can be recorded")
        out[f"{namespace}/{key}"] = float(value)
    return out


class RecordedMetrics:
    """Reads and merges the per-model documents; callers hold the store's metadata lock to merge."""

    def __init__(self, backend: BlobStore):
        self.backend = backend

    def doc(self, name: str) -> MetricsDoc:
        key = metrics_key(name)
        try:
            raw = self.backend.get(key)
        except NotFound:
            return MetricsDoc()
        try:
            d = json.loads(raw)
            if not isinstance(d, dict):
                raise TypeError(f"expected a JSON object, found {type(d).__name__}")
            return MetricsDoc.from_json(d)
        except PARSE_ERRORS as exc:
            copy = set_aside(self.backend, key, raw)
            log.error(
                "recorded metrics of checkpoint %r %s; moved it to %s and started empty "
                "(re-run the evaluations to record them again)",
                name,
                describe(exc),
                copy,
            )
            return MetricsDoc()

    def merge(self, name: str, version: int, values: dict[str, float]) -> dict[str, float]:
        """Merge `values` (already `qualified`) into `name:version`'s metrics; returns them all."""
        doc = self.doc(name)
        merged = {**doc.of(version), **values}
        if len(merged) > MAX_PER_VERSION:
            raise InvalidArgument(
                f"'{name}:{version}' would hold {len(merged)} recorded metrics; the limit is {MAX_PER_VERSION}"
            )
        if merged != doc.of(version):
            doc.versions[version] = merged
            self._save(name, doc)
        return merged

    def drop(self, name: str, version: int) -> None:
        """Forget a deleted version's metrics (version numbers are never reused)."""
        doc = self.doc(name)
        if doc.versions.pop(version, None) is not None:
            self._save(name, doc)

    def _save(self, name: str, doc: MetricsDoc) -> None:
        self.backend.put(metrics_key(name), json.dumps(doc.to_json(), sort_keys=True).encode())
