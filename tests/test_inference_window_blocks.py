"""KV blocks that fall wholly out of a sliding window are released (models whose every layer slides).

A Hypothesis property drives `BlockManager` the way the scheduler does (chunked prefill, decode
appends, prefix-cache commits, finishing) with a window set, and checks after every step that
every block a later query can still read is held, that every block none can read is released, and
that the pool's invariants hold. The engine test serves more long Mistral sequences than the pool
could hold without the release, with no preemption, and greedy ids equal to HF's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_model_families import BASE, hf_model
from tokenmill.common.inference import EngineConfig, SamplingParams, build_engine
from tokenmill.common.inference.block_manager import NULL_BLOCK, BlockManager
from tokenmill.common.model.hf_layout import model_config_from_hf, read_hf_dir

# Per sequence: (prompt length, chunk sizes drawn from, tokens to generate).
SEQS = st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12), st.integers(0, 30)), min_size=1, max_size=4)


def _check_window(bm: BlockManager, seq_id: str, next_pos: int, window: int) -> None:
    """Blocks below the first key a query at `next_pos` or later reads are NULL; the rest are held."""
    table = bm.table(seq_id)
    first_live = max(0, next_pos - window + 1) // bm.block_size
    assert all(b == NULL_BLOCK for b in table[:first_live]), table
    assert all(b != NULL_BLOCK and bm.ref[b] > 0 for b in table[first_live:]), table


@settings(max_examples=60, deadline=None)
@given(
    seqs=SEQS,
    window=st.integers(1, 20),
    block_size=st.sampled_from([1, 3, 4]),
    caching=st.booleans(),
)
def test_blocks_out_of_the_window_are_released_and_live_ones_kept(seqs, window, block_size, caching):
    bm = BlockManager(num_blocks=400, block_size=block_size, enable_prefix_caching=caching)
    bm.set_sliding_window(window)
    for i, (prompt, chunk, new) in enumerate(seqs):
        sid = f"s{i}"
        tokens = [t % 3 for t in range(prompt + new)]  # repeating: prefixes are shared across seqs
        computed = bm.match_prefix(sid, tokens[:prompt], "")
        while computed < len(tokens):
            bm.release_outside_window(sid, computed)  # what the scheduler does before allocating
            n = min(chunk if computed < prompt else 1, len(tokens) - computed)
            assert bm.allocate(sid, computed + n)
            _check_window(bm, sid, computed, window)
            computed += n
            bm.commit(sid, tokens[:computed], computed, "")
            bm.check_invariants()
        held = sum(b != NULL_BLOCK for b in bm.table(sid))
        assert held <= -(-window // block_size) + 1 + -(-chunk // block_size)
    for i in range(len(seqs)):
        bm.free_seq(f"s{i}")
    bm.check_invariants()
    assert bm.num_free() == bm.usable_blocks


def test_without_a_window_nothing_is_released():
    bm = BlockManager(num_blocks=20, block_size=4)
    assert bm.allocate("s", 40)
    bm.release_outside_window("s", 39)
    assert NULL_BLOCK not in bm.table("s")


@pytest.mark.slow
def test_engine_serves_past_the_pool_with_a_window_and_equals_hf(tmp_path):
    """Five 61-token Mistral sequences (window 8, blocks of 4) need 80 blocks held in full; the pool
    has 39. Released blocks let them all run together without preemption, and ids equal HF's."""
    hf = hf_model("Mistral", sliding_window=8)
    hf.save_pretrained(tmp_path)
    tensors, hf_cfg, _ = read_hf_dir(tmp_path)
    cfg = EngineConfig(num_blocks=40, block_size=4, max_num_batched_tokens=64, enable_prefix_caching=False)
    engine = build_engine(tensors, model_config_from_hf(hf_cfg), cfg)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, BASE["vocab_size"], (41,), generator=gen).tolist() for _ in range(5)]
    done = engine.generate(prompts, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    assert engine.scheduler.num_preemptions == 0
    for prompt, req in zip(prompts, done, strict=True):
        with torch.no_grad():
            g = copy.deepcopy(hf).generate(
                torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None
            )
        assert req.output_token_ids == g[0, len(prompt) :].tolist()
    engine.blocks.check_invariants()
    assert engine.blocks.num_free() == engine.blocks.usable_blocks
