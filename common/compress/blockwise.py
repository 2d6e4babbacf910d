"""Compress the linears of one decoder block in place from its captured input statistics.

The block's weights are replaced by what the stored format computes with, so the next block's
calibration inputs come from the compressed model (GPTQ's sequential scheme).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tokenmill.common.compress.awq import search_scales
from tokenmill.common.compress.calibrate import SHARED_INPUTS, InputStats, output_error
from tokenmill.common.compress.layers import LinearResult, compress_linear
from tokenmill.common.compress.spec import MethodSpec
from tokenmill.common.model.quant import dequantize_int4, quantize_int4
from tokenmill.common.model.transformer import RMSNorm

# (the RMSNorm feeding the group, the linears reading that same input); None: no norm to fold into.
AWQ_GROUPS: tuple[tuple[str | None, tuple[str, ...]], ...] = (
    ("input_layernorm", SHARED_INPUTS[0]),
    (None, ("self_attn.o_proj",)),
    ("post_attention_layernorm", SHARED_INPUTS[1]),
    (None, ("mlp.down_proj",)),
)

BlockOutput = tuple[list[tuple[str, LinearResult, float]], dict[str, torch.Tensor]]


def compress_block(
    step: MethodSpec, block: nn.Module, stats: dict[str, InputStats], names: Sequence[str], dtype: torch.dtype
) -> BlockOutput:
    """([(linear name, result, output error)], other changed tensors by block-relative name)."""
    if step.method == "int4-awq":
        return _awq_block(step, block, stats, names, dtype)
    results = []
    for name in names:
        lin = _linear(block, name)
        res = compress_linear(step, lin.weight, stats[name], dtype)
        err = output_error(lin.weight.detach(), res.approx, stats[name].sample)
        lin.weight.data = res.approx.to(lin.weight.dtype)
        results.append((name, res, err))
    return results, {}


def _awq_block(
    step: MethodSpec, block: nn.Module, stats: dict[str, InputStats], names: Sequence[str], dtype: torch.dtype
) -> BlockOutput:
    results: list[tuple[str, LinearResult, float]] = []
    extra: dict[str, torch.Tensor] = {}
    for norm, group in AWQ_GROUPS:
        members = [n for n in group if n in names]
        if not members:
            continue
        st = stats[members[0]]
        weights = [_linear(block, n).weight.detach().float() for n in members]
        s = search_scales(weights, st.sample, st.abs_mean, group_size=step.group_size, grid=step.awq_grid)
        fold_into = norm if len(members) == len(group) else None
        fold = fold_into is not None
        if fold_into is not None:
            norm_mod = block.get_submodule(fold_into)
            assert isinstance(norm_mod, RMSNorm)
            norm_mod.weight.data = (norm_mod.weight.float() / s).to(norm_mod.weight.dtype)
            extra[f"{fold_into}.weight"] = norm_mod.weight.detach().to(dtype).clone()
        for name, w in zip(members, weights, strict=True):
            q, sc, z = quantize_int4(w * s[None, :], step.group_size)
            scaled = dequantize_int4(q, sc, z)
            tensors = {"qweight": q, "scales": sc, "zeros": z}
            if not fold:
                tensors["input_scale"] = s.clone()
            approx = scaled / s[None, :]
            _linear(block, name).weight.data = scaled if fold else approx
            results.append((name, LinearResult(tensors, approx), output_error(w, approx, st.sample)))
    return results, extra


def _linear(block: nn.Module, name: str) -> nn.Linear:
    mod = block.get_submodule(name)
    assert isinstance(mod, nn.Linear)
    return mod
