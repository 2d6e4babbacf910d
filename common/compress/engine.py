"""`compress_model`: validate everything first, then run each MethodSpec step over the model.

Methods without calibration (int8, int4-rtn, magnitude pruning, SVD) work tensor by tensor;
calibrated ones (GPTQ, AWQ, Wanda, SparseGPT) run the training model block by block over the
calibration batches (tokenmill.common.compress.calibrate).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenmill.common.compress.blockwise import compress_block
from tokenmill.common.compress.calibrate import blocks_with_inputs, capture
from tokenmill.common.compress.checks import (
    MIN_CALIBRATION_TOKENS,
    check_calibration,
    check_composition,
    check_finite,
    check_shapes,
    target_linears,
)
from tokenmill.common.compress.layers import LinearResult, compress_linear
from tokenmill.common.compress.spec import (
    CompressedResult,
    MethodSpec,
    Progress,
    ProgressCallback,
    family_of,
)
from tokenmill.common.errors import FailedPrecondition, InvalidArgument
from tokenmill.common.model.transformer import ModelConfig, Transformer

# Tensors a step replaces for each layer it compresses (quantization keeps 2:4 metadata: zeros stay zeros).
_REPLACED = {"quant": (".weight",), "prune": (".weight", ".nm_index"), "lowrank": (".weight", ".nm_index")}


def compress_model(
    source: Transformer | Mapping[str, torch.Tensor],
    steps: MethodSpec | Sequence[MethodSpec],
    calibration: Sequence[torch.Tensor] | None = None,
    progress: ProgressCallback | None = None,
    *,
    config: ModelConfig | None = None,
    min_calibration_tokens: int = MIN_CALIBRATION_TOKENS,
    history: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> CompressedResult:
    """Compress a model (or its checkpoint tensors + `config`) by one step or a composition of steps.

    calibration: token id batches [B, T] (only calibrated methods read them). Every check that can
    fail (method composition, shapes, NaN/Inf, calibration data) runs before any work starts.
    per_layer_errors: {linear name: {method: relative error of that step}}.
    history: the source's recorded compression (its manifest's `compression`: steps, sparsity), so
    a second compression is checked against the first and the result records both.
    device: where the work runs (e.g. "cuda"); the returned tensors are always on the CPU.
    """
    specs = [steps] if isinstance(steps, MethodSpec) else list(steps)
    if isinstance(source, Transformer):
        tensors = {k: v.detach().cpu() for k, v in source.state_dict().items()}
        config = source.config
    else:
        tensors = dict(source)
    history = dict(history or {})
    check_composition(specs, tensors, history.get("steps", ()))
    targets = [target_linears(tensors, s.keep_dense) for s in specs]
    for spec, names in zip(specs, targets, strict=True):
        check_shapes(spec, tensors, names)
    check_finite(tensors)
    batches = _calibration(specs, calibration, config, min_calibration_tokens)
    before = tensor_bytes(tensors)
    errors: dict[str, dict[str, float]] = {}
    notes: list[str] = []
    sparsity = history.get("sparsity")
    device = torch.device(device)
    for k, (spec, names) in enumerate(zip(specs, targets, strict=True)):
        run = _Run(k, spec, len(names), progress)
        if spec.calibrated:
            assert config is not None and batches is not None
            tensors = _calibrated(spec, tensors, config, batches, names, run, device)
        else:
            tensors = _plain(spec, tensors, names, run, device)
        if spec.energy is not None and run.total and len(run.notes) == run.total:
            raise FailedPrecondition(
                f"svd energy {spec.energy}: every layer needs so high a rank to keep that much energy "
                "that its factors would be larger than its weight, so nothing would shrink; lower the "
                "energy threshold or set rank_fraction"
            )
        for base, err in run.errors.items():
            errors.setdefault(base, {})[spec.method] = err
        notes += [f"{spec.method} {note}" for note in run.notes]
        if spec.family == "prune":
            sparsity = run.pruned / max(run.total_weights, 1)
    meta = manifest_meta([*history.get("steps", ()), *(s.to_dict() for s in specs)], sparsity)
    return CompressedResult(tensors, meta, errors, sparsity, before, tensor_bytes(tensors), notes)


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def manifest_meta(steps: Sequence[Mapping[str, Any]], sparsity: float | None) -> dict[str, Any]:
    """What the new checkpoint's config records: every step that made it (earlier jobs' first, as
    MethodSpec.to_dict gives them), and `quantization` as the loader reads it."""
    meta: dict[str, Any] = {"compression": {"steps": [dict(s) for s in steps]}}
    if sparsity is not None:
        meta["compression"]["sparsity"] = sparsity
    last = steps[-1]
    if last["method"] == "int8":
        meta["quantization"] = {"method": "int8", "algorithm": "rtn"}
    elif family_of(last["method"]) == "quant":
        meta["quantization"] = {
            "method": "int4",
            "group_size": last["group_size"],
            "algorithm": last["method"][5:],
        }
    return meta


@dataclass
class _Run:
    """Bookkeeping of one step: progress events, per-layer errors, pruned weight counts."""

    step: int
    spec: MethodSpec
    total: int
    progress: ProgressCallback | None
    errors: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    pruned: int = 0
    total_weights: int = 0

    def done(self, base: str, result: LinearResult, error: float) -> None:
        self.errors[base] = error
        if self.spec.family == "prune":  # the zeros stored, earlier steps' included
            self.pruned += int((result.approx == 0).sum().item())
            self.total_weights += result.approx.numel()
        if result.note:
            self.notes.append(f"{base}: {result.note}")
        if self.progress is not None:
            self.progress(Progress(self.step, self.spec.method, len(self.errors), self.total, base, error))


def _calibration(
    specs: Sequence[MethodSpec],
    batches: Sequence[torch.Tensor] | None,
    config: ModelConfig | None,
    min_tokens: int,
) -> list[torch.Tensor] | None:
    calibrated = [s.method for s in specs if s.calibrated]
    if not calibrated:
        return None
    if config is None:
        raise InvalidArgument(f"{calibrated[0]} runs the model over calibration data: pass its ModelConfig")
    return check_calibration(
        batches,
        vocab_size=config.vocab_size,
        max_seq_len=config.max_seq_len,
        method=calibrated[0],
        min_tokens=min_tokens,
    )


def _store(out: dict[str, torch.Tensor], spec: MethodSpec, base: str, result: LinearResult) -> None:
    """Replace `base`'s tensors in the (CPU) checkpoint by the result's, moved to the CPU."""
    for suffix in _REPLACED[spec.family]:
        out.pop(base + suffix, None)
    out.update({f"{base}.{k}": v.cpu() for k, v in result.tensors.items()})


def _plain(
    spec: MethodSpec, tensors: dict[str, torch.Tensor], names: Sequence[str], run: _Run, device: torch.device
) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    for base in names:
        w = tensors[f"{base}.weight"].to(device)
        result = compress_linear(spec, w, None, w.dtype)
        _store(out, spec, base, result)
        run.done(base, result, weight_error(w, result.approx))
    return out


def weight_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """||W - W'|| / ||W|| (Frobenius)."""
    w = weight.float()
    return float((w - approx.float()).norm() / w.norm().clamp(min=1e-12))


def _calibrated(
    spec: MethodSpec,
    tensors: dict[str, torch.Tensor],
    config: ModelConfig,
    batches: Sequence[torch.Tensor],
    names: Sequence[str],
    run: _Run,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    model = build_model(tensors, config).to(device)
    dtype = tensors["model.embed_tokens.weight"].dtype
    out = dict(tensors)
    hessian = spec.method in ("int4-gptq", "prune-sparsegpt")
    for i, block, inputs in blocks_with_inputs(model, [b.to(device) for b in batches]):
        prefix = f"model.layers.{i}."
        local = [b[len(prefix) :] for b in names if b.startswith(prefix)]
        if not local:
            continue
        stats = capture(block, inputs, local, with_hessian=hessian)
        results, extra = compress_block(spec, block, stats, local, dtype)
        out.update({prefix + k: v.cpu() for k, v in extra.items()})
        for name, result, err in results:
            _store(out, spec, prefix + name, result)
            run.done(prefix + name, result, err)
    return out


def build_model(tensors: Mapping[str, torch.Tensor], config: ModelConfig) -> Transformer:
    """A float32 training model holding the checkpoint's dense weights (format metadata ignored)."""
    model = Transformer(config).float().eval().requires_grad_(False)
    state = {k: v.float() for k, v in tensors.items() if not k.endswith(".nm_index")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_embeddings)]
    if missing or unexpected:
        raise InvalidArgument(
            f"checkpoint tensors do not match the model config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model
