"""What to compress and how (`MethodSpec`), and what comes back (`CompressedResult`, `Progress`).

The engine's whole vocabulary lives here so the service, the CLI and the benchmark build and read
the same objects; `MethodSpec.from_dict` is the one place a request's settings are checked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenmill.common.errors import InvalidArgument

QUANT_METHODS = ("int8", "int4-rtn", "int4-gptq", "int4-awq")
PRUNE_METHODS = ("prune-magnitude", "prune-wanda", "prune-sparsegpt")
LOWRANK_METHODS = ("svd",)
METHODS = QUANT_METHODS + PRUNE_METHODS + LOWRANK_METHODS
CALIBRATED = ("int4-gptq", "int4-awq", "prune-wanda", "prune-sparsegpt")
PATTERNS = ("unstructured", "2:4")


def family_of(method: str) -> str:
    """ "quant", "prune" or "lowrank" for one of METHODS."""
    if method in QUANT_METHODS:
        return "quant"
    return "prune" if method in PRUNE_METHODS else "lowrank"


@dataclass(frozen=True)
class MethodSpec:
    """One compression step. Fields a method does not read are ignored (and left at defaults).

    keep_dense: fnmatch patterns over linear names (e.g. "model.layers.0.*", "*.down_proj") that
    this step leaves untouched.
    """

    method: str
    group_size: int = 128  # int4 family
    act_order: bool = False  # GPTQ: process columns by decreasing Hessian diagonal
    damp: float = 0.01  # GPTQ / SparseGPT: fraction of mean diag(H) added to the diagonal
    block_size: int = 128  # GPTQ / SparseGPT lazy-batch width
    awq_grid: int = 20  # AWQ: scale exponents tried, alpha in {0, 1/n, ..., (n-1)/n}
    sparsity: float = 0.5  # pruning, unstructured pattern
    pattern: str = "unstructured"  # pruning: "unstructured" or "2:4"
    rank: int | None = None  # SVD: exactly one of rank, rank_fraction, energy
    rank_fraction: float | None = None
    energy: float | None = None
    keep_dense: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.validate()

    @property
    def calibrated(self) -> bool:
        return self.method in CALIBRATED

    @property
    def family(self) -> str:
        """ "quant", "prune" or "lowrank": what the step leaves behind decides what may follow it."""
        return family_of(self.method)

    def validate(self) -> None:
        """InvalidArgument naming the field of any setting no method could run with."""
        if self.method not in METHODS:
            raise InvalidArgument(f"unknown compression method {self.method!r}; use one of {list(METHODS)}")
        if self.group_size <= 0 or self.group_size % 2:
            raise InvalidArgument(f"group_size must be a positive even number, got {self.group_size}")
        if not 0.0 <= self.damp < 1.0:
            raise InvalidArgument(f"damp must be in [0, 1), got {self.damp}")
        if self.block_size <= 0 or self.awq_grid <= 0:
            raise InvalidArgument("block_size and awq_grid must be positive")
        if self.pattern == "2:4" and self.block_size % 4:
            raise InvalidArgument(f"2:4 pruning needs block_size divisible by 4, got {self.block_size}")
        if self.pattern not in PATTERNS:
            raise InvalidArgument(f"unknown sparsity pattern {self.pattern!r}; use one of {list(PATTERNS)}")
        if not 0.0 <= self.sparsity < 1.0:
            raise InvalidArgument(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.method in LOWRANK_METHODS:
            self._validate_rank()

    def _validate_rank(self) -> None:
        given = [n for n in ("rank", "rank_fraction", "energy") if getattr(self, n) is not None]
        if len(given) != 1:
            raise InvalidArgument(
                f"svd needs exactly one of rank, rank_fraction, energy; got {given or 'none'}"
            )
        if self.rank is not None and self.rank <= 0:
            raise InvalidArgument(f"svd rank must be positive, got {self.rank}")
        for name in ("rank_fraction", "energy"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise InvalidArgument(f"svd {name} must be in (0, 1], got {value}")

    def to_dict(self) -> dict[str, Any]:
        """The settings recorded in the result's manifest (only those the method reads)."""
        keys = {"method", "keep_dense"}
        keys |= {
            "int8": set(),
            "int4-rtn": {"group_size"},
            "int4-gptq": {"group_size", "act_order", "damp", "block_size"},
            "int4-awq": {"group_size", "awq_grid"},
            "prune-magnitude": {"sparsity", "pattern"},
            "prune-wanda": {"sparsity", "pattern"},
            "prune-sparsegpt": {"sparsity", "pattern", "damp", "block_size"},
            "svd": {"rank", "rank_fraction", "energy"},
        }[self.method]
        body = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in body.items() if k in keys}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MethodSpec:
        """Build from request settings; unknown keys are an InvalidArgument that lists the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidArgument(f"unknown compression setting(s) {unknown}; known: {sorted(known)}")
        body = dict(data)
        if "keep_dense" in body:
            body["keep_dense"] = tuple(body["keep_dense"])
        try:
            return cls(**body)
        except TypeError as exc:
            raise InvalidArgument(f"bad compression settings: {exc}") from None


@dataclass(frozen=True)
class Progress:
    """One finished linear layer: `index` of `total` (1-based) and its relative reconstruction error."""

    step: int  # which MethodSpec of a composition (0-based)
    method: str
    index: int
    total: int
    layer: str
    error: float


ProgressCallback = Callable[[Progress], None]


@dataclass
class CompressedResult:
    """The compressed checkpoint tensors plus what the manifest and the report need.

    per_layer_errors: {linear name: {method: relative reconstruction error of that step}}; calibrated
    methods give the output error ||(W - W')X|| / ||WX|| on calibration rows, the others the weight
    error ||W - W'|| / ||W|| (each step against its own input, so a composition shows both).
    sparsity: fraction of exact zeros over the compressed linears' weights (None for no pruning).
    notes: what the caller should know that is not an error (e.g. layers an SVD step left dense).
    """

    tensors: dict[str, torch.Tensor]
    manifest_meta: dict[str, Any]
    per_layer_errors: dict[str, dict[str, float]] = field(default_factory=dict)
    sparsity: float | None = None
    bytes_before: int = 0
    bytes_after: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else 0.0
