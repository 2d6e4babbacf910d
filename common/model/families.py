"""The model families tokenmill runs, keyed by Hugging Face ``architectures`` / ``model_type``.

Every family here is the same pre-norm SwiGLU decoder with rotary attention; they differ only in
which projections carry biases and in attention variants. A config that needs anything this code
does not compute (another architecture, a rope type without an implementation, a sliding window
that binds inside the context) is refused with InvalidArgument naming the field, so a checkpoint is
never stored and then served wrong. Engines import this module: torch-free, no grpc/redis/ray.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tokenmill.common.errors import InvalidArgument

# rope_type values the shared rope code (transformer.rope_inv_freq) implements exactly as HF does
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class Biases:
    """Which projections add a bias: q/k/v, o, and the MLP's gate/up/down."""

    qkv: bool = False
    o_proj: bool = False
    mlp: bool = False


@dataclass(frozen=True)
class Family:
    """One supported HF model family: its names and how its config maps to biases."""

    model_type: str
    architecture: str
    biases: Callable[[Mapping[str, Any]], Biases]
    has_sliding_window: bool

    def hf_bias_fields(self, biases: Biases) -> dict[str, Any]:
        """The config.json fields that make transformers build these biases."""
        if self.model_type == "llama":
            return {"attention_bias": biases.qkv, "mlp_bias": biases.mlp}
        return {}

    def check_biases(self, biases: Biases) -> None:
        """ValueError when this family cannot have these biases (e.g. Qwen2 without q/k/v bias)."""
        expected = self.biases(self.hf_bias_fields(biases))
        if expected != biases:
            raise ValueError(f"{self.model_type} models have biases {expected}, not {biases}")


def _llama_biases(cfg: Mapping[str, Any]) -> Biases:
    attn = bool(cfg.get("attention_bias", False))
    return Biases(qkv=attn, o_proj=attn, mlp=bool(cfg.get("mlp_bias", False)))


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "LlamaForCausalLM", _llama_biases, has_sliding_window=False),
        # Qwen2/2.5: q/k/v carry biases, o_proj and the MLP do not (transformers' Qwen2Attention).
        Family("qwen2", "Qwen2ForCausalLM", lambda cfg: Biases(qkv=True), has_sliding_window=True),
        Family("mistral", "MistralForCausalLM", lambda cfg: Biases(), has_sliding_window=True),
    )
}
_BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES.values()}


def family(model_type: str) -> Family:
    """The family named `model_type`; ValueError lists the supported ones."""
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def family_of_hf(cfg: Mapping[str, Any]) -> Family:
    """The family of an HF config.json: by ``architectures`` when given, else by ``model_type``."""
    archs = cfg.get("architectures") or []
    if archs:
        if len(archs) != 1 or archs[0] not in _BY_ARCHITECTURE:
            raise InvalidArgument(
                f"architectures={archs!r} is not supported; supported: {sorted(_BY_ARCHITECTURE)}"
            )
        fam = _BY_ARCHITECTURE[archs[0]]
        if cfg.get("model_type", fam.model_type) != fam.model_type:
            raise InvalidArgument(
                f"model_type={cfg.get('model_type')!r} contradicts architectures={archs!r} "
                f"(expected model_type {fam.model_type!r})"
            )
        return fam
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise InvalidArgument(
            f"model_type={model_type!r} is not supported (and no architectures given); "
            f"supported: {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]


def check_rope_type(kind: Any, field: str) -> None:
    """Refuse rope scaling the rope code would silently compute as something else."""
    if kind not in (None, *SUPPORTED_ROPE_TYPES):
        raise InvalidArgument(
            f"{field}.rope_type={kind!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}"
        )


def check_sliding_window(fam: Family, cfg: Mapping[str, Any], context: int) -> None:
    """Refuse a sliding window narrower than the context: full attention would differ past it."""
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types") or []
    if fam.model_type == "qwen2":
        active = bool(cfg.get("use_sliding_window", False)) or "sliding_attention" in layer_types
    else:
        active = fam.has_sliding_window and (window is not None or "sliding_attention" in layer_types)
    if active and (window is None or int(window) < context):
        raise InvalidArgument(
            f"sliding_window={window!r} is smaller than the context max_position_embeddings={context} "
            f"({fam.model_type}); sliding-window attention is not supported, only windows that "
            "never bind (None or >= the context)"
        )


def hf_rope(cfg: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling in tokenmill form) from either HF spelling; refuses unknown types."""
    params = cfg.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or None
    field = "rope_scaling"
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        field = "rope_parameters"
    if scaling is None:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    check_rope_type(kind, field)
    body = {k: v for k, v in scaling.items() if k not in ("type", "rope_type", "rope_theta")}
    return theta, None if kind in (None, "default") else {"type": kind, **body}
