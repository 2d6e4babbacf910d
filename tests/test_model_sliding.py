"""Sliding-window attention as transformers computes it: Mistral (every layer) and Qwen2 (the layers
from max_window_layers on), with a window of 8 and prompts several windows long. Our training model,
the paged model fed in prefill chunks and decode steps that straddle block and window boundaries,
and greedy generation through the engine (chunked prefill, batched prompts, prefix-cache hits) all
equal HF. The window really binds: attending to everything gives different logits."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.test_model_families import BASE, engine_prefill_logits, hf_model
from tokenmill.common.inference import EngineConfig, SamplingParams, build_engine
from tokenmill.common.model.hf_layout import model_config_from_hf, read_hf_dir
from tokenmill.common.model.transformer import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")

WINDOW = 8
CASES = {
    "mistral": ("Mistral", dict(sliding_window=WINDOW)),
    # layer 0 full, layer 1 sliding: per-layer windows in one model
    "qwen2-mixed-layers": (
        "Qwen2",
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    ),
    "qwen2-all-layers": ("Qwen2", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0)),
}
PROMPT = torch.randint(0, BASE["vocab_size"], (1, 41), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, tmp_path_factory):
    """(HF model, our config dict, tensors) for a windowed model saved and read back in HF layout."""
    family, overrides = CASES[request.param]
    hf = hf_model(family, **overrides)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    tensors, hf_cfg, _ = read_hf_dir(path)
    return hf, model_config_from_hf(hf_cfg), tensors


def test_imported_config_keeps_the_window_layers(saved):
    hf, config, _ = saved
    cfg = ModelConfig.from_dict(config)
    want = [
        WINDOW if t == "sliding_attention" or hf.config.model_type == "mistral" else None
        for t in getattr(hf.config, "layer_types", None) or ["sliding_attention"] * cfg.num_layers
    ]
    assert [cfg.layer_window(i) for i in range(cfg.num_layers)] == want
    rebuilt = getattr(transformers, type(hf.config).__name__)(**cfg.to_hf_config())
    assert ModelConfig.from_hf_config(rebuilt.to_dict()) == cfg


def test_training_model_equals_hf_past_the_window(saved):
    hf, config, tensors = saved
    with torch.no_grad():
        want = hf(input_ids=PROMPT).logits[0]
    ours = Transformer(ModelConfig.from_dict(config)).eval()
    ours.load_state_dict(tensors, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(ours(PROMPT)[0], want, atol=1e-4, rtol=1e-4)
        # the window binds: full attention is measurably different past it
        unwindowed = Transformer(
            ModelConfig.from_dict({**config, "sliding_window": None, "layer_types": None})
        )
        unwindowed.load_state_dict(tensors, strict=False)
        assert (unwindowed.eval()(PROMPT)[0, WINDOW:] - want[WINDOW:]).abs().max() > 1e-2


@pytest.mark.parametrize(
    "chunks, block",
    [
        ([41], 4),  # one prefill chunk
        ([5, 7, 1, 1, 9, 3, 1, 14], 3),  # chunks and decodes crossing windows and blocks
        ([8, 8, 1, 8, 16], 8),  # chunk = window = block
        ([1] * 12 + [29], 5),  # decodes first, then a chunk longer than three windows
    ],
)
def test_paged_model_equals_hf_in_chunks_and_decodes(saved, chunks, block):
    hf, config, tensors = saved
    with torch.no_grad():
        want = hf(input_ids=PROMPT).logits[0]
    got = engine_prefill_logits(config, tensors, PROMPT[0].tolist(), chunks, block)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_engine_greedy_ids_equal_hf_with_prefix_hits(saved):
    hf, config, tensors = saved
    engine = build_engine(
        tensors, config, EngineConfig(num_blocks=96, block_size=3, max_num_batched_tokens=10)
    )
    prompts = [PROMPT[0, :n].tolist() for n in (1, 7, 9, 23, 41)]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    want = []
    for prompt in prompts:
        with torch.no_grad():
            g = copy.deepcopy(hf).generate(
                torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None
            )
        want.append(g[0, len(prompt) :].tolist())
    first = [r.output_token_ids for r in engine.generate(prompts, params)]
    assert first == want
    hits = engine.blocks.prefix_hits
    again = [r.output_token_ids for r in engine.generate(prompts, params)]  # served from cached blocks
    assert engine.blocks.prefix_hits > hits
    assert again == want


@pytest.mark.slow
def test_padded_static_decode_path_with_window_simulated(saved):
    """The CUDA-graph decode path (static buffers, padded rows on the null block), run eagerly on
    this GPU-less host, masks the window too: greedy ids equal HF's."""
    hf, config, tensors = saved
    engine = build_engine(
        tensors, config, EngineConfig(num_blocks=96, block_size=4, max_num_batched_tokens=64)
    )
    engine.runner.use_graphs = True  # capture_graphs stays False on CPU
    prompts = [PROMPT[0, :n].tolist() for n in (3, 12, 30)]
    done = engine.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    assert engine.runner.graphs, "the static decode path was not used"
    for prompt, req in zip(prompts, done, strict=True):
        with torch.no_grad():
            g = copy.deepcopy(hf).generate(
                torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None
            )
        assert req.output_token_ids == g[0, len(prompt) :].tolist()
