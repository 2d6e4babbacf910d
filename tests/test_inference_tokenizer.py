"""Tokenization and stopping as HF does them (issue 11 item 3): special tokens from the tokenizer's
post-processor (Llama's BOS), and every id of an `eos_token_id` list ends generation."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from tests.fixtures.inference import (
    CORPUS,
    TinyCheckpoint,
    hf_model_from,
    random_model,
    reference_greedy,
    tiny_config,
    train_tokenizer,
)
from tokenmill.common.errors import InvalidArgument
from tokenmill.common.inference import EngineConfig, SamplingParams, Tokenizer, build_engine
from tokenmill.common.inference.config import ModelSpec, parse_eos_token_ids
from tokenmill.services.inference.loader import with_generation_eos

TEXTS = ["The quick brown fox", "Naïve café 🚀", "def add(a, b):\n    return a + b", "a"]


def llama_like_tokenizer() -> HFTokenizer:
    """A byte-level BPE whose post-processor prepends BOS, as Llama's tokenizer.json does."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<s>", "</s>", "<|eot|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok


@pytest.fixture(scope="module")
def llama_ckpt() -> TinyCheckpoint:
    tok = llama_like_tokenizer()
    cfg = tiny_config(tok.get_vocab_size(), bos_token_id=tok.token_to_id("<s>"), eos_token_id=1)
    return TinyCheckpoint(random_model(cfg, seed=3), tok)


def hf_auto_tokenizer(tok: HFTokenizer, path):
    """HF's AutoTokenizer over the same tokenizer.json, as `from_pretrained` loads a model repo."""
    from transformers import AutoTokenizer

    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(str(path))


def engine_for(ckpt: TinyCheckpoint, **config):
    cfg = EngineConfig(num_blocks=64, block_size=4)
    return build_engine(
        ckpt.tensors, {**ckpt.config.to_hf_config(), **config}, cfg, Tokenizer(ckpt.hf_tokenizer)
    )


def test_prompt_ids_equal_hf_auto_tokenizer_with_bos(llama_ckpt, tmp_path):
    hf = hf_auto_tokenizer(llama_ckpt.hf_tokenizer, tmp_path)
    ours = Tokenizer(llama_ckpt.hf_tokenizer)
    bos = llama_ckpt.hf_tokenizer.token_to_id("<s>")
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf(text).input_ids
        assert ids[0] == bos and bos not in ids[1:]
    eng = engine_for(llama_ckpt)
    assert eng.make_request(prompt=TEXTS[0]).prompt_token_ids == hf(TEXTS[0]).input_ids


def test_text_prompt_generates_as_hf_generate(llama_ckpt, tmp_path):
    hf_tok = hf_auto_tokenizer(llama_ckpt.hf_tokenizer, tmp_path)
    hf = hf_model_from(llama_ckpt)
    eng = engine_for(llama_ckpt)
    reqs = eng.generate(TEXTS, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    for text, req in zip(TEXTS, reqs, strict=True):
        ids = hf_tok(text, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
        assert req.output_token_ids == out[0, ids.shape[1] :].tolist(), text


def test_tokenizer_without_post_processor_adds_nothing(tiny_ckpt):
    """The fixtures' byte-level BPE has no post-processor: the encoding the other tests rely on."""
    ours = Tokenizer(train_tokenizer())
    for text in TEXTS:
        assert ours.encode(text) == tiny_ckpt.encode(text)
    llama = Tokenizer(llama_like_tokenizer())
    assert llama.encode(TEXTS[0], add_special_tokens=False) == llama.encode(TEXTS[0])[1:]


def test_generation_stops_on_every_eos_id_like_hf(llama_ckpt):
    prompt = llama_ckpt.hf_tokenizer.encode("Once upon a time").ids
    greedy = reference_greedy(llama_ckpt.model, prompt, 16)
    candidates = list(dict.fromkeys(greedy[2:10]))[:3]
    assert len(candidates) >= 2, greedy  # the tiny model's path is varied enough to stop at several points
    unused = next(t for t in range(llama_ckpt.config.vocab_size) if t not in greedy)
    hf = hf_model_from(llama_ckpt)
    for stop in candidates:
        eos = [unused, stop, llama_ckpt.config.vocab_size - 1]  # the stopping id is not the first
        eng = engine_for(llama_ckpt, eos_token_id=eos)
        (req,) = eng.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0))
        assert req.finish_reason == "stop"
        assert req.output_token_ids == greedy[: greedy.index(stop) + 1]
        with torch.inference_mode():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=eos)
        assert req.output_token_ids == out[0, len(prompt) :].tolist()


def test_eos_token_id_int_list_or_none():
    assert parse_eos_token_ids(None) == ()
    assert parse_eos_token_ids(7) == (7,)
    assert parse_eos_token_ids([128001, 128008, 128009, 128001]) == (128001, 128008, 128009)
    for bad in ("2", [1, "x"], -1, [True], 1.5):
        with pytest.raises(InvalidArgument, match="eos_token_id"):
            parse_eos_token_ids(bad)


def test_model_spec_keeps_an_eos_list_from_a_model_config():
    """ModelConfig may carry the HF list as it is (common/model keeps it): the spec keeps all ids."""
    cfg = tiny_config(384, eos_token_id=[1, 2])  # the HF shape, as from_hf_config keeps it
    assert ModelSpec.from_model_config(cfg).eos_token_ids == (1, 2)
    assert ModelSpec.from_dict({**tiny_config(384).to_hf_config(), "eos_token_id": [5, 6]}).eos_token_ids == (
        5,
        6,
    )


def test_generation_config_eos_ids_join_the_model_config():
    """HF `generate` stops on generation_config.json's eos ids (Llama 3 Instruct's end of turn)."""
    config = {"eos_token_id": 128001, "vocab_size": 128256}
    merged = with_generation_eos(config, json.dumps({"eos_token_id": [128001, 128008, 128009]}).encode())
    assert merged["eos_token_id"] == [128001, 128008, 128009]
    assert with_generation_eos(config, b"{}") == config
    assert with_generation_eos(config, b"not json") == config
