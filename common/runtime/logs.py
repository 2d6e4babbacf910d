"""Structured logging for services: one JSON object per line (or readable text for local use).

Why not a library: the standard `logging` module already carries everything; a 40-line formatter
keeps services free of another dependency and puts `extra={...}` fields at the top level, which is
what log pipelines (Loki, Cloud Logging, `jq`) index.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

# The id of the RPC the current thread is serving; set by the runtime, read by log formatters
# so a handler's own log lines carry the same id as the RPC's access line and error message.
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("tokenmill_request_id", default="")

_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime", "taskName"}
)


def current_request_id() -> str:
    """The request id of the RPC being served by this thread ("" outside an RPC)."""
    return request_id_var.get()


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "msg", "service", "request_id", **extra}`; exceptions as `exc`."""

    def __init__(self, service: str = ""):
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self._service:
            out["service"] = self._service
        request_id = request_id_var.get()
        if request_id:
            out["request_id"] = request_id
        out.update(_extras(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable: `time LEVEL logger msg key=value ...`."""

    def __init__(self, service: str = ""):
        super().__init__("%(asctime)s %(levelname)-7s %(name)s %(message)s")
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _extras(record)
        request_id = request_id_var.get()
        if request_id:
            fields.setdefault("request_id", request_id)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


class _RuntimeHandler(logging.StreamHandler):
    """Marker type so `setup_logging` can replace its own handler without touching others'."""


def setup_logging(level: str = "INFO", fmt: str = "json", service: str = "") -> None:
    """Configure the root logger for a service process (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _RuntimeHandler):
            root.removeHandler(handler)
    handler = _RuntimeHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter(service))
    root.addHandler(handler)
    root.setLevel(level)
