"""Process group, device and FSDP2 setup shared by every backend (torchrun-style environment)."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from tokenmill.common.model.transformer import Transformer


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool  # we created the process group (Ray creates its own)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def broadcast_str(value: str, d: Dist) -> str:
    """Broadcast a short ASCII string from rank 0 as a byte tensor (no pickling)."""
    buf = torch.zeros(128, dtype=torch.uint8, device=d.device)
    if d.is_main:
        raw = value.encode()[:128]
        buf[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    dist.broadcast(buf, 0)
    return bytes(buf.cpu().tolist()).rstrip(b"\0").decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from tokenmill.common.errors import FailedPrecondition

            raise FailedPrecondition("device 'cuda' requested but this worker has no CUDA device")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(requested_device: str, timeout_s: float = 600.0) -> Dist:
    """Join (or create) the default process group from RANK/WORLD_SIZE/MASTER_* (torchrun contract)."""
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    device = pick_device(requested_device, local_rank)
    owns = False
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
        owns = True
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)


def shard_model(
    model: Transformer, *, bf16: bool, compile_blocks: bool, reshard_after_forward: bool = True
) -> None:
    """FSDP2: one FSDP group per decoder block plus the root (embeddings, final norm, head).

    Per-block groups let the all-gather of block i+1 overlap block i's compute, and keep only one
    block unsharded at a time. On GPU, bf16 params/activations with fp32 gradient reduction.
    """
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    layers = model.model.layers
    if compile_blocks:
        _raise_recompile_limit(2 * len(layers) + 8)
    for i, layer in enumerate(layers):
        if compile_blocks:
            # Compile the block's forward only: FSDP2's hooks stay eager around it (no graph breaks
            # inside), and parameter names stay HF-compatible (no `_orig_mod` wrapper in the path).
            layer.forward = torch.compile(layer.forward)
        # The last block is resharded by the root right away; skip a redundant reshard/all-gather.
        fully_shard(layer, mp_policy=mp, reshard_after_forward=reshard_after_forward and i < len(layers) - 1)
    fully_shard(model, mp_policy=mp, reshard_after_forward=reshard_after_forward)


def _raise_recompile_limit(n: int) -> None:
    """Every block compiles the same code; make sure dynamo's per-code cache never falls back to eager."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed in newer torch; alias kept
        if hasattr(cfg, name):
            setattr(cfg, name, max(int(getattr(cfg, name)), n))
            return


def reshard_all(model: nn.Module) -> None:
    """Return every FSDP group to its sharded state. Needed after a no-grad forward (evaluation):
    groups that skip resharding after forward (the last block) otherwise stay unsharded, and their
    module parameters are then plain full tensors instead of the DTensor shards the optimizer owns."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def set_grad_sync(model: nn.Module, enabled: bool) -> None:
    """Skip gradient reduce-scatter on non-final micro-batches of an accumulation (FSDP2 API)."""
    fn = getattr(model, "set_requires_gradient_sync", None)
    if fn is not None:
        fn(enabled)


def memory_bytes(device: torch.device) -> int:
    """Peak device memory on GPU, current RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover
        return 0
