"""Weight-only quantized linear layers and the functions that write their formats.

One interface (`QuantLinear`: `forward(x)`, `in_features`/`out_features`, `weight_bytes()`) for
dense, int8 and int4 weights, so the inference engine never branches on the format and the
compression service only has to write tensors in the layouts below into the checkpoint store
(docs/contracts.md, "Quantized weights"):

* int8 weight-only: `{w}.qweight` int8 [out, in], `{w}.scales` float [out];
  W ~= qweight * scales[:, None] (symmetric, per output channel).
* int4 group-wise: `{w}.qweight` uint8 [out, in/2], two values per byte, low nibble first
  (column 2j in the low nibble, 2j+1 in the high nibble); `{w}.scales` and `{w}.zeros` float
  [out, in/group]; W ~= (q - zeros) * scales per group of `group` input columns (asymmetric,
  q in 0..15).
* low-rank factors: `{w}.svd_u` float [out, r] and `{w}.svd_v` float [r, in]; W ~= svd_u @ svd_v,
  served as two matmuls (never reconstructed densely).
* AWQ input scale (optional, with int8/int4): `{w}.input_scale` float [in]; the layer computes
  Wq @ (x / input_scale), i.e. the effective weight is dequant(qweight) / input_scale[None, :].
* 2:4 sparsity metadata (optional, dense storage): `{w}.nm_index` uint8 [out, ceil(in/8)]; one
  nibble per group of 4 input columns (low nibble first) holding the positions i0 | i1 << 2 of its
  two kept weights. Serving ignores it; it is there for sparse GPU kernels.

`{w}` is the weight name without the `.weight` suffix, e.g. `model.layers.0.self_attn.q_proj`.
Imports only torch: it runs on a GPU box without the rest of the platform.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.common.errors import InvalidArgument

QUANT_METHODS = ("int8", "int4")
# Linear weights inside the decoder blocks; embeddings, norms and lm_head stay dense.
QUANTIZABLE_SUFFIXES = (
    "q_proj.weight",
    "k_proj.weight",
    "v_proj.weight",
    "o_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
)


# --------------------------------------------------------------------------- quantize


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns (qweight int8 [out,in], scales fp32 [out])."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return qweight.float() * scales.float()[:, None]


def int4_params(group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zeros) of asymmetric int4 over the last dim of `group` (the range always holds 0)."""
    w_min = group.amin(dim=-1).clamp(max=0.0)
    w_max = group.amax(dim=-1).clamp(min=0.0)
    scales = ((w_max - w_min) / 15.0).clamp(min=1e-8)
    return scales, torch.round(-w_min / scales).clamp(0, 15)


def int4_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest int4 codes 0..15 of `w` for broadcastable scales/zeros."""
    return torch.round(w / scales + zeros).clamp(0, 15)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [out, in] -> uint8 [out, in/2], the even column in the low nibble."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def quantize_int4(weight: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, ...]:
    """Asymmetric group-wise int4 (RTN): returns (qweight uint8 [out,in/2], scales, zeros [out,in/g])."""
    w = weight.detach().float()
    out_f, in_f = w.shape
    check_int4_shape(out_f, in_f, group_size)
    g = w.reshape(out_f, in_f // group_size, group_size)
    scales, zeros = int4_params(g)
    q = int4_codes(g, scales[..., None], zeros[..., None]).reshape(out_f, in_f)
    return pack_int4(q), scales, zeros


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] -> uint8 values 0..15 [out, in] (low nibble is the even column)."""
    low = qweight & 0x0F
    high = qweight >> 4
    return torch.stack((low, high), dim=-1).reshape(qweight.shape[0], qweight.shape[1] * 2)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    q = unpack_int4(qweight).float()
    out_f, in_f = q.shape
    groups = scales.shape[1]
    g = q.reshape(out_f, groups, in_f // groups)
    return ((g - zeros.float()[..., None]) * scales.float()[..., None]).reshape(out_f, in_f)


def check_int4_shape(out_f: int, in_f: int, group_size: int) -> None:
    if group_size <= 0 or group_size % 2:
        raise InvalidArgument(f"int4 group_size must be a positive even number, got {group_size}")
    if in_f % group_size:
        raise InvalidArgument(
            f"int4 needs in_features ({in_f}) divisible by group_size ({group_size}); pick a smaller group"
        )


def quantize_state_dict(
    tensors: Mapping[str, torch.Tensor],
    method: str,
    *,
    group_size: int = 128,
    suffixes: Sequence[str] = QUANTIZABLE_SUFFIXES,
) -> dict[str, torch.Tensor]:
    """Return a new state dict with every matching linear weight replaced by its quantized tensors."""
    if method not in QUANT_METHODS:
        raise InvalidArgument(f"unknown quantization method {method!r}; use one of {list(QUANT_METHODS)}")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not name.endswith(tuple(suffixes)) or tensor.dim() != 2:
            out[name] = tensor
            continue
        base = name[: -len(".weight")]
        if method == "int8":
            out[f"{base}.qweight"], out[f"{base}.scales"] = quantize_int8(tensor)
        else:
            q, s, z = quantize_int4(tensor, group_size)
            out[f"{base}.qweight"], out[f"{base}.scales"], out[f"{base}.zeros"] = q, s, z
    return out


# --------------------------------------------------------------------------- layers


class QuantLinear(nn.Module):
    """The one interface of every layer here: `forward(x)`, its feature sizes and its weight memory."""

    in_features: int
    out_features: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight_bytes(self) -> int:
        """Bytes the weights (and their scales) occupy, for memory budgeting."""
        raise NotImplementedError


class DenseLinear(QuantLinear):
    """A bias-free linear layer over a plain weight [out, in]."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def weight_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class Int8Linear(QuantLinear):
    """Weight-only int8: weights stay int8 in memory, activations keep the compute dtype."""

    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2 or scales.shape != qweight.shape[:1]:
            raise InvalidArgument(
                f"int8 weights need qweight int8 [out,in] and scales [out]; got {tuple(qweight.shape)} "
                f"{qweight.dtype} and {tuple(scales.shape)}"
            )
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.to(dtype))
        self.out_features, self.in_features = qweight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Scaling the output instead of the weight keeps the dequantized copy free of the scale
        # multiply: (x @ q^T) * s == x @ (q * s)^T for per-output-channel scales.
        return F.linear(x, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)

    def weight_bytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * self.scales.element_size()


class Int4Linear(QuantLinear):
    """Weight-only group-wise int4 (two values per byte); dequantized per call into the compute dtype."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        out_f, half_in = qweight.shape
        if qweight.dtype != torch.uint8 or scales.shape != zeros.shape or scales.shape[0] != out_f:
            raise InvalidArgument(
                f"int4 weights need qweight uint8 [out,in/2] and scales/zeros [out,in/group]; got "
                f"{tuple(qweight.shape)} {qweight.dtype}, {tuple(scales.shape)}, {tuple(zeros.shape)}"
            )
        check_int4_shape(out_f, half_in * 2, (half_in * 2) // scales.shape[1])
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.to(dtype))
        self.register_buffer("zeros", zeros.to(dtype))
        self.out_features, self.in_features = out_f, half_in * 2
        self.group_size = self.in_features // scales.shape[1]

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        q = unpack_int4(self.qweight).to(dtype)
        g = q.view(self.out_features, -1, self.group_size)
        w = (g - self.zeros.to(dtype)[..., None]) * self.scales.to(dtype)[..., None]
        return w.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype))

    def weight_bytes(self) -> int:
        return self.qweight.numel() + 2 * self.scales.numel() * self.scales.element_size()


class LowRankLinear(QuantLinear):
    """W ~= u @ v served as two matmuls: (x @ v^T) @ u^T costs r*(in+out) per token instead of in*out."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[0]:
            raise InvalidArgument(
                f"low-rank weights need svd_u [out,r] and svd_v [r,in]; got {tuple(u.shape)} and {tuple(v.shape)}"
            )
        self.u = nn.Parameter(u.to(dtype), requires_grad=False)
        self.v = nn.Parameter(v.to(dtype), requires_grad=False)
        self.out_features, self.in_features = u.shape[0], v.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.v), self.u)

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in (self.u, self.v))


class InputScaledLinear(QuantLinear):
    """AWQ's kept input scale: inner(x / input_scale), where inner holds the quantized W * input_scale."""

    input_scale: torch.Tensor

    def __init__(self, inner: QuantLinear, input_scale: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        if input_scale.shape != (inner.in_features,):
            raise InvalidArgument(
                f"input_scale must be [{inner.in_features}] (one per input feature), got {tuple(input_scale.shape)}"
            )
        self.inner = inner
        self.register_buffer("input_scale", input_scale.to(dtype))
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x / self.input_scale.to(x.dtype))

    def weight_bytes(self) -> int:
        return self.inner.weight_bytes() + self.input_scale.numel() * self.input_scale.element_size()


def make_linear(
    tensors: Mapping[str, torch.Tensor], base: str, *, dtype: torch.dtype, device: torch.device | str
) -> QuantLinear:
    """Build the right layer for `base` from whichever format the tensors hold."""
    layer = _make_inner(tensors, base, dtype=dtype, device=device)
    scale = tensors.get(f"{base}.input_scale")
    return layer if scale is None else InputScaledLinear(layer, scale.to(device), dtype)


def _make_inner(
    tensors: Mapping[str, torch.Tensor], base: str, *, dtype: torch.dtype, device: torch.device | str
) -> QuantLinear:
    if f"{base}.weight" in tensors:
        return DenseLinear(tensors[f"{base}.weight"].to(device=device, dtype=dtype))
    if f"{base}.svd_u" in tensors or f"{base}.svd_v" in tensors:
        u, v = tensors.get(f"{base}.svd_u"), tensors.get(f"{base}.svd_v")
        if u is None or v is None:
            raise InvalidArgument(f"low-rank weight {base} needs both {base}.svd_u and {base}.svd_v")
        return LowRankLinear(u.to(device), v.to(device), dtype)
    if f"{base}.qweight" not in tensors:
        raise InvalidArgument(
            f"checkpoint has no weight for {base} (expected {base}.weight, {base}.qweight or {base}.svd_u)"
        )
    q = tensors[f"{base}.qweight"].to(device)
    scales = tensors.get(f"{base}.scales")
    if scales is None:
        raise InvalidArgument(f"quantized weight {base}.qweight has no {base}.scales")
    if q.dtype == torch.int8:
        return Int8Linear(q, scales.to(device), dtype)
    zeros = tensors.get(f"{base}.zeros")
    if zeros is None:
        raise InvalidArgument(f"int4 weight {base}.qweight has no {base}.zeros")
    return Int4Linear(q, scales.to(device), zeros.to(device), dtype)


# Tensors that only describe a weight (never a weight themselves): dropped by dequantize_state_dict.
_FORMAT_SUFFIXES = (".qweight", ".scales", ".zeros", ".svd_u", ".svd_v", ".input_scale", ".nm_index")


def dense_weight(tensors: Mapping[str, torch.Tensor], base: str) -> torch.Tensor:
    """The float weight [out, in] that `base`'s stored format computes with (its exact reference)."""
    if f"{base}.weight" in tensors:
        w = tensors[f"{base}.weight"].float()
    elif f"{base}.svd_u" in tensors:
        w = tensors[f"{base}.svd_u"].float() @ tensors[f"{base}.svd_v"].float()
    elif tensors[f"{base}.qweight"].dtype == torch.int8:
        w = dequantize_int8(tensors[f"{base}.qweight"], tensors[f"{base}.scales"])
    else:
        w = dequantize_int4(tensors[f"{base}.qweight"], tensors[f"{base}.scales"], tensors[f"{base}.zeros"])
    scale = tensors.get(f"{base}.input_scale")
    return w if scale is None else w / scale.float()[None, :]


def dequantize_state_dict(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every stored format turned back into plain `{w}.weight` tensors: a state dict the training
    model loads, i.e. the reference a compressed checkpoint's served output must equal."""
    bases = {n.rsplit(".", 1)[0] for n in tensors if n.endswith((".qweight", ".svd_u"))}
    out = {n: t for n, t in tensors.items() if not n.endswith(_FORMAT_SUFFIXES)}
    out.update({f"{b}.weight": dense_weight(tensors, b) for b in bases})
    return out


def concat_linears(layers: Sequence[QuantLinear]) -> QuantLinear:
    """Fuse layers that read the same input into one (e.g. q/k/v): fewer kernel launches per step."""
    dense = [m for m in layers if isinstance(m, DenseLinear)]
    if len(dense) == len(layers):
        return DenseLinear(torch.cat([m.weight.data for m in dense], dim=0))
    int8 = [m for m in layers if isinstance(m, Int8Linear)]
    if len(int8) == len(layers):
        return Int8Linear(
            torch.cat([m.qweight for m in int8]), torch.cat([m.scales for m in int8]), int8[0].scales.dtype
        )
    int4 = [m for m in layers if isinstance(m, Int4Linear)]
    if len(int4) == len(layers) and len({m.group_size for m in int4}) == 1:
        return Int4Linear(
            torch.cat([m.qweight for m in int4]),
            torch.cat([m.scales for m in int4]),
            torch.cat([m.zeros for m in int4]),
            int4[0].scales.dtype,
        )
    return _Stacked(layers)


class _Stacked(QuantLinear):
    """Fallback fusion for mixed formats: run each layer and concatenate the outputs."""

    def __init__(self, layers: Sequence[QuantLinear]):
        super().__init__()
        self.parts = nn.ModuleList(layers)
        self.out_features = sum(m.out_features for m in layers)
        self.in_features = layers[0].in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.parts], dim=-1)

    def weight_bytes(self) -> int:
        # ModuleList yields plain Modules; __init__ only ever puts QuantLinears in it.
        return sum(cast(QuantLinear, m).weight_bytes() for m in self.parts)
