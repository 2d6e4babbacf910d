"""Sampling controls and logprobs in the engine, against a model and tokenizer saved by transformers:
OpenAI penalties and logit_bias, seeds, top logprobs, and prompt scoring (echo) under chunked
prefill, the prefix cache and preemption, each compared with HF's own logits."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.hf_chat import HfChat, save_hf_chat
from tokenmill.common import errors
from tokenmill.common.inference import EngineConfig, SamplingParams, Tokenizer, build_engine
from tokenmill.common.inference.request import Request
from tokenmill.common.inference.sampler import apply_penalties
from tokenmill.common.model.hf_layout import model_config_from_hf, read_hf_dir

pytest.importorskip("transformers")

PROMPT = "The quick brown fox jumps over"


def engine_for(hf: HfChat, **engine_kwargs):
    tensors, config, files = read_hf_dir(hf.path)
    cfg = EngineConfig(**{"num_blocks": 128, "block_size": 4, **engine_kwargs})
    return build_engine(tensors, model_config_from_hf(config), cfg, Tokenizer.from_files(files))


@pytest.fixture(scope="module")
def engine(hf_chat):
    return engine_for(hf_chat)


def run(engine, prompt, **params):
    kw = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": prompt}
    req = engine.add_request(params=SamplingParams(**params), **kw)
    outputs = []
    while engine.has_unfinished():
        outputs += [o for o in engine.step() if o.request_id == req.request_id]
    return req, outputs


def test_greedy_top_logprobs_equal_hf(engine, hf_chat):
    ids = hf_chat.encode(PROMPT)
    req, outs = run(engine, PROMPT, max_tokens=6, temperature=0.0, ignore_eos=True, top_logprobs=3)
    assert req.prompt_token_ids == ids and req.output_token_ids == hf_chat.greedy(ids, 6)
    ref = hf_chat.logprobs(ids + req.output_token_ids[:-1])[len(ids) - 1 :]
    for k, out in enumerate(outs):
        (tok,) = out.token_ids
        assert out.logprobs[0] == pytest.approx(ref[k, tok].item(), abs=1e-4)
        top = torch.topk(ref[k], 3)
        assert [t for t, _, _ in out.top_logprobs[0]] == top.indices.tolist()
        assert [lp for _, lp, _ in out.top_logprobs[0]] == pytest.approx(top.values.tolist(), abs=1e-4)
        # a token that is a piece of a character is OpenAI's "bytes:\\xNN..." rather than U+FFFD
        text = hf_chat.tokenizer.decode([tok])
        assert out.tokens == [text] if "\ufffd" not in text else out.tokens[0].startswith("bytes:")


def hf_penalised_greedy(hf: HfChat, ids: list[int], n: int, freq: float, pres: float) -> list[int]:
    """OpenAI's penalties over the generated tokens, applied to HF's logits step by step."""
    out: list[int] = []
    for _ in range(n):
        logits = hf.logprobs(ids + out)[-1]  # log-softmax differs from logits by a constant per row
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
        logits = logits - freq * counts - pres * (counts > 0).float()
        out.append(int(logits.argmax()))
    return out


@pytest.mark.parametrize(("freq", "pres"), [(2.0, 0.0), (0.0, 2.0), (0.7, 1.1)])
def test_frequency_and_presence_penalties_follow_openai(engine, hf_chat, freq, pres):
    ids = hf_chat.encode(PROMPT)
    plain = hf_chat.greedy(ids, 24)
    want = hf_penalised_greedy(hf_chat, ids, 24, freq, pres)
    assert want != plain  # the penalty changes this path, so the test can tell
    req, _ = run(
        engine,
        PROMPT,
        max_tokens=24,
        temperature=0.0,
        ignore_eos=True,
        frequency_penalty=freq,
        presence_penalty=pres,
    )
    assert req.output_token_ids == want


def test_logit_bias_forces_and_bans_tokens(engine, hf_chat):
    ids = hf_chat.encode(PROMPT)
    forced = 42
    req, _ = run(engine, PROMPT, max_tokens=5, temperature=0.0, ignore_eos=True, logit_bias={forced: 100.0})
    assert req.output_token_ids == [forced] * 5
    first = hf_chat.greedy(ids, 1)[0]
    req, _ = run(engine, PROMPT, max_tokens=1, temperature=0.0, ignore_eos=True, logit_bias={first: -100.0})
    assert req.output_token_ids != [first]


def test_seed_reproduces_a_sample_whatever_it_is_batched_with(engine):
    params = dict(max_tokens=12, temperature=1.0, ignore_eos=True)
    alone, _ = run(engine, PROMPT, seed=7, **params)
    batch = engine.generate(["Once upon a time", PROMPT, "def add"], [
        SamplingParams(**params), SamplingParams(seed=7, **params), SamplingParams(seed=8, **params)
    ])  # fmt: skip
    assert batch[1].output_token_ids == alone.output_token_ids
    assert batch[2].output_token_ids != alone.output_token_ids


@pytest.mark.parametrize(
    "engine_kwargs",
    [{}, {"max_num_batched_tokens": 5}, {"max_num_batched_tokens": 3, "enable_prefix_caching": True}],
    ids=["one-chunk", "chunked-prefill", "chunked-and-prefix-cached"],
)
def test_echo_scores_every_prompt_token_like_hf(hf_chat, engine_kwargs):
    engine = engine_for(hf_chat, **engine_kwargs)
    text = "Once upon a time there was a small language model"
    ids = hf_chat.encode(text)
    run(engine, text, max_tokens=2, temperature=0.0)  # fills the prefix cache when it is on
    ref = hf_chat.logprobs(ids)
    want = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    req, outs = run(engine, ids, echo=True, prompt_only=True, logprobs=True, top_logprobs=2)
    (out,) = outs
    assert out.finished and out.finish_reason == "length" and out.token_ids == []
    assert out.prompt.token_ids == ids and out.prompt.logprobs[0] is None
    assert out.prompt.logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert out.prompt.top_logprobs[0] is None
    for i, alts in enumerate(out.prompt.top_logprobs[1:]):
        assert alts[0][0] == int(ref[i].argmax()) and len(alts) == 2
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 0
    # lm-eval's form: echo with one new token scores the prompt and the token
    req, outs = run(engine, ids, echo=True, logprobs=True, max_tokens=1, temperature=0.0)
    assert outs[0].prompt.logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert outs[0].token_ids == hf_chat.greedy(ids, 1)


def test_a_model_without_a_tokenizer_names_every_scored_token(hf_chat):
    """One token text per logprob ("" without a tokenizer): the HTTP front zips them strictly."""
    tensors, config, _ = read_hf_dir(hf_chat.path)
    engine = build_engine(tensors, model_config_from_hf(config), EngineConfig(num_blocks=128, block_size=4))
    ids = hf_chat.encode(PROMPT)
    _, outs = run(engine, ids, echo=True, logprobs=True, top_logprobs=2, max_tokens=2, temperature=0.0)
    assert outs[0].prompt.tokens == [""] * len(ids)
    for out in outs:
        assert out.tokens == [""] * len(out.logprobs) and len(out.logprobs) == len(out.token_ids)
        assert all(text == "" for alts in out.top_logprobs for _, _, text in alts)


def test_echo_survives_preemption(hf_chat):
    """A pool too small for two long requests preempts one; its prompt is scored once, correctly."""
    engine = engine_for(hf_chat, num_blocks=24, max_num_batched_tokens=8)
    ids = hf_chat.encode("Once upon a time there was a small language model that wanted")
    ref = hf_chat.logprobs(ids)
    reqs = engine.generate(
        [ids, ids[::-1]],
        [SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, echo=True, logprobs=True)] * 2,
    )
    assert engine.scheduler.num_preemptions > 0
    want = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert reqs[0].prompt_logprobs == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (dict(logit_bias={10**6: 1.0}), "logit_bias token id 1000000 is outside the vocabulary"),
        (dict(logit_bias={1: 100.5}), r"logit_bias\[1\] must be in \[-100, 100\]"),
        (dict(frequency_penalty=2.5), r"frequency_penalty must be in \[-2, 2\]"),
        (dict(presence_penalty=float("nan")), "presence_penalty"),
        (dict(top_logprobs=21), r"top_logprobs must be in \[0, 20\]"),
        (dict(prompt_only=True), "echo"),
    ],
)
def test_bad_controls_are_refused_before_queueing(engine, params, message):
    with pytest.raises(errors.InvalidArgument, match=message):
        engine.make_request(prompt="hi", params=SamplingParams(**params))


def test_penalties_cost_nothing_when_no_request_uses_them():
    logits = torch.zeros(2, 8)
    plain = [Request(str(i), [1], SamplingParams()) for i in range(2)]
    assert apply_penalties(logits, plain) is logits


def test_chat_template_renders_as_hf_and_refuses_without_one(tmp_path, hf_chat):
    _, _, files = read_hf_dir(hf_chat.path)
    tok = Tokenizer.from_files(files)
    chats = [
        [{"role": "user", "content": "hi"}],
        [
            {"role": "system", "content": "  Be brief.  "},
            {"role": "user", "content": "hi there"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "Naïve café? 🚀"},
        ],
    ]
    for chat in chats:
        want = hf_chat.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert tok.render_chat(chat) == want
    with pytest.raises(errors.InvalidArgument, match="roles are system, user and assistant"):
        tok.render_chat([{"role": "tool", "content": "x"}])
    bare = save_hf_chat(tmp_path / "bare", chat_template=None)
    with pytest.raises(errors.InvalidArgument, match="no chat template"):
        Tokenizer.from_files(read_hf_dir(bare.path)[2]).render_chat(chats[0])
