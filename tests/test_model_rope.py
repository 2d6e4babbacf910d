"""Rope types yarn and dynamic NTK as transformers computes them, past the original context: our
training model, the paged model (prefill chunks and decode steps) and greedy generation through the
engine equal a Llama built and saved by transformers. Dynamic NTK rotates a prompt longer than the
context with frequencies of its own length, so the engine must neither share those blocks with
shorter prompts nor reuse them: prompts that are prefixes of each other run longest first."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.test_model_families import BASE, engine_prefill_logits, hf_model
from tokenmill.common.inference import EngineConfig, SamplingParams, build_engine
from tokenmill.common.inference.config import ModelSpec
from tokenmill.common.model.hf_layout import model_config_from_hf, read_hf_dir
from tokenmill.common.model.transformer import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")

ORIGINAL = 32
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "original_max_position_embeddings": ORIGINAL}
CASES = {
    # (config overrides, positions the engine serves)
    "yarn": (dict(rope_parameters={**YARN, "factor": 2.0}), 64),
    "yarn-qwen-style-context": (
        dict(max_position_embeddings=ORIGINAL, rope_parameters={**YARN, "factor": 2.0}),
        64,
    ),
    "yarn-betas-mscale-no-truncate": (
        dict(
            max_position_embeddings=96,
            rope_parameters={
                **YARN,
                "factor": 3.0,
                "beta_fast": 16,
                "beta_slow": 2,
                "mscale": 1.2,
                "mscale_all_dim": 0.8,
                "truncate": False,
            },
        ),
        96,
    ),
    "yarn-attention-factor": (dict(rope_parameters={**YARN, "factor": 2.0, "attention_factor": 1.3}), 64),
    "dynamic": (
        dict(
            max_position_embeddings=ORIGINAL,
            rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
        ),
        64,
    ),
}
PROMPT = torch.randint(0, BASE["vocab_size"], (1, 45), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, tmp_path_factory):
    """(pristine HF model, our config dict, tensors, context) saved and read back in HF layout."""
    overrides, context = CASES[request.param]
    hf = hf_model("Llama", **overrides)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    tensors, hf_cfg, _ = read_hf_dir(path)
    return hf, model_config_from_hf(hf_cfg), tensors, context


def _hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # a fresh copy: HF's dynamic rope keeps state between calls
        return copy.deepcopy(hf)(input_ids=ids).logits[0]


def test_engine_serves_the_extended_context(saved):
    _, config, _, context = saved
    assert ModelSpec.from_dict(config).max_position_embeddings == context


def test_config_round_trips_through_transformers(saved):
    hf, config, _, _ = saved
    ours = ModelConfig.from_dict(config)
    rebuilt = transformers.LlamaConfig(**ours.to_hf_config())
    assert ModelConfig.from_hf_config(rebuilt.to_dict()) == ours
    # (the legacy rope_scaling spelling also carries "type", for transformers 4.x readers)
    assert {k: v for k, v in rebuilt.rope_parameters.items() if k != "type"} == hf.config.rope_parameters


@pytest.mark.parametrize("n", [20, ORIGINAL, 45])
def test_training_model_equals_hf_past_the_original_context(saved, n):
    hf, config, tensors, _ = saved
    ours = Transformer(ModelConfig.from_dict(config)).eval()
    ours.load_state_dict(tensors, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(PROMPT[:, :n])[0], _hf_logits(hf, PROMPT[:, :n]), atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize("chunks, block", [([45], 4), ([7, 1, 1, 20, 1, 15], 3), ([1] * 33 + [12], 8)])
def test_paged_model_equals_hf_past_the_original_context(saved, chunks, block):
    hf, config, tensors, _ = saved
    want = _hf_logits(hf, PROMPT)
    got = engine_prefill_logits(config, tensors, PROMPT[0].tolist(), chunks, block)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_engine_greedy_ids_equal_hf_past_the_original_context(saved):
    hf, config, tensors, _ = saved
    engine = build_engine(
        tensors, config, EngineConfig(num_blocks=128, block_size=3, max_num_batched_tokens=10)
    )
    # 20 and 30 decode past the original context; 40 and 45 prompt past it
    prompts = [PROMPT[0, :n].tolist() for n in (45, 40, 30, 20)]
    params = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
    for prompt in prompts:  # longest first, one at a time: a shorter prefix must not reuse its blocks
        with torch.no_grad():
            g = copy.deepcopy(hf).generate(
                torch.tensor([prompt]), max_new_tokens=14, do_sample=False, eos_token_id=None
            )
        (got,) = engine.generate([prompt], params)
        assert got.output_token_ids == g[0, len(prompt) :].tolist(), len(prompt)
    again = engine.generate(prompts, params)  # batched, chunked, with prefix hits where allowed
    for prompt, req in zip(prompts, again, strict=True):
        with torch.no_grad():
            g = copy.deepcopy(hf).generate(
                torch.tensor([prompt]), max_new_tokens=14, do_sample=False, eos_token_id=None
            )
        assert req.output_token_ids == g[0, len(prompt) :].tolist(), len(prompt)
