"""The model families tokenmill runs, keyed by Hugging Face ``architectures`` / ``model_type``.

Every family here is the same pre-norm SwiGLU decoder with rotary attention; they differ only in
which projections carry biases and in sliding-window attention (Mistral on every layer, Qwen2 on
the layers its config names). A config that needs anything this code does not compute (another
architecture, a rope type without an implementation, partial rotary embeddings) is refused with
InvalidArgument naming the field, so a checkpoint is never stored and then served wrong. Engines import this module: torch-free, no grpc/redis/ray.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tokenmill.common.errors import InvalidArgument

# rope_type values the shared rope code (tokenmill.common.model.rope) implements exactly as HF does
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")
# transformers' per-layer attention kinds, indexed by "does this layer slide"
LAYER_TYPES = ("full_attention", "sliding_attention")


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
    # What transformers' config class assumes for a field config.json leaves out (a hand-written or
    # trimmed config.json must mean what it means to transformers, e.g. Mistral's 4096-token window).
    hf_defaults: Mapping[str, Any] = field(default_factory=dict)

    def with_hf_defaults(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """`cfg` with this family's transformers defaults for the fields it omits."""
        return {**self.hf_defaults, **cfg}

    def hf_bias_fields(self, biases: Biases) -> dict[str, Any]:
        """The config.json fields that make transformers build these biases."""
        if self.model_type == "llama":
            return {"attention_bias": biases.qkv, "mlp_bias": biases.mlp}
        return {}

    def check_window(self, window: int | None, layer_types: list[str] | None, num_layers: int) -> None:
        """ValueError when this family cannot slide this window over these layers."""
        if window is None:
            if layer_types is not None:
                raise ValueError("layer_types needs a sliding_window; leave it None without one")
            return
        if not self.has_sliding_window:
            raise ValueError(
                f"{self.model_type} models have no sliding-window attention; use mistral or qwen2"
            )
        if int(window) < 1:
            raise ValueError(f"sliding_window must be positive, got {window}")
        if layer_types is None:
            return
        if self.model_type == "mistral":
            raise ValueError("mistral slides every layer; per-layer layer_types need qwen2")
        if len(layer_types) != num_layers or set(layer_types) - set(LAYER_TYPES):
            raise ValueError(f"layer_types must name {num_layers} layers, each one of {LAYER_TYPES}")

    def check_biases(self, biases: Biases) -> None:
        """ValueError when this family cannot have these biases (e.g. Qwen2 without q/k/v bias)."""
        expected = self.biases(self.hf_bias_fields(biases))
        if expected != biases:
            raise ValueError(f"{self.model_type} models have biases {expected}, not {biases}")


def _llama_biases(cfg: Mapping[str, Any]) -> Biases:
    attn = bool(cfg.get("attention_bias", False))
    return Biases(qkv=attn, o_proj=attn, mlp=bool(cfg.get("mlp_bias", False)))


# transformers' LlamaConfig / Qwen2Config / MistralConfig defaults (4.x and 5.x agree) for the
# fields tokenmill reads; an omitted num_key_value_heads is the head count for Llama only.
_COMMON_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False}
_LLAMA_DEFAULTS = {**_COMMON_DEFAULTS, "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2}
_QWEN2_DEFAULTS = {
    **_COMMON_DEFAULTS,
    "max_position_embeddings": 32768,
    "num_key_value_heads": 32,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 28,
}
_MISTRAL_DEFAULTS = {
    **_COMMON_DEFAULTS,
    "max_position_embeddings": 131072,
    "num_key_value_heads": 8,
    "sliding_window": 4096,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "LlamaForCausalLM", _llama_biases, False, _LLAMA_DEFAULTS),
        # Qwen2/2.5: q/k/v carry biases, o_proj and the MLP do not (transformers' Qwen2Attention).
        Family("qwen2", "Qwen2ForCausalLM", lambda cfg: Biases(qkv=True), True, _QWEN2_DEFAULTS),
        Family("mistral", "MistralForCausalLM", lambda cfg: Biases(), True, _MISTRAL_DEFAULTS),
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


def hf_sliding_window(
    fam: Family, cfg: Mapping[str, Any], num_layers: int
) -> tuple[int | None, list[str] | None]:
    """(window, layer_types) as transformers applies them: Mistral slides every layer when
    ``sliding_window`` is set (``layer_types`` is ignored); Qwen2 only with ``use_sliding_window``,
    on the layers ``layer_types`` names, by default those from ``max_window_layers`` on. layer_types
    None means every layer uses the window."""
    if not fam.has_sliding_window:
        return None, None
    if fam.model_type == "mistral":
        window = cfg.get("sliding_window")
        return (None if window is None else _window(window)), None
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
    types = cfg.get("layer_types")
    if types is None:
        first = int(cfg.get("max_window_layers", 28))
        types = [LAYER_TYPES[window is not None and i >= first] for i in range(num_layers)]
    types = list(types)
    if len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
        raise InvalidArgument(
            f"layer_types={types!r} must name {num_layers} layers, each one of {list(LAYER_TYPES)}"
        )
    if "sliding_attention" not in types:
        return None, None
    if window is None:
        raise InvalidArgument(
            f"layer_types has sliding_attention layers but sliding_window={cfg.get('sliding_window')!r} "
            f"with use_sliding_window={cfg.get('use_sliding_window')!r}; transformers cannot run it either"
        )
    return _window(window), None if "full_attention" not in types else types


def _window(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(f"sliding_window={value!r} must be a positive number of tokens or null")
    return value


def hf_window_fields(
    fam: Family, window: int | None, layer_types: list[str] | None, n: int
) -> dict[str, Any]:
    """The config.json fields that make transformers apply this window on these layers."""
    if not fam.has_sliding_window:
        return {}
    if fam.model_type == "mistral":
        return {"sliding_window": window}
    types = layer_types or [LAYER_TYPES[window is not None]] * n
    first = next((i for i, t in enumerate(types) if t == "sliding_attention"), n)
    return {
        "use_sliding_window": window is not None,
        "sliding_window": window,
        "max_window_layers": first,
        "layer_types": types,
    }


# The rope parameters each type cannot do without (HF's rope init functions read them).
ROPE_REQUIRED: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "original_max_position_embeddings"),
    "yarn": ("original_max_position_embeddings",),
}


def hf_rope(cfg: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling in tokenmill form) from either HF spelling; refuses unknown types.
    As transformers reads them: a non-empty ``rope_scaling`` (4.x) wins and ``rope_parameters`` is
    then ignored, theta included; the theta inside the chosen dict beats the top-level one."""
    scaling = cfg.get("rope_scaling") or None
    params = scaling if scaling is not None else (cfg.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    field = "rope_scaling"
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        field = "rope_parameters"
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise InvalidArgument(f"partial_rotary_factor={partial!r} is not supported; only 1.0")
    if scaling is None:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    check_rope_type(kind, field)
    body = {k: v for k, v in scaling.items() if k not in ("type", "rope_type", "rope_theta")}
    body.pop("partial_rotary_factor", None)
    if kind in (None, "default"):
        return theta, None
    if kind in ("llama3", "yarn"):  # transformers' standardize_rope_params default
        original = cfg.get("original_max_position_embeddings")
        if original is not None:
            body["original_max_position_embeddings"] = original
        body.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings", 2048))
    for key in ROPE_REQUIRED[kind]:
        if body.get(key) is None:
            raise InvalidArgument(f"{field}.{key} is required for rope_type={kind!r}")
    return theta, {"type": kind, **body}
