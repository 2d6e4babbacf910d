"""Continuous batching: which requests run this step and how many tokens each computes.

Every step has a token budget shared by decodes (1 token each) and prefills (a chunk of the
prompt, so a long prompt never blocks decodes for long). Running requests go first, in arrival
order; when the pool cannot give a running request its next block, the most recently arrived
running request is preempted (its blocks freed, it recomputes later from its tokens, the prefix
cache usually making that cheap). Waiting requests are admitted FIFO while blocks, the budget and
`max_num_seqs` allow, keeping a small watermark of free blocks so admission does not immediately
cause preemption.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass

from tokenmill.common.inference.block_manager import BlockManager
from tokenmill.common.inference.request import Request, Status


@dataclass
class ScheduledItem:
    request: Request
    num_tokens: int  # tokens computed this step, starting at request.num_computed_tokens


@dataclass
class SchedulerOutput:
    items: list[ScheduledItem]
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(i.num_tokens for i in self.items)


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        watermark: float = 0.01,
    ):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.watermark_blocks = (
            max(1, int(watermark * blocks.usable_blocks)) if blocks.usable_blocks > 8 else 0
        )
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Drop a request (finished or aborted) and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(request)
        self.blocks.free_seq(request.request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, victim: Request) -> None:
        self.blocks.free_seq(victim.request_id)
        victim.num_computed_tokens = 0
        victim.status = Status.WAITING
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        items: list[ScheduledItem] = []
        preempted: list[Request] = []
        scheduled_running: list[Request] = []

        queue = list(self.running)
        while queue and budget > 0:
            req = queue.pop(0)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n <= 0:
                scheduled_running.append(req)  # nothing to compute (should not happen); keep it
                continue
            self.blocks.release_outside_window(req.request_id, req.num_computed_tokens)
            while not self.blocks.allocate(req.request_id, req.num_computed_tokens + n):
                victim = queue.pop() if queue else req
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                items.append(ScheduledItem(req, n))
                scheduled_running.append(req)
                budget -= n
        # Requests that got no budget this step stay running (in order) with their blocks.
        self.running = scheduled_running + [r for r in queue if r not in preempted]

        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                req = self.waiting[0]
                # A request scoring its prompt (echo + logprobs) needs every position's logits.
                scores = req.params.scores_prompt
                hit = (
                    0 if scores else self.blocks.match_prefix(req.request_id, req.all_token_ids, req.adapter)
                )
                req.num_computed_tokens = hit
                # A long hit may reach back past a sliding window: drop what no new query reads.
                self.blocks.release_outside_window(req.request_id, hit)
                n = min(req.num_tokens - req.num_computed_tokens, budget)
                reserve = self.watermark_blocks if self.running else 0
                if not self.blocks.can_allocate(req.request_id, req.num_computed_tokens + n, reserve):
                    # Head-of-line waits for blocks. It must not sit on its matched prefix meanwhile:
                    # waiting requests holding blocks could starve every one of them.
                    self.blocks.free_seq(req.request_id)
                    req.num_computed_tokens = 0
                    break
                if not scores:  # a scored prompt never looked the cache up: it is no miss
                    self.blocks.record_prefix_lookup(req.num_tokens, hit)
                if not req.admitted:
                    req.num_cached_tokens = hit
                    req.admitted = True
                self.blocks.allocate(req.request_id, req.num_computed_tokens + n)
                self.waiting.popleft()
                req.status = Status.RUNNING
                self.running.append(req)
                items.append(ScheduledItem(req, n))
                budget -= n
        return SchedulerOutput(items, preempted)
