"""Typed Python calls for the job system's Lua scripts (lua/*.lua): the one place KEYS/ARGV are built.

Every state change of a job is one script, so it is atomic and transitions are monotonic. The
sources are read once, at import; `JobScripts` registers them on a client (redis-py loads each
on first use and again after a SCRIPT FLUSH or a restart). Shared Lua (the prelude, and the
`start`/`finish` functions that `finish_take` combines) is prepended as listed in `_SCRIPTS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import redis

from tokenmill.common.jobs.keys import JobKeys

# script -> the lua/ files it is made of, in order
_SCRIPTS: dict[str, tuple[str, ...]] = {
    "submit": ("prelude", "submit"),
    "start": ("prelude", "fn_start", "start"),
    "update": ("prelude", "update"),
    "finish": ("prelude", "fn_finish", "finish"),
    "finish_take": ("prelude", "fn_finish", "fn_start", "finish_take"),
    "cancel": ("prelude", "cancel"),
    "reclaim": ("reclaim",),
}


def _load_sources() -> dict[str, str]:
    folder = resources.files(__package__).joinpath("lua")
    read = {name: folder.joinpath(f"{name}.lua").read_text() for parts in _SCRIPTS.values() for name in parts}
    return {script: "\n".join(read[name] for name in parts) for script, parts in _SCRIPTS.items()}


SOURCES = _load_sources()

# RETRY: re-queue the job, or dead-letter it and end it FAILED when it is out of attempts
Outcome = Literal["SUCCEEDED", "FAILED", "CANCELLED", "RETRY"]
UpdateOp = Literal["heartbeat", "progress", "log", "artifacts"]


# -- arguments ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StartRequest:
    """Who starts an attempt, and when."""

    job_type: str
    consumer: str
    now: float
    claim_nonce: str  # unique per start: a retried start after a lost reply gets its attempt back


@dataclass(frozen=True)
class FinishRequest:
    """The outcome of one attempt; refused ('fenced') unless `attempt` is the job's current one."""

    job_id: str
    job_type: str
    attempt: int
    entry: str
    now: float
    outcome: Outcome
    result: str = ""  # JSON, for SUCCEEDED
    error: str = ""


# -- replies --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Started:
    """An attempt began: this worker owns it until it finishes or its lease is taken over."""

    attempt: int
    record: dict[str, str]  # the job hash, for Job.from_hash
    entry: str


@dataclass(frozen=True)
class Dropped:
    """The entry was acknowledged and not run: its job is missing, finished or superseded
    ("skip", detail = the job's state), or out of attempts ("dead", detail = the error)."""

    kind: Literal["skip", "dead"]
    detail: str
    entry: str
    job_id: str


@dataclass(frozen=True)
class Empty:
    """No new entry was waiting."""


StartReply = Started | Dropped | Empty


@dataclass(frozen=True)
class Finished:
    """`state` is the job's state after the call; `fenced` when the outcome was refused."""

    state: str
    fenced: bool = False


@dataclass(frozen=True)
class LeaseStatus:
    alive: bool  # False: the attempt is no longer current (lease taken, or job ended)
    cancel_requested: bool


@dataclass(frozen=True)
class Reclaimed:
    cursor: str  # where the next XAUTOCLAIM scan continues ("0-0": from the start)
    entries: list[tuple[str, dict[str, str]]]  # (entry id, fields)


def _pairs(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _start_reply(raw: list[Any]) -> StartReply:
    if raw[0] == "empty":
        return Empty()
    if raw[0] == "run":
        return Started(attempt=int(raw[1]), record=_pairs(raw[2]), entry=raw[3])
    return Dropped(kind="dead" if raw[0] == "dead" else "skip", detail=raw[1], entry=raw[2], job_id=raw[3])


def _finished(raw: list[str]) -> Finished:
    return Finished(state=raw[1], fenced=True) if raw[0] == "fenced" else Finished(state=raw[0])


class JobScripts:
    """The scripts registered on one client, each behind a method with named arguments."""

    def __init__(self, redis_client: redis.Redis, keys: JobKeys):
        self.keys = keys
        self._scripts = {name: redis_client.register_script(source) for name, source in SOURCES.items()}

    def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return self._scripts[name](keys=keys, args=args)

    def submit(
        self,
        *,
        job_id: str,
        job_type: str,
        spec_json: str,
        idempotency_key: str,
        max_attempts: int,
        now: float,
    ) -> tuple[bool, str]:
        """(created, job id): False and the existing job's id when the idempotency key is taken."""
        k = self.keys
        keys = [k.job(job_id), k.stream(job_type), k.index(job_type), k.events(job_id)]
        keys.append(k.idem(job_type, idempotency_key))
        args = [
            job_id,
            repr(now),
            job_type,
            spec_json,
            idempotency_key,
            max_attempts,
            int(bool(idempotency_key)),
        ]
        created, existing = self._run("submit", keys, args)
        return created == 1, existing

    def _start(self, req: StartRequest, entry: str, job_id: str) -> StartReply:
        k = self.keys
        keys = [k.stream(req.job_type), k.dead(req.job_type)]
        args = [
            k.namespace,
            k.group(req.job_type),
            req.consumer,
            repr(req.now),
            req.claim_nonce,
            entry,
            job_id,
        ]
        return _start_reply(self._run("start", keys, args))

    def start(self, req: StartRequest, *, entry: str, job_id: str) -> Started | Dropped:
        """Start an attempt on `entry` (of job `job_id`), one this consumer has read or reclaimed."""
        if not entry:
            raise ValueError("start needs an entry; take() reads the next new one")
        reply = self._start(req, entry, job_id)
        if isinstance(reply, Empty):
            raise RuntimeError(f"start script replied 'empty' for entry {entry}")
        return reply

    def take(self, req: StartRequest) -> StartReply:
        """Read the next new entry of the stream and start an attempt on it, in one round trip."""
        return self._start(req, "", "")

    def _finish_call(self, req: FinishRequest) -> tuple[list[str], list[Any]]:
        k = self.keys
        keys = [k.job(req.job_id), k.stream(req.job_type), k.events(req.job_id), k.dead(req.job_type)]
        args = [k.group(req.job_type), req.job_id, req.attempt, req.entry, repr(req.now), req.outcome]
        return keys, [*args, req.result, req.error]

    def finish(self, req: FinishRequest) -> Finished:
        keys, args = self._finish_call(req)
        return _finished(self._run("finish", keys, args))

    def finish_and_take(self, req: FinishRequest, take: StartRequest) -> tuple[Finished, StartReply]:
        """`finish(req)`, then `take(take)`, in one round trip."""
        if take.job_type != req.job_type:
            raise ValueError("finish_and_take takes the next entry of the finished job's type")
        keys, args = self._finish_call(req)
        args += [self.keys.namespace, take.consumer, repr(take.now), take.claim_nonce]
        done, following = self._run("finish_take", keys, args)
        return _finished(done), _start_reply(following)

    def update(
        self,
        *,
        job_id: str,
        job_type: str,
        attempt: int,
        entry: str,
        consumer: str,
        now: float,
        op: UpdateOp,
        data: str = "",
        message: str = "",
    ) -> LeaseStatus:
        """Report from a running attempt; any accepted call renews its lease."""
        k = self.keys
        keys = [k.job(job_id), k.stream(job_type), k.events(job_id)]
        args = [attempt, entry, k.group(job_type), consumer, repr(now), op, data, message]
        alive, cancel = self._run("update", keys, args)
        return LeaseStatus(alive=bool(alive), cancel_requested=cancel == "1")

    def cancel(self, *, job_id: str, job_type: str, now: float, reason: str) -> str:
        """The job's state after the call ("RUNNING" = flagged for its worker), or "missing"."""
        k = self.keys
        keys = [k.job(job_id), k.stream(job_type), k.events(job_id)]
        (state,) = self._run("cancel", keys, [repr(now), reason, k.group(job_type)])
        return str(state)

    def reclaim(
        self, *, job_type: str, consumer: str, min_idle_ms: int, cursor: str, count: int
    ) -> Reclaimed:
        """Take over up to `count` entries idle for at least `min_idle_ms` (their lease expired)."""
        args = [self.keys.group(job_type), consumer, min_idle_ms, cursor, count]
        reply = self._run("reclaim", [self.keys.stream(job_type)], args)
        return Reclaimed(cursor=reply[0], entries=[(entry, _pairs(flat)) for entry, flat in reply[1:]])
