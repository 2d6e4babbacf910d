"""LoRA adapters served per request on a shared base model (multi-LoRA batching).

An adapter is a set of low-rank pairs for some of the base linear layers: for a base weight
`model.layers.{i}.{self_attn|mlp}.{target}.weight` the adapter holds `...{target}.lora_A.weight`
[r, in] and `...{target}.lora_B.weight` [out, r] (PEFT names, an optional `base_model.model.`
prefix is stripped) and a scale alpha/r. Rows of a batch that use an adapter get
`x @ A^T @ B^T * scale` added to the base layer's output; rows of different adapters are handled
group by group, so one step can mix any number of adapters and the base model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenmill.common.errors import InvalidArgument

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_NAME = re.compile(
    r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.weight)?$"
)
# Adapter tensors of PEFT features the engine does not apply: served without them, the adapter's
# output would be silently wrong, so they are refused by name.
_UNSERVED = re.compile(r"\.lora_|lora_magnitude_vector|modules_to_save|lora_embedding_")
_TRAINING_STATE = ("optim.", "optimizer.", "rng.")  # a trainer checkpoint's own state, not weights


@dataclass(frozen=True)
class PeftScaling:
    """How PEFT scales each LoRA pair (adapter_config.json): `lora_alpha / r`, or `/ sqrt(r)`
    with `use_rslora`, where `rank_pattern` / `alpha_pattern` override r and alpha per module
    (keys matched against the module's name as PEFT matches them)."""

    alpha: float | None = None
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any]) -> PeftScaling:
        """INVALID_ARGUMENT naming the field for what the engine cannot serve exactly."""
        unsupported = {
            "use_dora": config.get("use_dora"),
            "fan_in_fan_out": config.get("fan_in_fan_out"),
            "bias": config.get("bias") not in (None, "none") and config.get("bias"),
            "modules_to_save": config.get("modules_to_save"),
        }
        bad = {k: v for k, v in unsupported.items() if v}
        if bad:
            field_name, value = next(iter(bad.items()))
            raise InvalidArgument(
                f"adapter {name!r}: adapter_config.json sets {field_name}={value!r}, which the engine does "
                "not serve (plain LoRA on q/k/v/o/gate/up/down only); merge the adapter into its base instead"
            )
        alpha = config.get("lora_alpha")
        return cls(
            alpha=None if alpha is None else float(alpha),
            use_rslora=bool(config.get("use_rslora")),
            rank_pattern=dict(config.get("rank_pattern") or {}),
            alpha_pattern=dict(config.get("alpha_pattern") or {}),
        )

    def scale(self, module: str, rank: int) -> float:
        """The scale of the pair on `module` (e.g. 'model.layers.0.self_attn.q_proj') of `rank`."""
        alpha = _pattern(self.alpha_pattern, module)
        alpha = float(alpha) if alpha is not None else (self.alpha if self.alpha is not None else rank)
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)


def _pattern(patterns: Mapping[str, Any], module: str) -> Any:
    """PEFT's lookup: the first key that matches the end of the module's dotted name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return None


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
        scaling: PeftScaling | None = None,
    ) -> LoraAdapter:
        """`alpha`/`rank` (one scale alpha/rank for every pair) or `scaling` (PEFT's per-module
        rules, adapter_config.json); tensors of PEFT features not served are INVALID_ARGUMENT."""
        pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            m = _NAME.match(key)
            if not m:
                if _UNSERVED.search(key) and not key.startswith(_TRAINING_STATE):
                    raise InvalidArgument(
                        f"adapter {name!r} holds {key!r}, which the engine cannot apply (plain LoRA pairs on "
                        f"{', '.join(TARGETS)} of the decoder layers only); merge the adapter into its base instead"
                    )
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
        if scaling is None:
            scale = (alpha if alpha is not None else r) / r
            return cls(name=name, rank=r, scale=float(scale), weights=weights)
        # Per-module scales are folded into B, so a step applies one scale per adapter.
        for (layer, target), (a, b) in weights.items():
            kind = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            pair_scale = scaling.scale(f"model.layers.{layer}.{kind}.{target}", a.shape[0])
            weights[(layer, target)] = (a, b * pair_scale)
        return cls(name=name, rank=r, scale=1.0, weights=weights)


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
