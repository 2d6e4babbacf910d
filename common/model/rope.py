"""Rotary-embedding frequencies for every rope type tokenmill serves, computed as transformers does.

`transformers.modeling_rope_utils` is the reference: default, linear, llama3, yarn (static
frequencies plus an attention factor that scales cos/sin) and dynamic NTK, whose base grows with the
sequence length once it passes ``max_position_embeddings``. The float32 arithmetic follows HF's
order of operations so logits agree to fp32 rounding. Torch only: engines import this module.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tokenmill.common.model.transformer import ModelConfig


def rope_kind(scaling: dict[str, Any] | None) -> str:
    """The rope type of a tokenmill ``rope_scaling`` dict ("default" when there is none)."""
    if not scaling:
        return "default"
    return str(scaling.get("type", scaling.get("rope_type", "default")))


def _base_inv_freq(theta: float | torch.Tensor, dim: int, device: torch.device | str | None) -> torch.Tensor:
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    if isinstance(theta, torch.Tensor):
        return 1.0 / (theta[..., None] ** exponent)
    return 1.0 / (theta**exponent)


def _llama3(inv: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def yarn_attention_factor(s: dict[str, Any], max_position_embeddings: int) -> float:
    """The cos/sin multiplier of yarn: `attention_factor`, else from mscale / mscale_all_dim / factor."""
    factor = yarn_factor(s, max_position_embeddings)
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
    return get_mscale(factor)


def yarn_factor(s: dict[str, Any], max_position_embeddings: int) -> float:
    """Yarn's factor; HF derives it from the context ratio when the config leaves it null."""
    if s.get("factor") is None:
        return max_position_embeddings / float(s["original_max_position_embeddings"])
    return float(s["factor"])


def _yarn(theta: float, dim: int, s: dict[str, Any], max_pos: int, device: Any) -> torch.Tensor:
    factor = yarn_factor(s, max_pos)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1
    original = float(s["original_max_position_embeddings"])

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = (1 - ramp).to(device=device, dtype=torch.float)
    pos_freqs = theta ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    return interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight


def dynamic_inv_freq(config: ModelConfig, seq_lens: torch.Tensor) -> torch.Tensor:
    """Dynamic NTK frequencies [*seq_lens.shape, head_dim/2] for sequences of these lengths: HF's
    `_compute_dynamic_ntk_parameters` (float32), equal to the plain frequencies up to the context."""
    dim, max_pos = config.dim_head, config.max_seq_len
    factor = float((config.rope_scaling or {})["factor"])
    seq = torch.clamp(seq_lens.to(torch.int64), min=max_pos)
    base = config.rope_theta * ((factor * seq / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(base, dim, seq_lens.device)


def rope_inv_freq(config: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] used up to the context length (dynamic NTK beyond it:
    :func:`dynamic_inv_freq`)."""
    d, s = config.dim_head, config.rope_scaling or {}
    kind = rope_kind(s)
    if kind == "yarn":
        return _yarn(config.rope_theta, d, s, config.max_seq_len, device)
    inv = _base_inv_freq(config.rope_theta, d, device)
    if kind == "linear":
        return inv / float(s["factor"])
    if kind == "llama3":
        return _llama3(inv, s)
    return inv


def rope_attention_scaling(config: ModelConfig) -> float:
    """The factor HF multiplies cos and sin by (only yarn's differs from 1)."""
    if rope_kind(config.rope_scaling) == "yarn":
        return yarn_attention_factor(config.rope_scaling or {}, config.max_seq_len)
    return 1.0


def rope_context_length(config: ModelConfig) -> int:
    """Positions the model serves: HF's max_position_embeddings, extended by the factor for
    dynamic NTK and to original x factor for yarn (as vLLM derives its max_model_len)."""
    s, n = config.rope_scaling or {}, config.max_seq_len
    kind = rope_kind(s)
    if kind == "dynamic":
        return int(n * float(s["factor"]))
    if kind == "yarn":
        return max(n, int(float(s["original_max_position_embeddings"]) * yarn_factor(s, n)))
    return n
