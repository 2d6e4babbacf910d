"""Paged KV cache bookkeeping: a fixed pool of blocks, per-sequence block tables, prefix cache.

Only *full* blocks are ever shared (their contents never change), so sharing needs no copy:
a block is ref-counted, and a sequence appending past a shared block always gets a fresh one.
A full block is keyed by a hash of its whole token prefix (parent block's hash + its own tokens +
the LoRA adapter), so equal keys mean equal KV. Freed cached blocks stay in an LRU list and are
reused by later requests until the pool needs them back (vLLM's automatic prefix caching).
Block 0 is reserved as a scratch slot for padded rows (CUDA graphs) and never handed out.
With dynamic NTK rope a key's rotation depends on its sequence's length once that passes the
model's context, so such sequences neither match nor register blocks (`limit_prefix_cache`).
When every layer attends only to a sliding window, blocks that fell wholly out of the window are
released as the sequence moves on (`set_sliding_window`); their table entries become NULL_BLOCK.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

NULL_BLOCK = 0


def block_hash(parent: bytes, tokens: Sequence[int], salt: str) -> bytes:
    """A collision-resistant key for one full block (prefix-cache correctness depends on it)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(salt.encode())
    h.update(array("q", tokens).tobytes())
    return h.digest()


@dataclass
class SeqBlocks:
    """A sequence's block table plus the hashes of its full blocks (for registration)."""

    table: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # hashes[i] for full block i once registered/computed
    cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.block_key: list[bytes | None] = [None] * num_blocks
        self.free: deque[int] = deque(range(1, num_blocks))  # never-cached / evicted blocks
        self.evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 but still holding a cached prefix
        self.cache: dict[bytes, int] = {}
        self.seqs: dict[str, SeqBlocks] = {}
        self.prefix_queries = 0  # tokens looked up (vLLM counts tokens)
        self.prefix_hits = 0
        self.max_cached_seq_len: int | None = None  # see limit_prefix_cache
        self.sliding_window: int | None = None  # see set_sliding_window

    def limit_prefix_cache(self, max_seq_len: int | None) -> None:
        """Share blocks only among sequences of at most `max_seq_len` tokens: beyond it the KV of
        every position depends on the sequence length (dynamic NTK rope), not on the tokens alone."""
        self.max_cached_seq_len = max_seq_len

    def set_sliding_window(self, window: int | None) -> None:
        """Every layer attends to at most `window` keys: a query at position p reads positions above
        p - window only, so blocks below that are released (`release_outside_window`)."""
        self.sliding_window = window

    def _cacheable(self, tokens: Sequence[int]) -> bool:
        return self.enable_prefix_caching and (
            self.max_cached_seq_len is None or len(tokens) <= self.max_cached_seq_len
        )

    # ------------------------------------------------------------------ capacity

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    def usage(self) -> float:
        return 1.0 - self.num_free() / self.usable_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def peak_blocks(self, num_tokens: int, max_chunk: int) -> int:
        """The most blocks a sequence of `num_tokens` computed `max_chunk` or fewer tokens per step
        holds at once. With a sliding window a step computing [s, s+n) holds only the blocks from the
        one with key s-window+1 to the one with key s+n-1 (see release_outside_window): a span of
        window-1+n keys, which may straddle one more block boundary than its length needs."""
        full = self.blocks_for(num_tokens)
        if self.sliding_window is None:
            return full
        span = self.sliding_window - 1 + min(max_chunk, num_tokens)
        return min(full, self.blocks_for(span) + 1)

    # ------------------------------------------------------------------ raw pool

    def _take(self) -> int:
        if self.free:
            b = self.free.popleft()
        else:
            b, _ = self.evictable.popitem(last=False)  # LRU
            key = self.block_key[b]
            if key is not None and self.cache.get(key) == b:
                del self.cache[key]
            self.block_key[b] = None
        self.ref[b] = 1
        return b

    def _release(self, b: int) -> None:
        self.ref[b] -= 1
        if self.ref[b] > 0:
            return
        key = self.block_key[b]
        if key is not None and self.cache.get(key) == b:
            self.evictable[b] = None  # most recently used at the end
        else:
            self.block_key[b] = None
            self.free.append(b)

    # ------------------------------------------------------------------ sequences

    def _hashes(self, tokens: Sequence[int], n_full: int, salt: str, known: list[bytes]) -> list[bytes]:
        out = list(known[:n_full])
        parent = out[-1] if out else b""
        bs = self.block_size
        for i in range(len(out), n_full):
            parent = block_hash(parent, tokens[i * bs : (i + 1) * bs], salt)
            out.append(parent)
        return out

    def match_prefix(self, seq_id: str, tokens: Sequence[int], salt: str) -> int:
        """Attach cached blocks for the longest cached prefix; returns the number of tokens reused.

        At least one token is always left to compute: the last position's logits are needed.
        """
        sb = self.seqs.setdefault(seq_id, SeqBlocks())
        if sb.table:
            raise RuntimeError(f"sequence {seq_id} already has blocks")
        if not self._cacheable(tokens):
            return 0
        n_full = (len(tokens) - 1) // self.block_size
        hashes = self._hashes(tokens, n_full, salt, [])
        for h in hashes:
            b = self.cache.get(h)
            if b is None:
                break
            if self.ref[b] == 0:
                self.evictable.pop(b, None)
            self.ref[b] += 1
            sb.table.append(b)
            sb.hashes.append(h)
        hit = len(sb.table) * self.block_size
        sb.cached_tokens = hit
        return hit

    def record_prefix_lookup(self, queried: int, hit: int) -> None:
        """Count an admitted request's lookup (tokens, as vLLM's prefix_cache_queries/hits do)."""
        if self.enable_prefix_caching:
            self.prefix_queries += queried
            self.prefix_hits += hit

    def can_allocate(self, seq_id: str, total_tokens: int, reserve: int = 0) -> bool:
        sb = self.seqs.get(seq_id)
        have = len(sb.table) if sb else 0
        return self.blocks_for(total_tokens) - have <= self.num_free() - reserve

    def allocate(self, seq_id: str, total_tokens: int) -> bool:
        """Grow the table to hold `total_tokens`; False (and nothing taken) when the pool is short."""
        sb = self.seqs.setdefault(seq_id, SeqBlocks())
        need = self.blocks_for(total_tokens) - len(sb.table)
        if need > self.num_free():
            return False
        for _ in range(need):
            sb.table.append(self._take())
        return True

    def release_outside_window(self, seq_id: str, next_pos: int) -> None:
        """Release the blocks no query at or after `next_pos` can read (with a sliding window); their
        KV, if registered in the prefix cache, stays there until the pool needs the block back."""
        sb = self.seqs.get(seq_id)
        if self.sliding_window is None or sb is None:
            return
        dead = min(max(0, next_pos - self.sliding_window + 1) // self.block_size, len(sb.table))
        for i in range(dead):
            if sb.table[i] != NULL_BLOCK:
                self._release(sb.table[i])
                sb.table[i] = NULL_BLOCK

    def commit(self, seq_id: str, tokens: Sequence[int], num_computed: int, salt: str) -> None:
        """Register newly completed full blocks in the prefix cache (their KV is now written)."""
        if not self._cacheable(tokens):
            return
        sb = self.seqs[seq_id]
        n_full = num_computed // self.block_size
        if n_full <= len(sb.hashes):
            return
        start = len(sb.hashes)
        sb.hashes = self._hashes(tokens, n_full, salt, sb.hashes)
        for i in range(start, n_full):
            h, b = sb.hashes[i], sb.table[i]
            if h not in self.cache and b != NULL_BLOCK:
                self.cache[h] = b
                self.block_key[b] = h
            # else: another sequence computed the same block first; ours stays private.

    def free_seq(self, seq_id: str) -> None:
        sb = self.seqs.pop(seq_id, None)
        if sb is None:
            return
        # Release tail first so the prefix's head blocks are the most recently used (evicted last).
        for b in reversed(sb.table):
            if b != NULL_BLOCK:  # released out of a sliding window
                self._release(b)

    def table(self, seq_id: str) -> list[int]:
        return self.seqs[seq_id].table

    def cached_tokens(self, seq_id: str) -> int:
        sb = self.seqs.get(seq_id)
        return sb.cached_tokens if sb else 0

    def check_invariants(self) -> None:
        """Every block is exactly one of: referenced, free, evictable (used by tests)."""
        referenced = {b for sb in self.seqs.values() for b in sb.table} - {NULL_BLOCK}
        free, evict = set(self.free), set(self.evictable)
        assert not (free & evict) and not (referenced & free) and not (referenced & evict)
        assert len(referenced) + len(free) + len(evict) == self.usable_blocks, (
            len(referenced),
            len(free),
            len(evict),
        )
        for b in range(1, self.num_blocks):
            assert self.ref[b] == sum(sb.table.count(b) for sb in self.seqs.values())
