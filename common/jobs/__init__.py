"""The Redis Streams job system every long operation (ingest, train, compress, generate) runs on.

Model (see docs/contracts.md "Jobs" and "Redis keys"):

* A job is a hash `tokenmill:job:{id}` plus one entry on its type's stream
  `tokenmill:jobs:{type}:stream`, read by the consumer group `{type}-workers` (keys.py).
* A worker takes an entry with XREADGROUP; the entry sits in the group's pending list (PEL) while it
  runs. The entry's PEL idle time is the lease: heartbeats reset it (XCLAIM of its own entry), and
  after `lease_seconds` without one any worker may take it over with XAUTOCLAIM.
* The hash field `attempts` is a fencing token. Starting an attempt increments it; every write a
  worker makes (progress, result, failure) names its attempt and is refused when it is not the
  current one. A worker whose lease was taken (paused, partitioned) therefore cannot overwrite the
  outcome of the attempt that replaced it: the client sees exactly one completion.
* Every state change runs in one Lua script (lua/, called through scripts.py), so transitions are
  atomic and monotonic: PENDING -> RUNNING -> SUCCEEDED | FAILED | CANCELLED, and
  RUNNING -> PENDING only when a failed attempt is re-queued. Terminal states never change.
* Each job has an event stream `tokenmill:job:{id}:events` (state, progress and log events);
  its stream IDs are the offsets clients resume from. A terminal job's stream ends with the
  terminal state event.
* Delivery is at-least-once (a crash after the work but before the result is recorded re-runs it),
  so handlers must be idempotent. Finished entries are XACKed and XDELeted, so the stream holds only
  waiting and running work (`depth()` is cheap and the stream does not grow without bound).

Modules: model (job record, states, events), keys (Redis key names), scripts (typed calls of the
Lua scripts), queue (the client side), context (a handler's view of its attempt), worker.
"""

from tokenmill.common.jobs.context import JobContext
from tokenmill.common.jobs.model import Job, JobCancelled, JobEvent, JobState, LeaseLost
from tokenmill.common.jobs.queue import JobQueue
from tokenmill.common.jobs.worker import Handler, JobWorker

__all__ = [
    "Handler",
    "Job",
    "JobCancelled",
    "JobContext",
    "JobEvent",
    "JobQueue",
    "JobState",
    "JobWorker",
    "LeaseLost",
]
