"""Sampling controls and request sizes at and past their limits (issue 11's "go at every limit").

A control at the edge of its valid range must give the distribution it names, never a NaN that
fails the step (on a replica that fails every request in flight); a default the client did not
ask for must fit the replica instead of being refused; and a property test drives the scheduler
and the block manager together the way LLMEngine.step does.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fixtures.inference import reference_greedy
from tokenmill.common.errors import InvalidArgument, ResourceExhausted
from tokenmill.common.inference import EngineConfig, SamplingParams, build_engine
from tokenmill.common.inference.async_engine import AsyncEngine
from tokenmill.common.inference.block_manager import BlockManager
from tokenmill.common.inference.llm_engine import kv_tokens
from tokenmill.common.inference.request import Request, Status
from tokenmill.common.inference.scheduler import Scheduler

GREEDY = dict(temperature=0.0, ignore_eos=True)
PROMPT = [5, 17, 42, 99, 7]


def make_engine(ckpt, **kw):
    cfg = EngineConfig(**{"num_blocks": 64, "block_size": 4, **kw})
    return build_engine(ckpt.tensors, ckpt.config_dict, cfg)


def run(eng, params: SamplingParams, prompt: list[int] = PROMPT) -> Request:
    (req,) = eng.generate([prompt], params)
    return req


@pytest.mark.parametrize("temperature", [1e-45, 1e-40])
def test_a_tiny_temperature_samples_the_greedy_tokens(tiny_ckpt, temperature):
    """The smallest positive float32 temperatures overflowed logits / temperature to inf."""
    eng = make_engine(tiny_ckpt)
    want = reference_greedy(tiny_ckpt.model, PROMPT, 6)
    for extra in (dict(), dict(top_k=3, top_p=0.5)):
        req = run(eng, SamplingParams(max_tokens=6, temperature=temperature, ignore_eos=True, **extra))
        assert req.output_token_ids == want


def test_a_tiny_repetition_penalty_does_not_fail_the_step(tiny_ckpt):
    """A penalty near 0 divided positive logits of seen tokens into +inf: NaN probabilities."""
    eng = make_engine(tiny_ckpt)
    req = run(eng, SamplingParams(max_tokens=6, temperature=1.0, seed=0, repetition_penalty=1e-45))
    assert len(req.output_token_ids) == 6


def test_an_edge_control_does_not_fail_the_other_requests_in_flight(tiny_ckpt):
    aeng = AsyncEngine(make_engine(tiny_ckpt))
    try:
        other = aeng.submit(prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=20, **GREEDY))
        edge = aeng.submit(prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=4, temperature=1e-45))
        assert len([t for o in edge for t in o.token_ids]) == 4
        assert [t for o in other for t in o.token_ids] == reference_greedy(tiny_ckpt.model, PROMPT, 20)
    finally:
        aeng.shutdown()


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_a_seed_outside_64_bits_is_invalid_argument(tiny_ckpt, seed):
    eng = make_engine(tiny_ckpt)
    with pytest.raises(InvalidArgument, match="seed must be a 64-bit integer"):
        eng.add_request(prompt_token_ids=PROMPT, params=SamplingParams(temperature=1.0, seed=seed))
    assert not eng.has_unfinished()


def test_64_bit_seeds_at_the_limits_are_served(tiny_ckpt):
    eng = make_engine(tiny_ckpt)
    for seed in (2**64 - 1, -(2**63)):
        assert len(run(eng, SamplingParams(max_tokens=3, temperature=1.0, seed=seed)).output_token_ids) == 3


def test_one_params_object_shared_by_requests_is_resolved_per_request(tiny_ckpt):
    """make_request resolved max_tokens in the caller's object: the second prompt got the first one's."""
    eng = make_engine(tiny_ckpt, num_blocks=256)
    context = tiny_ckpt.config.max_seq_len
    shared = SamplingParams(max_tokens=0, **GREEDY)
    long = eng.add_request(prompt_token_ids=[3] * (context - 4), params=shared)
    short = eng.add_request(prompt_token_ids=PROMPT, params=shared)
    assert long.params.max_tokens == 4
    assert short.params.max_tokens == min(eng.config.default_max_tokens, context - len(PROMPT))
    assert shared.max_tokens == 0


@pytest.mark.parametrize("params", [dict(max_tokens=0), dict(max_tokens=500, clamp_max_tokens=True)])
def test_a_default_max_tokens_is_fitted_to_the_kv_pool(tiny_ckpt, params):
    """15 usable blocks of 4 hold 60 tokens: a max_tokens the client did not ask for is the room the
    pool has beside the prompt (the last new token is never fed back, so it needs no slot), not a
    RESOURCE_EXHAUSTED telling it to lower what it never set."""
    eng = make_engine(tiny_ckpt, num_blocks=16)
    req = run(eng, SamplingParams(**params, **GREEDY))
    assert len(req.output_token_ids) == 60 - len(PROMPT) + 1
    assert req.output_token_ids == reference_greedy(tiny_ckpt.model, PROMPT, 60 - len(PROMPT) + 1)
    assert eng.blocks.num_free() == eng.blocks.usable_blocks


def test_a_prompt_the_pool_cannot_hold_is_refused_naming_the_prompt(tiny_ckpt):
    eng = make_engine(tiny_ckpt, num_blocks=16)
    for params in (SamplingParams(max_tokens=0), SamplingParams(max_tokens=1)):
        with pytest.raises(ResourceExhausted, match="61-token prompt alone"):
            eng.add_request(prompt_token_ids=[3] * 61, params=params)
    with pytest.raises(ResourceExhausted, match="lower max_tokens"):
        eng.add_request(prompt_token_ids=[3] * 50, params=SamplingParams(max_tokens=20))
    assert not eng.has_unfinished()


# -- the scheduler and the block manager together, driven as LLMEngine.step drives them -----------

ARRIVALS = st.lists(
    st.tuples(
        st.lists(st.integers(0, 3), min_size=1, max_size=30),  # prompt (small alphabet: shared prefixes)
        st.integers(1, 12),  # max_tokens
        st.integers(0, 6),  # arrival step
        st.booleans(),  # aborted after its first token
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(
    num_blocks=st.integers(2, 24),
    block_size=st.integers(1, 5),
    budget=st.integers(1, 20),
    max_seqs=st.integers(1, 5),
    caching=st.booleans(),
    arrivals=ARRIVALS,
)
def test_scheduler_keeps_its_bounds_and_finishes_everything_it_admits(
    num_blocks, block_size, budget, max_seqs, caching, arrivals
):
    bm = BlockManager(num_blocks, block_size, caching)
    sched = Scheduler(bm, max_num_seqs=max_seqs, max_num_batched_tokens=budget)
    pending = sorted(
        (
            (step, i, Request(f"r{i}", list(p), SamplingParams(max_tokens=n, temperature=0.0)), abort)
            for i, (p, n, step, abort) in enumerate(arrivals)
            if bm.peak_blocks(kv_tokens(len(p), n), budget) <= bm.usable_blocks  # what make_request admits
        ),
        key=lambda t: t[:2],
    )
    admitted, aborts = len(pending), {r.request_id for _, _, r, a in pending if a}
    finished, step = 0, 0
    while pending or sched.has_work():
        while pending and pending[0][0] <= step:
            sched.add(pending.pop(0)[2])
        step += 1
        assert step < 2000, "no progress"
        out = sched.schedule()
        assert out.num_tokens <= budget and len(sched.running) <= max_seqs
        assert len({it.request.request_id for it in out.items}) == len(out.items)
        for it in out.items:
            req = it.request
            assert req in sched.running and req.status is Status.RUNNING
            assert 1 <= it.num_tokens <= req.num_tokens - req.num_computed_tokens
            assert len(bm.table(req.request_id)) >= bm.blocks_for(req.num_computed_tokens + it.num_tokens)
        assert all(r.num_computed_tokens == 0 and r not in sched.running for r in out.preempted)
        bm.check_invariants()
        for it in out.items:  # the engine's side of the step
            req = it.request
            req.num_computed_tokens += it.num_tokens
            bm.commit(req.request_id, req.all_token_ids, req.num_computed_tokens, "")
            if req.num_computed_tokens == req.num_tokens:
                req.output_token_ids.append(len(req.output_token_ids) % 3)
                if len(req.output_token_ids) >= req.params.max_tokens or req.request_id in aborts:
                    sched.remove(req)
                    req.status = Status.FINISHED
                    finished += 1
        bm.check_invariants()
    assert finished == admitted
    assert bm.num_free() == bm.usable_blocks
