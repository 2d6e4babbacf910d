"""One method applied to one linear weight: the stored tensors and the weight serving computes with."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.common.compress.calibrate import InputStats
from tokenmill.common.compress.checks import factors_fit
from tokenmill.common.compress.gptq import gptq_int4, sparsegpt
from tokenmill.common.compress.lowrank import truncated_svd
from tokenmill.common.compress.prune import magnitude_prune, pack_nm_index, wanda_prune
from tokenmill.common.compress.spec import MethodSpec
from tokenmill.common.model.quant import (
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
)


@dataclass
class LinearResult:
    """tensors: by suffix ("weight", "qweight", "scales", ...); approx: the float weight [out, in]
    the stored format computes with; kept: the keep mask of a pruning method; note: why the layer
    came out other than asked (reported, not an error)."""

    tensors: dict[str, torch.Tensor]
    approx: torch.Tensor
    kept: torch.Tensor | None = None
    note: str = ""


def compress_linear(
    step: MethodSpec, weight: torch.Tensor, stats: InputStats | None, dtype: torch.dtype
) -> LinearResult:
    """Apply `step` (any method but AWQ, which scales whole groups: see blockwise) to one weight."""
    w = weight.detach().float()
    m = step.method
    if m == "int8":
        q, s = quantize_int8(w)
        return LinearResult({"qweight": q, "scales": s}, dequantize_int8(q, s))
    if m == "int4-rtn":
        q, s, z = quantize_int4(w, step.group_size)
        return LinearResult({"qweight": q, "scales": s, "zeros": z}, dequantize_int4(q, s, z))
    if m == "int4-gptq":
        assert stats is not None
        codes, s, z = gptq_int4(
            w,
            stats.hessian,
            group_size=step.group_size,
            damp=step.damp,
            block_size=step.block_size,
            act_order=step.act_order,
        )
        q = pack_int4(codes)
        return LinearResult({"qweight": q, "scales": s, "zeros": z}, dequantize_int4(q, s, z))
    if m == "svd":
        return _svd(step, w, dtype)
    return _prune(step, w, stats, dtype)


def _svd(step: MethodSpec, w: torch.Tensor, dtype: torch.dtype) -> LinearResult:
    """Two factors, or the weight itself where the factors would be the larger of the two."""
    u, v = truncated_svd(w, rank=step.rank, rank_fraction=step.rank_fraction, energy=step.energy)
    rank = u.shape[1]
    out_f, in_f = w.shape
    if not factors_fit(out_f, in_f, rank):
        stored = w.to(dtype)
        note = (
            f"kept dense: rank {rank} factors would store {rank * sum(w.shape)} numbers against {w.numel()}"
        )
        return LinearResult({"weight": stored}, stored.float(), note=note)
    u, v = u.to(dtype), v.to(dtype)
    return LinearResult({"svd_u": u, "svd_v": v}, u.float() @ v.float())


def _prune(step: MethodSpec, w: torch.Tensor, stats: InputStats | None, dtype: torch.dtype) -> LinearResult:
    if step.method == "prune-magnitude":
        pruned, kept = magnitude_prune(w, step.sparsity, step.pattern)
    elif step.method == "prune-wanda":
        assert stats is not None
        pruned, kept = wanda_prune(w, stats.sq_sum, step.sparsity, step.pattern)
    else:
        assert stats is not None
        pruned, kept = sparsegpt(
            w,
            stats.hessian,
            sparsity=step.sparsity,
            pattern=step.pattern,
            damp=step.damp,
            block_size=step.block_size,
        )
    stored = pruned.to(dtype)
    tensors = {"weight": stored}
    if step.pattern == "2:4":
        tensors["nm_index"] = pack_nm_index(kept)
    return LinearResult(tensors, stored.float(), kept)
