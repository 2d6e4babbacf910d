"""Attention groups: the runner splits a step's sequences into length buckets (decodes) and groups
(prefill chunks) so that padding stays bounded, and prefill chunks that start their sequence attend
causally to their own K/V. Whatever the split, greedy ids equal HF's, on a full-attention model and
on one mixing a full layer with a sliding one (window shorter than the chunks)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.test_model_families import BASE, hf_model
from tokenmill.common.inference import EngineConfig, SamplingParams, build_engine
from tokenmill.common.inference.runner import split_runs
from tokenmill.common.model.hf_layout import model_config_from_hf, read_hf_dir

# Distinct lengths (many buckets) and three equal ones (a batched group that starts at position 0).
LENGTHS = (3, 5, 9, 17, 30, 30, 30)
NEW = 16
MODELS = {
    "llama": ("Llama", {}),
    "qwen2-window-8-on-layer-1": (
        "Qwen2",
        dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
    ),
}


def test_split_runs_covers_every_shape_in_order():
    shapes = [(1, 1), (1, 1), (1, 2), (1, 9), (1, 10), (1, 40)]
    assert split_runs(shapes, overhead=10**9) == [6]  # a call costs more than any padding
    assert split_runs(shapes, overhead=0) == [2, 3, 4, 5, 6]  # equal shapes never split
    assert split_runs(shapes, overhead=5) == [3, 5, 6]  # pad 1 -> 2 and 9 -> 10, keep 40 apart
    assert split_runs([(30, 8), (30, 8), (64, 8)], overhead=64) == [2, 3]


def _hf_greedy(hf, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = copy.deepcopy(hf).generate(
            torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, eos_token_id=None
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(MODELS))
@pytest.mark.parametrize("overhead", [0, 10**9])
def test_greedy_ids_equal_hf_however_the_step_is_grouped(tmp_path, case, overhead):
    family, overrides = MODELS[case]
    hf = hf_model(family, **overrides)
    hf.save_pretrained(tmp_path)
    tensors, hf_cfg, _ = read_hf_dir(tmp_path)
    cfg = EngineConfig(num_blocks=256, block_size=2, max_num_batched_tokens=256, enable_prefix_caching=False)
    engine = build_engine(tensors, model_config_from_hf(hf_cfg), cfg)
    runner = engine.runner
    runner.group_overhead = overhead
    calls: list[int] = []
    decode_meta, prefill_groups = runner._decode_meta, runner._prefill_groups
    runner._decode_meta = lambda d, dev: _count(decode_meta(d, dev), calls, "buckets")  # type: ignore[method-assign]
    runner._prefill_groups = lambda p, dev: _count(prefill_groups(p, dev), calls, None)  # type: ignore[method-assign]
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(4, BASE["vocab_size"], (n,), generator=gen).tolist() for n in LENGTHS]
    done = engine.generate(prompts, SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True))
    # overhead 0: several attention calls per step; huge: one padded call for decodes and prefills each.
    assert (max(calls) > 1) == (overhead == 0)
    for prompt, req in zip(prompts, done, strict=True):
        assert req.output_token_ids == _hf_greedy(hf, prompt)


def _count(meta, calls: list[int], attr: str | None):
    calls.append(len(getattr(meta, attr) if attr else meta))
    return meta
