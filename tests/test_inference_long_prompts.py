"""Prompts of every length the context allows, across chunked-prefill boundaries (issue 11 item 1).

A step made only of partial prefill chunks samples nothing; it used to index the logits with a
float32 tensor and fail every request on the replica. Greedy ids must equal a full recompute.
"""

from __future__ import annotations

import random

import pytest

from tests.fixtures.inference import (
    TinyCheckpoint,
    random_model,
    reference_greedy,
    tiny_config,
    train_tokenizer,
)
from tokenmill.common.errors import InvalidArgument
from tokenmill.common.inference import EngineConfig, SamplingParams, build_engine
from tokenmill.common.inference.async_engine import AsyncEngine

GREEDY = dict(temperature=0.0, ignore_eos=True)


def make_engine(ckpt: TinyCheckpoint, **kw):
    cfg = EngineConfig(**{"num_blocks": 512, "block_size": 4, **kw})
    return build_engine(ckpt.tensors, ckpt.config_dict, cfg)


def random_prompt(ckpt: TinyCheckpoint, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(ckpt.config.vocab_size) for _ in range(n)]


def boundary_lengths(chunk: int, context: int) -> list[int]:
    """1, 2, every multiple of `chunk` below the context ±1, and the context length - 1."""
    lengths = {1, 2, context - 1}
    for k in range(chunk, context + 1, chunk):
        lengths.update((k - 1, k, k + 1))
    return sorted(n for n in lengths if 1 <= n < context)


def expected(ckpt: TinyCheckpoint, prompt: list[int], context: int) -> tuple[int, list[int]]:
    max_new = min(3, context - len(prompt))
    return max_new, reference_greedy(ckpt.model, prompt, max_new)


@pytest.fixture(scope="module")
def long_ckpt() -> TinyCheckpoint:
    """The tiny model with a 1,024-token context: longer than the default 512-token step budget."""
    tok = train_tokenizer()
    return TinyCheckpoint(random_model(tiny_config(tok.get_vocab_size(), max_seq_len=1024)), tok)


def test_prompt_longer_than_the_default_step_budget_alone(long_ckpt):
    eng = make_engine(long_ckpt, block_size=16, num_blocks=128)  # default max_num_batched_tokens=512
    for n in (513, 1023):
        prompt = random_prompt(long_ckpt, n, seed=n)
        max_new, ref = expected(long_ckpt, prompt, 1024)
        (req,) = eng.generate([prompt], SamplingParams(max_tokens=max_new, **GREEDY))
        assert req.output_token_ids == ref, n
    eng.blocks.check_invariants()
    assert eng.blocks.num_free() == eng.blocks.usable_blocks


@pytest.mark.parametrize("chunk", [15, 16, 17])
def test_every_chunk_boundary_alone_matches_full_recompute(tiny_ckpt, chunk):
    context = tiny_ckpt.config.max_seq_len
    eng = make_engine(tiny_ckpt, max_num_batched_tokens=chunk, enable_prefix_caching=False)
    for n in boundary_lengths(chunk, context):
        prompt = random_prompt(tiny_ckpt, n, seed=n)
        max_new, ref = expected(tiny_ckpt, prompt, context)
        (req,) = eng.generate([prompt], SamplingParams(max_tokens=max_new, **GREEDY))
        assert req.output_token_ids == ref, n
        assert req.finish_reason == "length"
    eng.blocks.check_invariants()


def test_prompt_of_exactly_the_context_is_refused(tiny_ckpt):
    context = tiny_ckpt.config.max_seq_len
    eng = make_engine(tiny_ckpt)
    with pytest.raises(InvalidArgument, match="leave room for at least one new token"):
        eng.add_request(prompt_token_ids=random_prompt(tiny_ckpt, context, 0), params=SamplingParams())


def test_long_prompts_mixed_with_running_requests(tiny_ckpt):
    """Long prompts arrive while short ones decode: steps mix decodes with partial and final chunks."""
    context, chunk = tiny_ckpt.config.max_seq_len, 32
    eng = make_engine(tiny_ckpt, max_num_batched_tokens=chunk)
    short = [random_prompt(tiny_ckpt, n, seed=1000 + n) for n in (3, 7)]
    reqs = [
        eng.add_request(prompt_token_ids=p, params=SamplingParams(max_tokens=40, **GREEDY)) for p in short
    ]
    eng.step()
    eng.step()
    longs = [random_prompt(tiny_ckpt, n, seed=n) for n in (chunk - 1, chunk + 1, 3 * chunk, 150, 200)]
    for p in longs:
        max_new, _ = expected(tiny_ckpt, p, context)
        reqs.append(eng.add_request(prompt_token_ids=p, params=SamplingParams(max_tokens=max_new, **GREEDY)))
        eng.step()
    while eng.has_unfinished():
        eng.step()
    for p, r in zip(short, reqs[:2], strict=True):
        assert r.output_token_ids == reference_greedy(tiny_ckpt.model, p, 40)
    for p, r in zip(longs, reqs[2:], strict=True):
        assert r.output_token_ids == expected(tiny_ckpt, p, context)[1], len(p)
    eng.blocks.check_invariants()
    assert eng.blocks.num_free() == eng.blocks.usable_blocks


def test_long_prompt_does_not_fail_other_requests_on_the_async_engine(long_ckpt):
    """The replica's engine thread: one long prompt used to fail every in-flight request."""
    aeng = AsyncEngine(make_engine(long_ckpt, block_size=16, num_blocks=128))
    try:
        short = random_prompt(long_ckpt, 5, seed=1)
        long = random_prompt(long_ckpt, 700, seed=2)
        streams = [
            aeng.submit(prompt_token_ids=p, params=SamplingParams(max_tokens=4, **GREEDY))
            for p in (long, short)
        ]
        got = [[t for out in s for t in out.token_ids] for s in streams]
    finally:
        aeng.shutdown()
    assert got == [reference_greedy(long_ckpt.model, p, 4) for p in (long, short)]
