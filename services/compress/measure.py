"""What a compression cost and bought, measured the same way before and after: perplexity on an
eval stream (tokenmill.common.eval.perplexity over the dequantized weights in the training model)
and greedy decode tokens/s of the inference engine, in process, on a short fixed run."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from tokenmill.common.compress import build_model
from tokenmill.common.eval.perplexity import PerplexityResult, perplexity
from tokenmill.common.inference.config import EngineConfig, model_config_from_dict
from tokenmill.common.inference.llm_engine import build_engine
from tokenmill.common.inference.request import SamplingParams
from tokenmill.common.model.quant import dequantize_state_dict

DECODE_PROMPTS = 4
DECODE_PROMPT_TOKENS = 16  # both shortened to fit a model whose context is below their sum
DECODE_TOKENS = 32


def eval_perplexity(
    tensors: Mapping[str, torch.Tensor], config: dict[str, Any], tokens: np.ndarray, seq_len: int
) -> PerplexityResult:
    """Perplexity of the model `tensors` hold (any stored format) on `tokens`."""
    model = build_model(dequantize_state_dict(tensors), model_config_from_dict(config))
    return perplexity(model, tokens, seq_len=seq_len, batch_size=8)


def decode_tokens_per_second(tensors: Mapping[str, torch.Tensor], config: dict[str, Any]) -> float:
    """Greedy decode throughput of the served format (the engine loads the stored tensors as-is);
    fixed prompts and lengths (within the model's context) so before and after are comparable on
    one machine."""
    engine = build_engine(
        tensors, config, EngineConfig(num_blocks=64, max_num_seqs=DECODE_PROMPTS, enable_prefix_caching=False)
    )
    prompt_len, new = decode_lengths(model_config_from_dict(config).max_seq_len)
    vocab = int(config["vocab_size"])
    prompts = [[(7 * p + i) % vocab for i in range(prompt_len)] for p in range(DECODE_PROMPTS)]
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    warm_up = SamplingParams(max_tokens=min(2, new), temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:1], warm_up)
    began = time.perf_counter()
    done = engine.generate(prompts, params)
    elapsed = time.perf_counter() - began
    generated = sum(len(r.output_token_ids) for r in done)
    return generated / elapsed if elapsed > 0 else 0.0


def decode_lengths(context: int) -> tuple[int, int]:
    """(prompt tokens, new tokens) of the decode measurement: DECODE_PROMPT_TOKENS and DECODE_TOKENS,
    shortened so that both fit in a `context`-token model (the engine refuses more)."""
    prompt = max(1, min(DECODE_PROMPT_TOKENS, context // 3))
    return prompt, max(1, min(DECODE_TOKENS, context - prompt))
