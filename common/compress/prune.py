"""Score-based pruning of one linear layer: magnitude, Wanda, and their 2:4 semi-structured form.

Magnitude (unstructured) prunes the smallest |W| over the whole layer; Wanda (Sun et al. 2023,
locuslab/wanda) scores |W_ij| * ||x_j|| and prunes per output row. Either score can drive a 2:4
pattern: in every group of 4 consecutive input columns of a row the 2 lowest scores are pruned.
"""

from __future__ import annotations

import torch


def keep_mask(score: torch.Tensor, sparsity: float, pattern: str, *, per_row: bool) -> torch.Tensor:
    """Bool [out, in], True where the weight stays: the lowest-scored fraction (or 2 of every 4) goes."""
    out_f, in_f = score.shape
    if pattern == "2:4":
        groups = score.reshape(out_f, in_f // 4, 4)
        drop = torch.zeros_like(groups, dtype=torch.bool)
        drop.scatter_(2, torch.topk(groups, 2, dim=2, largest=False).indices, True)
        return ~drop.reshape(out_f, in_f)
    drop = torch.zeros_like(score, dtype=torch.bool)
    if per_row:
        k = int(in_f * sparsity)
        if k:
            drop.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
    else:
        k = int(score.numel() * sparsity)
        if k:
            drop.view(-1)[torch.topk(score.flatten(), k, largest=False).indices] = True
    return ~drop


def magnitude_prune(weight: torch.Tensor, sparsity: float, pattern: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned weight, keep mask) by |W|, per layer (unstructured) or per group of 4 (2:4)."""
    w = weight.detach().float()
    mask = keep_mask(w.abs(), sparsity, pattern, per_row=False)
    return w * mask, mask


def wanda_prune(
    weight: torch.Tensor, input_sq_norms: torch.Tensor, sparsity: float, pattern: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned weight, keep mask) by |W| * ||x_j||, where input_sq_norms[j] = sum over tokens of x_j^2."""
    w = weight.detach().float()
    score = w.abs() * input_sq_norms.float().clamp(min=0).sqrt()[None, :]
    mask = keep_mask(score, sparsity, pattern, per_row=True)
    return w * mask, mask


def pack_nm_index(mask: torch.Tensor) -> torch.Tensor:
    """A 2:4 keep mask [out, in] -> uint8 [out, ceil(in/8)]: per group of 4 one nibble i0 | i1 << 2
    (the two kept positions, ascending), low nibble first: 2:4 metadata for sparse kernels."""
    out_f, in_f = mask.shape
    groups = mask.reshape(out_f, in_f // 4, 4)
    pos = torch.sort(torch.topk(groups.float(), 2, dim=2).indices, dim=2).values.to(torch.uint8)
    nibbles = pos[..., 0] | (pos[..., 1] << 2)
    if nibbles.shape[1] % 2:
        nibbles = torch.cat([nibbles, torch.zeros(out_f, 1, dtype=torch.uint8, device=mask.device)], dim=1)
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous()


def unpack_nm_index(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 [out, ceil(in/8)] -> the 2:4 keep mask bool [out, in]."""
    nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)
    nibbles = nibbles[:, : in_features // 4].long()
    mask = torch.zeros(packed.shape[0], in_features // 4, 4, dtype=torch.bool, device=packed.device)
    mask.scatter_(2, torch.stack((nibbles & 3, nibbles >> 2), dim=-1), True)
    return mask.reshape(packed.shape[0], in_features)
