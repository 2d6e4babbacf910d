"""The Redis key names of the job system, in one place (docs/contracts.md "Redis keys").

lua/fn_start.lua derives a job's record and event keys from the namespace the same way
(`{ns}:job:{id}`, `{ns}:job:{id}:events`): change both together.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class JobKeys:
    namespace: str = "tokenmill"

    def stream(self, job_type: str) -> str:
        """Waiting and running entries of one job type (read by the consumer group `group()`)."""
        return f"{self.namespace}:jobs:{job_type}:stream"

    def dead(self, job_type: str) -> str:
        """Dead letters: jobs that used up their attempts."""
        return f"{self.namespace}:jobs:{job_type}:dead"

    def index(self, job_type: str) -> str:
        """Sorted set of job ids by creation time, for listing."""
        return f"{self.namespace}:jobs:{job_type}:index"

    def job(self, job_id: str) -> str:
        """The job record (a hash; see `Job.from_hash`)."""
        return f"{self.namespace}:job:{job_id}"

    def events(self, job_id: str) -> str:
        """The job's event stream; its entry ids are the offsets clients resume from."""
        return f"{self.namespace}:job:{job_id}:events"

    def idem(self, job_type: str, idempotency_key: str) -> str:
        return f"{self.namespace}:idem:{job_type}:{idempotency_key}"

    @staticmethod
    def group(job_type: str) -> str:
        return f"{job_type}-workers"
