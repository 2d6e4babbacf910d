"""Admission with a sliding window on every layer: a request is judged by the blocks it holds at once.

Blocks behind the window are released as a sequence moves on, so a Mistral request longer than the
whole pool still fits when its window plus one prefill chunk does; a full-attention request of the
same size is still refused with RESOURCE_EXHAUSTED. A Hypothesis property checks that the bound
admission uses (`BlockManager.peak_blocks`) is never exceeded when blocks are driven the way the
scheduler drives them, and a scheduler test checks that a long prefix-cache hit reaching back past
the window does not keep a request waiting for blocks it will never read.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_model_families import BASE, hf_model
from tokenmill.common.errors import ResourceExhausted
from tokenmill.common.inference import EngineConfig, SamplingParams, build_engine
from tokenmill.common.inference.block_manager import NULL_BLOCK, BlockManager
from tokenmill.common.inference.request import Request
from tokenmill.common.inference.scheduler import Scheduler
from tokenmill.common.model.hf_layout import model_config_from_hf, read_hf_dir

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _engine(tmp_path, family: str, **overrides):
    hf = hf_model(family, **overrides)
    hf.save_pretrained(tmp_path)
    tensors, hf_cfg, _ = read_hf_dir(tmp_path)
    cfg = EngineConfig(num_blocks=12, block_size=4, max_num_batched_tokens=16, enable_prefix_caching=False)
    return hf, build_engine(tensors, model_config_from_hf(hf_cfg), cfg)


@pytest.mark.slow
def test_sliding_request_larger_than_the_pool_is_admitted_and_equals_hf(tmp_path):
    """41 + 20 tokens need 16 blocks held in full; the pool has 11. With window 8 and chunks of 16
    at most 7 are held at once, so it is admitted, runs alone without preemption and equals HF."""
    hf, engine = _engine(tmp_path, "Mistral", sliding_window=8)
    assert engine.blocks.blocks_for(61) > engine.blocks.usable_blocks
    prompt = torch.randint(0, BASE["vocab_size"], (41,), generator=torch.Generator().manual_seed(7)).tolist()
    [req] = engine.generate([prompt], SamplingParams(max_tokens=20, **GREEDY))
    assert engine.scheduler.num_preemptions == 0
    with torch.no_grad():
        want = copy.deepcopy(hf).generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)
    assert req.output_token_ids == want[0, len(prompt) :].tolist()
    engine.blocks.check_invariants()
    assert engine.blocks.num_free() == engine.blocks.usable_blocks


def test_full_attention_request_larger_than_the_pool_is_still_refused(tmp_path):
    _, engine = _engine(tmp_path, "Llama")
    with pytest.raises(ResourceExhausted, match="needs 15 KV blocks"):
        engine.add_request(prompt_token_ids=[5] * 41, params=SamplingParams(max_tokens=20, **GREEDY))
    assert not engine.has_unfinished()


def test_a_window_wider_than_the_request_needs_every_block():
    bm = BlockManager(num_blocks=40, block_size=4)
    bm.set_sliding_window(100)
    assert bm.peak_blocks(61, 16) == 16
    bm.set_sliding_window(8)
    assert bm.peak_blocks(61, 16) == 7  # keys s-7 .. s+15: 23 keys over at most 7 blocks
    assert bm.peak_blocks(61, 1) == 3


@settings(max_examples=60, deadline=None)
@given(
    total=st.integers(1, 80),
    chunk=st.integers(1, 24),
    window=st.integers(1, 30),
    block_size=st.sampled_from([1, 3, 4, 16]),
)
def test_held_blocks_never_exceed_the_admission_bound(total, chunk, window, block_size):
    bm = BlockManager(num_blocks=200, block_size=block_size, enable_prefix_caching=False)
    bm.set_sliding_window(window)
    peak = bm.peak_blocks(total, chunk)
    prompt = max(1, total // 2)
    computed = 0
    while computed < total:
        bm.release_outside_window("s", computed)  # what the scheduler does before allocating
        n = min(chunk if computed < prompt else 1, total - computed)
        assert bm.allocate("s", computed + n)
        assert sum(b != NULL_BLOCK for b in bm.table("s")) <= peak
        computed += n


def test_a_prefix_hit_past_the_window_does_not_hold_admission_back():
    """The cache holds the first 44 tokens' 11 blocks, the whole pool. A request sharing them matches
    all 11 and needs one more block for its next chunk; without releasing the 9 matched blocks
    behind the window it would wait for the pool forever."""
    bm = BlockManager(num_blocks=12, block_size=4, enable_prefix_caching=True)
    bm.set_sliding_window(8)
    tokens = list(range(48))
    assert bm.allocate("warm", 44)
    bm.commit("warm", tokens[:44], 44, "")
    bm.free_seq("warm")
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=16)
    sched.add(Request("r", tokens, SamplingParams(max_tokens=1, **GREEDY)))
    out = sched.schedule()
    assert [(i.request.request_id, i.num_tokens) for i in out.items] == [("r", 4)]
    assert out.items[0].request.num_computed_tokens == 44
    bm.check_invariants()
