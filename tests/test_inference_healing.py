"""Completion text as HF decodes it, and token healing (common/inference/healing.py).

The completion must be what ``decode(prompt + output)`` adds after ``decode(prompt)``: a
SentencePiece-style (Metaspace) tokenizer drops a first token's leading space when it is decoded on
its own, which lost the space between a prompt and its completion. With ``token_healing``, a prompt
that ends mid-token (``"def "``) is backed up by its last token and the first new token must extend
it; the text returned still continues the prompt as sent.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from tests.fixtures.inference import CORPUS, TinyCheckpoint, hf_model_from, random_model, tiny_config
from tokenmill.common.errors import InvalidArgument
from tokenmill.common.inference import EngineConfig, SamplingParams, Tokenizer, build_engine
from tokenmill.common.inference.healing import TokenHealer

GREEDY = dict(temperature=0.0, ignore_eos=True)
PROMPTS = ["def ", "Once upon a ", "The quick brown fo", "return a +", "café ", "x"]


def metaspace_tokenizer() -> HFTokenizer:
    """A Llama-2/Mistral style tokenizer: spaces are '\u2581' glued to the next word."""
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def byte_level_tokenizer() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def checkpoint(tok: HFTokenizer) -> TinyCheckpoint:
    return TinyCheckpoint(random_model(tiny_config(tok.get_vocab_size(), eos_token_id=1), seed=5), tok)


def engine_for(ckpt: TinyCheckpoint):
    config = EngineConfig(num_blocks=128, block_size=4)
    return build_engine(ckpt.tensors, ckpt.config.to_hf_config(), config, Tokenizer(ckpt.hf_tokenizer))


@pytest.fixture(scope="module")
def metaspace() -> TinyCheckpoint:
    return checkpoint(metaspace_tokenizer())


@pytest.fixture(scope="module")
def byte_level() -> TinyCheckpoint:
    return checkpoint(byte_level_tokenizer())


@pytest.fixture(scope="module")
def byte_level_engine(byte_level):
    return engine_for(byte_level)


def hf_completion(tok: HFTokenizer, prompt_ids: list[int], output_ids: list[int]) -> str:
    """What a completion is: the text decoding the whole sequence adds after the prompt's text."""
    return tok.decode(prompt_ids + output_ids)[len(tok.decode(prompt_ids)) :]


def test_metaspace_completion_keeps_the_space_after_the_prompt(metaspace):
    eng = engine_for(metaspace)
    tok = metaspace.hf_tokenizer
    reqs = eng.generate(
        ["Once upon a", "The quick brown", "def add(a, b):"], SamplingParams(max_tokens=8, **GREEDY)
    )
    for req in reqs:
        assert req.text == hf_completion(tok, req.prompt_token_ids, req.output_token_ids)
    # The test means something only if some completion starts with a word token ('\u2581...').
    firsts = [tok.id_to_token(r.output_token_ids[0]) for r in reqs]
    assert any(t.startswith("\u2581") for t in firsts), firsts


def test_streamed_pieces_add_up_to_the_completion(metaspace):
    eng = engine_for(metaspace)
    req = eng.add_request(prompt="Once upon a", params=SamplingParams(max_tokens=10, **GREEDY))
    pieces = []
    while eng.has_unfinished():
        pieces += [o.text for o in eng.step() if o.request_id == req.request_id]
    assert (
        "".join(pieces)
        == req.text
        == hf_completion(metaspace.hf_tokenizer, req.prompt_token_ids, req.output_token_ids)
    )


def test_trailing_space_prompt_is_healed_to_a_word_token(byte_level, byte_level_engine):
    tok = byte_level.hf_tokenizer
    ids = tok.encode("def ").ids
    assert tok.id_to_token(ids[-1]) == "\u0120"  # a lone space token: the case healing is for
    req = byte_level_engine.make_request(
        prompt="def ", params=SamplingParams(max_tokens=6, token_healing=True, **GREEDY)
    )
    assert req.prompt_token_ids == ids[:-1]
    byte_level_engine.add(req)
    while byte_level_engine.has_unfinished():
        byte_level_engine.step()
    first = tok.id_to_token(req.output_token_ids[0])
    assert first.startswith("\u0120"), first
    assert "def " + req.text == tok.decode(req.prompt_token_ids + req.output_token_ids)


def test_healed_first_token_is_the_references_best_extension(byte_level, byte_level_engine):
    """Greedy healing = argmax of HF's logits at the shortened prompt over the tokens that extend
    the removed one; later tokens are plain greedy from there."""
    hf = hf_model_from(byte_level)
    healer = TokenHealer(byte_level.hf_tokenizer)
    for prompt in ("Once upon a ", "The quick brown fo", "café "):
        ids = byte_level.encode(prompt)
        healing = healer.heal(ids)
        assert healing is not None, prompt
        params = SamplingParams(max_tokens=4, token_healing=True, **GREEDY)
        [req] = byte_level_engine.generate([prompt], params)
        with torch.inference_mode():
            logits = hf(torch.tensor([healing.prompt_token_ids])).logits[0, -1]
        allowed = torch.tensor(healing.allowed_token_ids)
        assert req.output_token_ids[0] == int(allowed[logits[allowed].argmax()]), prompt
        seq = healing.prompt_token_ids + req.output_token_ids[:1]
        with torch.inference_mode():
            rest = hf.generate(torch.tensor([seq]), max_new_tokens=3, do_sample=False, eos_token_id=None)
        assert req.output_token_ids[1:] == rest[0, len(seq) :].tolist(), prompt


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.text(alphabet=st.sampled_from(list("abcdef ().:=\n_xyzé🚀")), min_size=1, max_size=24))
def test_healed_completion_continues_the_prompt_as_sent(byte_level, byte_level_engine, prompt):
    params = SamplingParams(max_tokens=3, token_healing=True, temperature=1.0, seed=0, ignore_eos=True)
    [req] = byte_level_engine.generate([prompt], params)
    tok = byte_level.hf_tokenizer
    full = tok.decode(req.prompt_token_ids + req.output_token_ids)
    # The prompt's last character may share a byte sequence with the output only when healing cut
    # into a multi-byte character; otherwise prompt + completion is exactly the decoded sequence.
    if "\ufffd" not in full:
        assert prompt + req.text == full


def test_healing_leaves_prompts_it_cannot_improve(byte_level, byte_level_engine):
    healer = TokenHealer(byte_level.hf_tokenizer)
    eot = byte_level.hf_tokenizer.token_to_id("<|endoftext|>")
    assert healer.heal([42]) is None  # one token: nothing would be left to condition on
    assert healer.heal([42, eot]) is None  # special tokens are not text to extend
    params = SamplingParams(max_tokens=2, token_healing=True, **GREEDY)
    req = byte_level_engine.make_request(prompt_token_ids=[42, eot], params=params)
    assert req.prompt_token_ids == [42, eot] and not req.heal_token_ids


def test_healing_with_echo_is_refused(byte_level_engine):
    params = SamplingParams(max_tokens=2, token_healing=True, echo=True, logprobs=True)
    with pytest.raises(InvalidArgument, match="token_healing and echo"):
        byte_level_engine.make_request(prompt="def ", params=params)


def test_healing_needs_a_tokenizer(byte_level):
    eng = build_engine(
        byte_level.tensors, byte_level.config.to_hf_config(), EngineConfig(num_blocks=32, block_size=4)
    )
    with pytest.raises(InvalidArgument, match="token_healing needs the model's tokenizer"):
        eng.make_request(prompt_token_ids=[5, 6], params=SamplingParams(token_healing=True))
