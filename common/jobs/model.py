"""The job record, its states and its events, as clients and workers see them.

A job is stored as a sparse hash (absent fields read as empty/default) and its history as a
stream of events; `Job.from_hash` and `JobEvent.from_entry` are the one place either is parsed.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

from tokenmill.common import errors


class JobState(enum.Enum):
    """Values equal the proto enum names without the `JOB_STATE_` prefix.

    PENDING -> RUNNING -> SUCCEEDED | FAILED | CANCELLED, and RUNNING -> PENDING only when a
    failed attempt is re-queued. Terminal states never change."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class JobCancelled(errors.Cancelled):
    """Raised by `JobContext.raise_if_cancelled`; the worker ends the job CANCELLED."""


class LeaseLost(errors.Aborted):
    """This attempt's lease was taken over by another worker; stop and drop the result."""


@dataclass
class Job:
    id: str
    type: str
    state: JobState
    spec: dict[str, Any]
    idempotency_key: str = ""
    attempts: int = 0
    max_attempts: int = 3
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    result: dict[str, Any] | None = None
    error: str = ""
    cancel_requested: bool = False
    progress: dict[str, Any] = field(default_factory=dict)
    worker: str = ""
    artifacts: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Job:
        def opt_float(name: str) -> float | None:
            return float(h[name]) if h.get(name) else None

        return cls(
            id=h["id"],
            type=h["type"],
            state=JobState(h["state"]),
            spec=json.loads(h.get("spec") or "{}"),
            idempotency_key=h.get("idem", ""),
            attempts=int(h.get("attempts") or 0),
            max_attempts=int(h.get("max_attempts") or 1),
            created_at=float(h.get("created_at") or 0),
            started_at=opt_float("started_at"),
            finished_at=opt_float("finished_at"),
            result=json.loads(h["result"]) if h.get("result") else None,
            error=h.get("error", ""),
            cancel_requested=h.get("cancel") == "1",
            progress=json.loads(h.get("progress") or "{}"),
            worker=h.get("worker", ""),
            artifacts=json.loads(h.get("artifacts") or "[]"),
        )


@dataclass
class JobEvent:
    offset: str
    job_id: str
    time: float
    kind: str  # "state" | "progress" | "log"
    state: JobState
    data: dict[str, Any]
    message: str

    @property
    def terminal(self) -> bool:
        return self.kind == "state" and self.state.terminal

    @classmethod
    def from_entry(cls, job_id: str, offset: str, f: dict[str, str]) -> JobEvent:
        """An event from its stream entry (id `offset`, fields `f`)."""
        return cls(
            offset=offset,
            job_id=job_id,
            time=float(f.get("time") or 0),
            kind=f.get("kind", "log"),
            state=JobState(f.get("state", "PENDING")),
            data=json.loads(f.get("data") or "{}"),
            message=f.get("message", ""),
        )
