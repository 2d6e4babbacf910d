"""Calibration statistics of each linear layer's inputs, block by block (as GPTQ does).

The inputs of block i are the outputs of blocks 0..i-1 *after* they were compressed, so each block
is compressed against the activations it will really see. Per linear we keep what the methods read:
the Hessian (GPTQ, SparseGPT), per-feature sums of x^2 (Wanda) and |x| (AWQ), and a fixed sample
of input rows for AWQ's scale search and for measuring output reconstruction error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from tokenmill.common.model.transformer import Transformer

SAMPLE_ROWS = 1024  # input rows kept per linear for AWQ and error measurement


@dataclass
class InputStats:
    """Running statistics of the rows x [in] fed to one linear layer."""

    in_features: int
    with_hessian: bool
    rows_per_batch: int
    device: torch.device = torch.device("cpu")  # where the layer runs: the sums stay beside it
    n: int = 0
    xtx: torch.Tensor | None = None
    sq_sum: torch.Tensor = field(init=False)
    abs_sum: torch.Tensor = field(init=False)
    rows: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sq_sum = torch.zeros(self.in_features, device=self.device)
        self.abs_sum = torch.zeros(self.in_features, device=self.device)
        if self.with_hessian:
            self.xtx = torch.zeros(self.in_features, self.in_features, device=self.device)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.in_features).float()
        self.n += x.shape[0]
        self.sq_sum += (x * x).sum(0)
        self.abs_sum += x.abs().sum(0)
        if self.xtx is not None:
            self.xtx += x.t() @ x
        step = max(1, x.shape[0] // self.rows_per_batch)
        self.rows.append(x[::step][: self.rows_per_batch].clone())

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2/n * sum x x^T (GPTQ's normalisation; the scale cancels in every update)."""
        assert self.xtx is not None, "statistics were collected without the Hessian"
        return self.xtx * (2.0 / max(self.n, 1))

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.n, 1)

    @property
    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows)


def output_error(weight: torch.Tensor, approx: torch.Tensor, sample: torch.Tensor) -> float:
    """||x (W - W')^T|| / ||x W^T|| over the sampled input rows."""
    ref = sample @ weight.float().t()
    diff = sample @ (weight.float() - approx.float()).t()
    return float(diff.norm() / ref.norm().clamp(min=1e-12))


# Linears of a block that read the same tensor: their input statistics are one and the same.
SHARED_INPUTS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("mlp.gate_proj", "mlp.up_proj"),
)


def capture(
    block: nn.Module,
    inputs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    names: Sequence[str],
    *,
    with_hessian: bool,
) -> dict[str, InputStats]:
    """Run `block` over (x, cos, sin) inputs and collect InputStats for its submodules `names`."""
    rows = max(1, SAMPLE_ROWS // max(len(inputs), 1))
    stats: dict[str, InputStats] = {}
    handles = []
    for name in names:
        group = next((g for g in SHARED_INPUTS if name in g), (name,))
        shared = next((stats[m] for m in group if m in stats), None)
        if shared is not None:  # q/k/v (gate/up) read the same input: one Hessian serves them all
            stats[name] = shared
            continue
        mod = block.get_submodule(name)
        assert isinstance(mod, nn.Linear)
        stats[name] = InputStats(mod.in_features, with_hessian, rows, mod.weight.device)
        handles.append(mod.register_forward_pre_hook(_recorder(stats[name])))
    try:
        with torch.no_grad():
            for x, cos, sin in inputs:
                block(x, cos, sin)
    finally:
        for h in handles:
            h.remove()
    return stats


def _recorder(stats: InputStats) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        stats.add(args[0])

    return hook


def blocks_with_inputs(
    model: Transformer, batches: Sequence[torch.Tensor]
) -> Iterator[tuple[int, nn.Module, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]]:
    """Yield (index, block, its inputs); after the caller compressed the block in place, its outputs
    (computed with the compressed weights) become the next block's inputs."""
    with torch.no_grad():
        inputs = []
        for ids in batches:
            x = model.model.embed_tokens(ids)
            cos, sin = model.rope(torch.arange(ids.shape[1], device=ids.device), x.dtype)
            inputs.append((x, cos, sin))
    for i, block in enumerate(model.model.layers):
        yield i, block, inputs
        with torch.no_grad():
            inputs = [(block(x, cos, sin), cos, sin) for x, cos, sin in inputs]
