"""LoRA adapters served per request on a shared base model (multi-LoRA batching).

An adapter is a set of low-rank pairs for some of the base linear layers: for a base weight
`model.layers.{i}.{self_attn|mlp}.{target}.weight` the adapter holds `...{target}.lora_A.weight`
[r, in] and `...{target}.lora_B.weight` [out, r] (PEFT names, an optional `base_model.model.`
prefix is stripped) and a scale alpha/r. Rows of a batch that use an adapter get
`x @ A^T @ B^T * scale` added to the base layer's output; rows of different adapters are handled
group by group, so one step can mix any number of adapters and the base model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from tokenmill.common.errors import InvalidArgument

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_NAME = re.compile(
    r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.weight)?$"
)


@dataclass
class LoraAdapter:
    name: str
    rank: int
    scale: float
    # (layer, target) -> (A [r, in], B [out, r])
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def from_tensors(
        cls,
        name: str,
        tensors: Mapping[str, torch.Tensor],
        *,
        alpha: float | None = None,
        rank: int | None = None,
        dtype: torch.dtype,
        device,
        base_shapes: Mapping[str, tuple[int, int]] | None = None,
    ) -> LoraAdapter:
        pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            m = _NAME.match(key)
            if not m:
                continue
            layer, target, ab = int(m.group(1)), m.group(2), m.group(3)
            if target not in TARGETS:
                raise InvalidArgument(
                    f"adapter {name!r}: LoRA on {target!r} is not supported (targets {TARGETS})"
                )
            pairs.setdefault((layer, target), {})[ab] = t
        if not pairs:
            raise InvalidArgument(
                f"adapter {name!r} has no LoRA tensors (expected '*.lora_A.weight'/'*.lora_B.weight')"
            )
        weights = {}
        ranks = set()
        for (layer, target), ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise InvalidArgument(f"adapter {name!r}: layer {layer} {target} lacks lora_A or lora_B")
            a, b = ab["A"], ab["B"]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise InvalidArgument(
                    f"adapter {name!r}: layer {layer} {target} has A {tuple(a.shape)} and B {tuple(b.shape)}; "
                    "need A [r, in] and B [out, r]"
                )
            if base_shapes is not None:
                want = base_shapes.get(target)
                if want is not None and (b.shape[0], a.shape[1]) != want:
                    raise InvalidArgument(
                        f"adapter {name!r} does not fit this base model: {target} is {want} but the adapter "
                        f"gives {(b.shape[0], a.shape[1])}"
                    )
            ranks.add(a.shape[0])
            weights[(layer, target)] = (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
        r = rank or max(ranks)
        scale = (alpha if alpha is not None else r) / r
        return cls(name=name, rank=r, scale=float(scale), weights=weights)


class LoraBatch:
    """The adapters used by one step and which token rows use each."""

    def __init__(
        self, groups: list[tuple[LoraAdapter, torch.Tensor]], out_slices: dict[str, tuple[int, int]]
    ):
        self.groups = groups  # (adapter, row indices)
        self.out_slices = out_slices  # target -> (start, end) in its fused layer's output

    def apply(self, out: torch.Tensor, x: torch.Tensor, layer: int, targets: tuple[str, ...]) -> None:
        for adapter, rows in self.groups:
            xr = None
            for target in targets:
                ab = adapter.weights.get((layer, target))
                if ab is None:
                    continue
                if xr is None:
                    xr = x[rows]
                a, b = ab
                start, end = self.out_slices[target]
                delta = (xr @ a.t()) @ b.t() * adapter.scale
                out[rows, start:end] += delta
