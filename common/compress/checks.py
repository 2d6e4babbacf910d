"""Everything that can be known wrong before any work starts, each with a message a person can act on."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tokenmill.common.compress.spec import METHODS, PRUNE_METHODS, MethodSpec, family_of
from tokenmill.common.errors import FailedPrecondition, InvalidArgument, TokenmillError
from tokenmill.common.model.quant import QUANTIZABLE_SUFFIXES

MIN_CALIBRATION_TOKENS = 128
# What a step leaves behind -> the methods that may follow it, and why the others may not.
_AFTER_PRUNE = ("int8", "int4-rtn", "prune-magnitude", "prune-wanda", "prune-sparsegpt")


def target_linears(tensors: Mapping[str, torch.Tensor], keep_dense: Sequence[str]) -> list[str]:
    """Base names (without `.weight`) of the decoder linears a step compresses, in checkpoint order:
    the quantizable ones (embeddings, lm_head and norms stay dense). InvalidArgument for a keep_dense
    pattern that matches no linear (a typo would silently compress what it meant to keep) and for
    patterns that leave nothing to compress (the result would be the source, labelled compressed)."""
    bases = [n[: -len(".weight")] for n in tensors if n.endswith(QUANTIZABLE_SUFFIXES)]
    for pattern in keep_dense:
        if not any(fnmatch.fnmatchcase(b, pattern) for b in bases):
            example = bases[0] if bases else "model.layers.0.mlp.down_proj"
            raise InvalidArgument(
                f"keep_dense pattern {pattern!r} matches no decoder linear; names look like {example!r} "
                "(fnmatch patterns such as '*.down_proj' or 'model.layers.0.*')"
            )
    targets = [b for b in bases if not any(fnmatch.fnmatchcase(b, p) for p in keep_dense)]
    if not targets:
        raise InvalidArgument(
            f"keep_dense {list(keep_dense)} keeps every one of the {len(bases)} decoder linears dense: "
            "nothing is left to compress; narrow the patterns"
        )
    return targets


def svd_rank(out_f: int, in_f: int, step: MethodSpec) -> int | None:
    """The rank `step` keeps for an out_f x in_f weight, when its settings fix it without an SVD
    (rank, rank_fraction; None for an energy threshold)."""
    if step.rank is not None:
        return step.rank
    if step.rank_fraction is not None:
        return max(1, round(step.rank_fraction * min(out_f, in_f)))
    return None


def factors_fit(out_f: int, in_f: int, rank: int) -> bool:
    """Whether rank-`rank` factors (out x r and r x in) store no more numbers than the weight itself:
    a layer whose factors would be larger stays dense."""
    return rank * (out_f + in_f) <= out_f * in_f


def prior_state(
    tensors: Mapping[str, torch.Tensor], history: Sequence[Mapping[str, Any]] = ()
) -> tuple[str, str] | None:
    """(family, "a checkpoint already compressed with <method>") when the source was compressed
    before: from the recorded steps (`history`, the manifest's compression.steps) when there are
    some, else from the tensor formats (an unstructured-pruned checkpoint without history is dense)."""
    if history:
        method = str(history[-1].get("method", ""))
        if method in METHODS:
            return family_of(method), f"a checkpoint already compressed with {method}"
    for name, t in tensors.items():
        if name.endswith(".qweight"):
            kind = "int8" if t.dtype == torch.int8 else "int4"
            return "quant", f"a checkpoint already compressed with {kind} quantization ({name})"
        if name.endswith(".svd_u"):
            return "lowrank", f"a checkpoint already compressed with svd ({name})"
    for name in tensors:
        if name.endswith(".nm_index"):
            return "prune", f"a checkpoint already compressed with 2:4 pruning ({name})"
    return None


def check_composition(
    steps: Sequence[MethodSpec],
    tensors: Mapping[str, torch.Tensor],
    history: Sequence[Mapping[str, Any]] = (),
) -> None:
    """Refuse a step that cannot follow what came before it: FailedPrecondition when the source
    checkpoint's state is the obstacle (compress its dense parent instead), InvalidArgument when two
    steps of this one call contradict each other. Both messages name both methods."""
    if not steps:
        raise InvalidArgument("no compression method given")
    prior = prior_state(tensors, history)
    error: type[TokenmillError] = FailedPrecondition
    sparse = _pruned_to(history)
    for step in steps:
        if prior is not None:
            _check_follows(step, *prior, error)
        if step.family == "prune" and step.pattern == "unstructured" and 0.0 < step.sparsity <= sparse:
            raise error(
                f"{step.method} at sparsity {step.sparsity} would prune nothing: the weights are already "
                f"{sparse:.4g} sparse; ask for a sparsity above {sparse:.4g}"
            )
        if step.family == "prune":
            sparse = max(sparse, step.sparsity)
        prior, error = (step.family, f"the output of {step.method}"), InvalidArgument


def _pruned_to(history: Sequence[Mapping[str, Any]]) -> float:
    """The highest sparsity an earlier pruning step asked for (0.0 when none pruned)."""
    asked = [float(h.get("sparsity", 0.0)) for h in history if h.get("method") in PRUNE_METHODS]
    return max(asked, default=0.0)


def _check_follows(step: MethodSpec, family: str, what: str, error: type[TokenmillError]) -> None:
    if family == "quant":
        raise error(
            f"{step.method} cannot be applied to {what}: the weights are already quantized and "
            "re-quantizing compounds the error; compress the dense parent checkpoint instead"
        )
    if family == "lowrank":
        raise error(
            f"{step.method} cannot be applied to {what}: SVD factors are not a dense weight "
            "(no format stores quantized or pruned factors); compress the dense parent instead"
        )
    if family == "prune" and step.method not in _AFTER_PRUNE:
        raise error(
            f"{step.method} cannot be applied to {what}: it would refill the pruned weights; after "
            f"pruning use one of {list(_AFTER_PRUNE)} (e.g. prune-wanda 2:4 then int8)"
        )


def check_shapes(step: MethodSpec, tensors: Mapping[str, torch.Tensor], targets: Sequence[str]) -> None:
    """InvalidArgument naming the first layer whose shape the step cannot handle."""
    for base in targets:
        out_f, in_f = tensors[f"{base}.weight"].shape
        if step.method.startswith("int4") and in_f % step.group_size:
            raise InvalidArgument(
                f"{step.method}: group_size {step.group_size} does not divide in_features {in_f} of "
                f"{base}; pick a group size that divides {in_f}"
            )
        if step.family == "prune" and step.pattern == "2:4" and in_f % 4:
            raise InvalidArgument(
                f"{step.method} 2:4: in_features {in_f} of {base} is not divisible by 4; use "
                "pattern 'unstructured' or keep the layer dense (keep_dense)"
            )
        if step.method == "svd" and step.rank is not None and step.rank > min(out_f, in_f):
            raise InvalidArgument(
                f"svd rank {step.rank} exceeds the rank bound min({out_f}, {in_f}) = {min(out_f, in_f)} "
                f"of {base}; use a rank <= {min(out_f, in_f)} or rank_fraction"
            )
    if step.method == "svd":
        _check_svd_shrinks(step, tensors, targets)


def _check_svd_shrinks(step: MethodSpec, tensors: Mapping[str, torch.Tensor], targets: Sequence[str]) -> None:
    """InvalidArgument when the rank the step fixes leaves every layer's factors larger than its
    weight: each would stay dense and the "compressed" model would be the source."""
    shapes = [tuple(tensors[f"{b}.weight"].shape) for b in targets]
    ranks = [svd_rank(o, i, step) for o, i in shapes]
    if any(r is None or factors_fit(o, i, r) for (o, i), r in zip(shapes, ranks, strict=True)):
        return
    setting = f"rank {step.rank}" if step.rank is not None else f"rank_fraction {step.rank_fraction}"
    most = max(o * i / (o + i) / min(o, i) for o, i in shapes)
    raise InvalidArgument(
        f"svd {setting}: every layer's factors would be larger than its weight (rank r of an out x in "
        f"weight stores r*(out+in) numbers against out*in), so nothing would shrink; use rank_fraction "
        f"<= {math.floor(most * 100) / 100:.2f} for these shapes, or an energy threshold"
    )


def check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    """FailedPrecondition when any floating tensor holds NaN/Inf: the checkpoint itself is broken."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FailedPrecondition(
                f"tensor {name} has NaN/Inf values; the checkpoint is corrupt, compress a healthy version"
            )


def check_calibration(
    batches: Sequence[torch.Tensor] | None, *, vocab_size: int, max_seq_len: int, method: str, min_tokens: int
) -> list[torch.Tensor]:
    """The calibration batches as [B, T] int64, or InvalidArgument saying what is wrong with them."""
    if not batches:
        raise InvalidArgument(f"{method} needs calibration data (token id batches); none was given")
    out = []
    for i, b in enumerate(batches):
        if b.is_floating_point() or b.is_complex() or b.dtype == torch.bool:
            raise InvalidArgument(f"calibration batch {i} must hold integer token ids, got {b.dtype}")
        b = b.long().reshape(1, -1) if b.dim() == 1 else b.long()
        if b.dim() != 2 or b.numel() == 0:
            raise InvalidArgument(
                f"calibration batch {i} must be [batch, seq] non-empty, got {tuple(b.shape)}"
            )
        if b.shape[1] > max_seq_len:
            raise InvalidArgument(
                f"calibration batch {i} has {b.shape[1]} tokens per row; the model allows {max_seq_len}"
            )
        lo, hi = int(b.min()), int(b.max())
        if lo < 0 or hi >= vocab_size:
            raise InvalidArgument(
                f"calibration batch {i} has token id {hi if hi >= vocab_size else lo} outside the model's "
                f"vocabulary [0, {vocab_size}); was it tokenized with another tokenizer?"
            )
        out.append(b)
    total = sum(b.numel() for b in out)
    if total < min_tokens:
        raise InvalidArgument(f"calibration data has {total} tokens; {method} needs at least {min_tokens}")
    return out
