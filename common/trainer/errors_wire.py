"""Carry an exception from a worker process to the coordinator as JSON (never pickle).

A ``tokenmill.common.errors`` error keeps its class (so INVALID_ARGUMENT stays INVALID_ARGUMENT and is not
retried); anything else becomes a retryable :class:`WorkerError` with the original type and message.
"""

from __future__ import annotations

from typing import Any

from tokenmill.common import errors


class WorkerError(RuntimeError):
    """An unexpected failure inside a worker; retryable (the next attempt resumes from a checkpoint)."""


def error_to_wire(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, errors.TokenmillError):
        return {"class": type(exc).__name__, "message": exc.message}
    return {"class": "", "message": f"{type(exc).__name__}: {exc}"}


def error_from_wire(data: dict[str, Any]) -> Exception:
    cls = getattr(errors, data.get("class") or "", None)
    rank = data.get("rank")
    where = f"worker {rank}: " if rank is not None else ""
    if isinstance(cls, type) and issubclass(cls, errors.TokenmillError):
        return cls(f"{where}{data['message']}")
    return WorkerError(f"{where}{data['message']}")
