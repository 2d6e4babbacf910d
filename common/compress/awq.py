"""AWQ-style activation-aware scaling before int4 (Lin et al. 2023, mit-han-lab/llm-awq).

Weights feeding on large activations matter most, so input channel j of every linear reading the
same input is multiplied by s_j = mean|x_j|^alpha (normalised) before round-to-nearest int4, and
the input is divided by s: W x = (W diag(s)) (x / s). alpha is grid-searched per group of linears
to minimise the output error on calibration rows; alpha = 0 is plain RTN, so AWQ never loses to it
on that sample. The division is folded into the preceding RMSNorm weight where one exists for the
whole group (q/k/v, gate/up), and otherwise kept as the layer's `input_scale` (o_proj, down_proj).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tokenmill.common.model.quant import dequantize_int4, quantize_int4


def fake_int4(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """The weight int4 RTN actually computes with."""
    return dequantize_int4(*quantize_int4(weight, group_size))


def candidate_scales(abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha, normalised to geometric mean of its extremes 1 (llm-awq's rule)."""
    s = abs_mean.float().pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def search_scales(
    weights: Sequence[torch.Tensor],
    sample: torch.Tensor,
    abs_mean: torch.Tensor,
    *,
    group_size: int,
    grid: int,
) -> torch.Tensor:
    """The per-input-channel scale s [in] minimising sum ||x W^T - x (Q(W s) / s)^T||^2 over `sample`."""
    refs = [sample @ w.float().t() for w in weights]
    best_err, best = float("inf"), torch.ones_like(abs_mean, dtype=torch.float32)
    for k in range(grid):
        s = candidate_scales(abs_mean, k / grid)
        err = 0.0
        for w, ref in zip(weights, refs, strict=True):
            approx = fake_int4(w.float() * s[None, :], group_size) / s[None, :]
            err += float(((sample @ approx.t() - ref) ** 2).sum())
        if err < best_err:
            best_err, best = err, s
    return best
