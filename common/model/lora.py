"""LoRA adapters for the shared model (training and serving).

A targeted ``nn.Linear`` is replaced by :class:`LoRALinear`, which keeps the frozen base weight under
the same name (``...q_proj.weight``, so base checkpoints still load) and adds ``lora_A`` [r, in] and
``lora_B`` [out, r] (PEFT's layout and names): y = x Wᵀ + (alpha / r) · B(A(dropout(x))).
B starts at zero, so an adapted model equals its base until trained. Adapter tensors are saved on
their own (``adapter_state_dict``) together with a PEFT-style ``adapter_config`` dict.

Only torch is imported: inference imports this module to serve adapters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A linear layer (frozen weight and, where the family has one, e.g. Qwen2's q/k/v, its frozen
    bias under the same name) plus a low-rank trainable update."""

    in_features: int
    out_features: int
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_A: nn.Linear
    lora_B: nn.Linear
    dropout: nn.Module
    scaling: float

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = self.alpha / rank
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=base.weight.device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """(alpha/r) · B @ A, the update that merging adds to the base weight."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling


def apply_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: float,
    target_modules: Iterable[str] = ("q_proj", "v_proj"),
    dropout: float = 0.0,
    freeze_base: bool = True,
) -> list[str]:
    """Wrap every linear whose attribute name is in ``target_modules``; returns their qualified names.

    With ``freeze_base`` every non-adapter parameter stops requiring grad, so only adapters train.
    """
    targets = set(target_modules)
    unknown = targets - set(LORA_TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA target modules {sorted(unknown)}; choose from {list(LORA_TARGETS)}")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    wrapped: list[str] = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(parent, child_name, LoRALinear(child, rank, alpha, dropout))
                wrapped.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    if not wrapped:
        raise ValueError(f"no linear layer named any of {sorted(targets)} in the model")
    return wrapped


def is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, keyed ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``."""
    return {k: v for k, v in model.state_dict().items() if is_lora_param(k)}


def load_adapter(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy adapter tensors into an already-wrapped model; names and shapes must match exactly."""
    own = adapter_state_dict(model)
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or extra:
        raise ValueError(f"adapter mismatch: missing {missing[:4]}, unexpected {extra[:4]}")
    with torch.no_grad():
        for name, target in own.items():
            if target.shape != tensors[name].shape:
                raise ValueError(
                    f"adapter {name}: shape {tuple(tensors[name].shape)} != {tuple(target.shape)}"
                )
            target.copy_(tensors[name])


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight and restore plain ``nn.Linear`` modules (for export or
    serving without adapter overhead). Returns the number of merged layers."""
    merged = 0
    for _parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                linear = nn.Linear(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    device=child.weight.device,
                    dtype=child.weight.dtype,
                )
                with torch.no_grad():
                    linear.weight.copy_(child.weight + child.delta_weight().to(child.weight.dtype))
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(parent, child_name, linear)
                merged += 1
    return merged


def adapter_config(
    rank: int, alpha: float, target_modules: Iterable[str], dropout: float = 0.0
) -> dict[str, Any]:
    """PEFT-compatible ``adapter_config.json`` body."""
    return {
        "peft_type": "LORA",
        "r": int(rank),
        "lora_alpha": float(alpha),
        "target_modules": sorted(set(target_modules)),
        "lora_dropout": float(dropout),
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
