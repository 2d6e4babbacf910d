"""GPTQ (Frantar et al. 2022) and SparseGPT (Frantar & Alistarh 2023) for one linear layer.

Both walk the columns of W in order, turn each into its compressed value (an int4 code or a zero),
and spread the error over the columns not yet processed through the inverse Hessian's Cholesky
factor; updates are applied lazily per block of `block_size` columns as in the papers (and the
reference code, IST-DASLab/gptq and /sparsegpt). H = 2/n * sum x x^T over calibration inputs.
"""

from __future__ import annotations

import torch

from tokenmill.common.errors import FailedPrecondition
from tokenmill.common.model.quant import int4_codes, int4_params


def prepare_hessian(
    weight: torch.Tensor, hessian: torch.Tensor, damp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W with dead inputs zeroed, upper Cholesky factor of H^-1 after damping), both float32.

    A dead input (diag(H) == 0: never active in calibration) gets H_ii = 1 so H stays invertible.
    """
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += damp * torch.mean(torch.diag(h))
    try:
        chol = torch.linalg.cholesky(h)
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    except torch.linalg.LinAlgError:
        raise FailedPrecondition(
            "the calibration Hessian is not positive definite even after damping; raise damp or use "
            "more calibration data"
        ) from None
    return w, hinv


def gptq_int4(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    group_size: int,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ int4: (codes 0..15 [out, in] in the original column order, scales, zeros [out, in/g]).

    Groups are the contiguous input columns of the int4 format. Without act-order a group's
    scale/zero is set when the walk reaches its first column, from the weights as updated up to
    the current lazy block (as the reference code does); with
    act-order the columns are visited by decreasing diag(H) and the group parameters are fixed up
    front from the original weights ("static groups"), so the stored layout needs no g_idx.
    """
    in_f = weight.shape[1]
    perm = (
        torch.argsort(torch.diag(hessian.float()), descending=True)
        if act_order
        else torch.arange(in_f, device=weight.device)
    )
    w, hinv = prepare_hessian(weight[:, perm], hessian.float()[perm][:, perm], damp)
    out_f, n_groups = w.shape[0], in_f // group_size
    scales = torch.zeros(out_f, n_groups, device=w.device)
    zeros = torch.zeros(out_f, n_groups, device=w.device)
    if act_order:
        original = w[:, torch.argsort(perm)]
        scales, zeros = int4_params(original.view(out_f, n_groups, group_size))
    codes = torch.zeros_like(w)
    order = perm.tolist()  # one transfer, not one per column, when the walk runs on a GPU
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = order[i1 + i]
            g = col // group_size
            if not act_order and col % group_size == 0:
                # As the reference: the group's global columns, updated up to this block's start.
                scales[:, g], zeros[:, g] = int4_params(w[:, col : col + group_size])
            q = int4_codes(w1[:, i], scales[:, g], zeros[:, g])
            codes[:, i1 + i] = q
            deq = (q - zeros[:, g]) * scales[:, g]
            err = (w1[:, i] - deq) / hinv1[i, i]
            w1[:, i:] -= err[:, None] @ hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes[:, torch.argsort(perm)], scales, zeros


def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float,
    pattern: str,
    damp: float = 0.01,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT: (pruned and error-compensated weight [out, in], keep mask bool [out, in]).

    Unstructured: per block, the `sparsity` fraction with the least w^2 / [H^-1]_ii^2 is pruned.
    2:4: in every group of 4 columns the 2 least by the same score are pruned, row by row.
    """
    w, hinv = prepare_hessian(weight, hessian, damp)
    out_f, in_f = w.shape
    prune = torch.zeros(out_f, in_f, dtype=torch.bool, device=w.device)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        if pattern == "unstructured":
            score = w1**2 / d[None, :] ** 2
            k = int(score.numel() * sparsity)
            if k:
                mask1.view(-1)[torch.topk(score.flatten(), k, largest=False).indices] = True
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            if pattern == "2:4" and i % 4 == 0:
                score = w1[:, i : i + 4] ** 2 / d[i : i + 4][None, :] ** 2
                mask1.scatter_(1, i + torch.topk(score, 2, dim=1, largest=False).indices, True)
            q = torch.where(mask1[:, i], torch.zeros_like(w1[:, i]), w1[:, i])
            err = (w1[:, i] - q) / hinv1[i, i]
            w1[:, i:] -= err[:, None] @ hinv1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        prune[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    w[prune] = 0.0
    return w, ~prune
