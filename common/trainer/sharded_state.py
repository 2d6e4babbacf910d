"""Save and load FSDP2-sharded model and optimizer state without gathering on any rank.

FSDP2 shards every parameter on dim 0 with ``torch.chunk`` semantics: rank r owns rows
``[r*c, min((r+1)*c, n))`` with ``c = ceil(n / world)``. Each rank writes exactly those rows (the local
tensor of the DTensor) and, on load, reads exactly the rows its *current* world size gives it, from any
pieces that overlap. Names: model weights use HF names; AdamW moments use ``optim.exp_avg.<name>`` /
``optim.exp_avg_sq.<name>``; per-rank RNG state ``rng.cpu.rank<r>`` (and ``rng.cuda.rank<r>``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.common.checkpoint.format import Layout, piece_name
from tokenmill.common.checkpoint.manifest import ShardInfo
from tokenmill.common.errors import FailedPrecondition
from tokenmill.common.trainer.checkpoint_io import CheckpointIO, read_tensor

try:  # public since torch 2.5
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    from torch.distributed._tensor import DTensor

OPTIM_KEYS = ("exp_avg", "exp_avg_sq")


def local_rows(t: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, int, list[int]]:
    """(local tensor, first global row, global shape) of a dim-0-sharded DTensor or a plain tensor."""
    if isinstance(t, DTensor):
        local = t.to_local()
        n = t.shape[0]
        chunk = -(-n // world)
        return local, min(rank * chunk, n), list(t.shape)
    return t, 0, list(t.shape)


def collect_pieces(
    named: dict[str, torch.Tensor], rank: int, world: int
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """This rank's pieces of ``named`` tensors (empty shards are skipped) plus their ShardInfo."""
    tensors: dict[str, torch.Tensor] = {}
    shards: dict[str, dict[str, Any]] = {}
    for name, t in named.items():
        local, start, gshape = local_rows(t, rank, world)
        if local.dim() and local.shape[0] == 0:
            continue
        if not isinstance(t, DTensor) and rank != 0:
            continue  # replicated: rank 0 writes it once
        offsets = [start] + [0] * (len(gshape) - 1)
        key = piece_name(name, offsets)
        tensors[key] = local.detach()
        shards[key] = ShardInfo(name, gshape, offsets).to_json()
    return tensors, shards


def model_tensors(model: nn.Module, *, only: str | None = None) -> dict[str, torch.Tensor]:
    """Parameters by HF name (tied weights once); ``only="lora"`` keeps adapter tensors only."""
    out = {}
    for name, p in model.named_parameters():
        if only == "lora" and ".lora_" not in name:
            continue
        out[name] = p.detach()
    return out


def optimizer_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], int]:
    """AdamW moments by ``optim.<key>.<param name>`` and the (shared) step count."""
    out: dict[str, torch.Tensor] = {}
    step = 0
    for name, p in model.named_parameters():
        state = optimizer.state.get(p)
        if not state:
            continue
        for key in OPTIM_KEYS:
            out[f"optim.{key}.{name}"] = state[key]
        step = int(state["step"].item()) if torch.is_tensor(state["step"]) else int(state["step"])
    return out, step


def has_optimizer_state(layout: Layout, model: nn.Module) -> bool:
    """Whether a checkpoint holds the AdamW moments of every trainable parameter (a final
    checkpoint holds weights only)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return all(f"optim.{key}.{n}" in layout for n in names for key in OPTIM_KEYS)


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Materialise AdamW state with an lr=0 step on zero grads (changes no parameter: both the update
    and decoupled weight decay scale with lr), so loaded values can be copied into it in place."""
    saved = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, saved, strict=True):
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def load_into(
    io: CheckpointIO, ref: str, layout: Layout, targets: dict[str, torch.Tensor], rank: int, world: int
) -> None:
    """Copy this rank's rows of each logical tensor in ``targets`` (DTensor or plain) from ``ref``."""
    for name, t in targets.items():
        local, start, gshape = local_rows(t, rank, world)
        pieces = layout.get(name)
        if not pieces:
            raise KeyError(name)
        if list(pieces[0].global_shape) != gshape:
            raise FailedPrecondition(
                f"checkpoint {ref}: {name} has shape {list(pieces[0].global_shape)}, the model expects {gshape}; "
                "the model config differs from the checkpoint's"
            )
        if local.dim() and local.shape[0] == 0:
            continue
        rows = [slice(start, start + local.shape[0])] if local.dim() else []
        data = read_tensor(io, ref, layout, name, rows)
        local.copy_(data.reshape(local.shape).to(local.dtype))


def load_optimizer(
    io: CheckpointIO,
    ref: str,
    layout: Layout,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    rank: int,
    world: int,
) -> None:
    init_optimizer_state(optimizer)
    targets: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        state = optimizer.state.get(p)
        if not state:
            continue
        for key in OPTIM_KEYS:
            targets[f"optim.{key}.{name}"] = state[key]
        with torch.no_grad():
            state["step"].fill_(float(step)) if torch.is_tensor(state["step"]) else state.__setitem__(
                "step", step
            )
    load_into(io, ref, layout, targets, rank, world)
