"""`EngineStats`: the one typed snapshot of engine state that leaves the engine (like vLLM's
`SchedulerStats`). The replica's GetStats, its heartbeat, its pull capacity and the Prometheus
collector all read this, so a counter means the same thing everywhere."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class EngineStats:
    requests_running: int = 0
    requests_waiting: int = 0  # queued in the scheduler, plus submitted but not yet handed to it
    kv_cache_usage: float = 0.0  # 1.0 = every usable KV block is taken
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0  # free or evictable (a cached prefix nobody holds)
    prefix_cache_queries: int = 0  # prompt tokens looked up (counters, like vLLM's)
    prefix_cache_hits: int = 0
    preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0

    @property
    def kv_free_fraction(self) -> float:
        """Free share of the KV pool (1.0 when the pool is empty or has no blocks)."""
        return self.kv_blocks_free / self.kv_blocks_total if self.kv_blocks_total else 1.0

    def with_queued(self, queued: int) -> EngineStats:
        """These stats with `queued` more waiting requests (the async engine's not-yet-added ones)."""
        return replace(self, requests_waiting=self.requests_waiting + queued)
