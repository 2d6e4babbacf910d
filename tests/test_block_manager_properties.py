"""Property-based tests for the paged KV block manager: a Hypothesis state machine drives
`BlockManager` the way the scheduler and engine do (admission with prefix matching, chunked
prefill, decode appends, preemption of the newest running sequence, finishing, re-admission of
preempted sequences) and checks the pool's invariants after every step.

Beyond `check_invariants()`, the machine keeps a model of what each block's KV holds, so it can
check what matters for correctness: a sequence only ever writes KV into blocks it alone holds, and
a prefix-cache hit hands out a block whose KV is exactly that prefix (never a stale, evicted one).
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tokenmill.common.inference.block_manager import NULL_BLOCK, BlockManager

MAX_TOKENS = 16  # per sequence, prompt and generated together
TOKENS = st.lists(st.integers(0, 2), min_size=1, max_size=10)  # a small alphabet: prefixes repeat
SALTS = st.sampled_from(["", "adapter-a"])

# What a full block's KV holds: the adapter and every token up to the block's end.
Content = tuple[str, tuple[int, ...]]


@dataclass
class Seq:
    """The engine's view of one request: its tokens and how many have KV in the cache."""

    seq_id: str
    tokens: list[int]
    salt: str
    computed: int = 0
    allocated_tokens: int = 0  # tokens its block table was last grown to hold


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(
        num_blocks=st.integers(3, 14),
        block_size=st.integers(1, 4),
        prefix_caching=st.booleans(),
    )
    def setup(self, num_blocks: int, block_size: int, prefix_caching: bool) -> None:
        self.bm = BlockManager(num_blocks, block_size, prefix_caching)
        self.running: list[Seq] = []  # arrival order, as the scheduler keeps it
        self.waiting: list[Seq] = []  # preempted or not yet admitted
        self.content: dict[int, Content | None] = {}  # block -> the KV it holds once full
        self.next_id = 0

    # -- helpers: what the scheduler and the model runner do ------------------------------------

    def _new_blocks(self, seq: Seq, before: int) -> None:
        """Blocks just taken from the pool hold no KV yet."""
        for b in self.bm.table(seq.seq_id)[before:]:
            self.content[b] = None

    def _compute(self, seq: Seq, n: int) -> None:
        """The runner writes KV for tokens [computed, computed + n); the engine commits."""
        table = self.bm.table(seq.seq_id)
        bs = self.bm.block_size
        for pos in range(seq.computed, seq.computed + n):
            b = table[pos // bs]
            assert b != NULL_BLOCK
            assert self.bm.ref[b] == 1, f"{seq.seq_id} writes KV into block {b} shared by others"
            if (pos + 1) % bs == 0:
                self.content[b] = (seq.salt, tuple(seq.tokens[: pos + 1]))
        seq.computed += n
        self.bm.commit(seq.seq_id, seq.tokens, seq.computed, seq.salt)

    def _check_prefix_hit(self, seq: Seq, hit: int) -> None:
        bs = self.bm.block_size
        assert hit % bs == 0 and hit < len(seq.tokens)
        for i, b in enumerate(self.bm.table(seq.seq_id)):
            assert self.content.get(b) == (seq.salt, tuple(seq.tokens[: (i + 1) * bs])), (
                f"prefix hit gave {seq.seq_id} block {b} holding {self.content.get(b)}"
            )

    def _admit(self, seq: Seq, chunk: int) -> bool:
        """Scheduler admission: match the cached prefix, then allocate the first chunk or give
        the matched blocks back (a waiting request must not sit on them)."""
        hit = self.bm.match_prefix(seq.seq_id, seq.tokens, seq.salt)
        self._check_prefix_hit(seq, hit)
        seq.computed = hit
        n = min(chunk, len(seq.tokens) - hit)
        if not self.bm.can_allocate(seq.seq_id, hit + n):
            self.bm.free_seq(seq.seq_id)
            seq.computed = 0
            return False
        self.bm.record_prefix_lookup(len(seq.tokens), hit)
        before = len(self.bm.table(seq.seq_id))
        assert self.bm.allocate(seq.seq_id, hit + n)
        seq.allocated_tokens = hit + n
        self._new_blocks(seq, before)
        self.running.append(seq)
        self._compute(seq, n)
        return True

    def _preempt(self, victim: Seq) -> None:
        self.bm.free_seq(victim.seq_id)
        victim.computed = victim.allocated_tokens = 0
        self.running.remove(victim)
        self.waiting.insert(0, victim)

    # -- rules ------------------------------------------------------------------------------

    @rule(tokens=TOKENS, salt=SALTS, chunk=st.integers(1, 8), share=st.integers(0, 20))
    def submit(self, tokens: list[int], salt: str, chunk: int, share: int) -> None:
        """A new request; `share` > 0 starts it with a running request's prompt (a fork)."""
        if share and self.running:
            parent = self.running[share % len(self.running)]
            tokens, salt = parent.tokens[: share % (len(parent.tokens) + 1)] + tokens, parent.salt
        seq = Seq(f"s{self.next_id}", tokens[:MAX_TOKENS], salt)
        self.next_id += 1
        if not self._admit(seq, chunk):
            self.waiting.append(seq)

    @precondition(lambda self: self.waiting)
    @rule(chunk=st.integers(1, 8))
    def readmit_head(self, chunk: int) -> None:
        """FIFO admission of the waiting head (preempted requests recompute from their tokens)."""
        seq = self.waiting[0]
        if self._admit(seq, chunk):
            self.waiting.pop(0)

    @precondition(lambda self: self.running)
    @rule(pick=st.integers(0, 20), chunk=st.integers(1, 8), token=st.integers(0, 2))
    def step(self, pick: int, chunk: int, token: int) -> None:
        """One scheduler step for a running request: the next prefill chunk, or one decode token.
        When the pool is short, the newest running request is preempted (possibly itself)."""
        seq = self.running[pick % len(self.running)]
        if seq.computed == len(seq.tokens):
            if len(seq.tokens) >= MAX_TOKENS:
                return
            seq.tokens.append(token)  # the sampled token; its KV is computed next
            chunk = 1
        n = min(chunk, len(seq.tokens) - seq.computed)
        before = len(self.bm.table(seq.seq_id))
        while not self.bm.allocate(seq.seq_id, seq.computed + n):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return
        seq.allocated_tokens = seq.computed + n
        self._new_blocks(seq, before)
        self._compute(seq, n)

    @precondition(lambda self: self.running)
    @rule(pick=st.integers(0, 20))
    def finish(self, pick: int) -> None:
        seq = self.running.pop(pick % len(self.running))
        self.bm.free_seq(seq.seq_id)

    @precondition(lambda self: self.running)
    @rule(pick=st.integers(0, 20))
    def preempt(self, pick: int) -> None:
        """Preemption by recompute (the engine's swap-out): blocks freed, tokens kept."""
        self._preempt(self.running[pick % len(self.running)])

    @precondition(lambda self: self.waiting)
    @rule(pick=st.integers(0, 20))
    def abort_waiting(self, pick: int) -> None:
        seq = self.waiting.pop(pick % len(self.waiting))
        self.bm.free_seq(seq.seq_id)  # holds nothing: a no-op the engine still calls

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def pool_is_consistent(self) -> None:
        bm = self.bm
        bm.check_invariants()
        used = {b for sb in bm.seqs.values() for b in sb.table}
        assert bm.num_free() + len(used) == bm.usable_blocks  # free + used = total
        assert NULL_BLOCK not in used and NULL_BLOCK not in bm.free and NULL_BLOCK not in bm.evictable
        for b in [*bm.free, *bm.evictable]:
            assert bm.ref[b] == 0

    @invariant()
    def only_running_sequences_hold_blocks(self) -> None:
        assert set(self.bm.seqs) == {s.seq_id for s in self.running}
        for seq in self.running:
            table = self.bm.table(seq.seq_id)
            assert len(table) == self.bm.blocks_for(seq.allocated_tokens)
            assert seq.computed <= seq.allocated_tokens

    @invariant()
    def prefix_cache_points_at_its_blocks(self) -> None:
        bm = self.bm
        for key, b in bm.cache.items():
            assert bm.block_key[b] == key
            assert b not in bm.free
        for b in bm.evictable:
            key = bm.block_key[b]
            assert key is not None and bm.cache.get(key) == b  # an evictable block is a cached prefix
        assert bm.prefix_hits <= bm.prefix_queries
        if not bm.enable_prefix_caching:
            assert not bm.cache and not bm.evictable

    @invariant()
    def every_sequence_sees_its_own_kv(self) -> None:
        bs = self.bm.block_size
        for seq in self.running:
            for i, b in enumerate(self.bm.table(seq.seq_id)[: seq.computed // bs]):
                assert self.content.get(b) == (seq.salt, tuple(seq.tokens[: (i + 1) * bs])), (seq.seq_id, i)


# Pure Python and quick: three times the profile's example count (tests/conftest.py).
BlockManagerMachine.TestCase.settings = settings(
    max_examples=3 * settings.default.max_examples, stateful_step_count=40
)
test_block_manager_state_machine = BlockManagerMachine.TestCase
