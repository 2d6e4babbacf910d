"""Shapes of the served model and knobs of the engine.

`ModelSpec` is read from the checkpoint's config (Hugging Face `config.json` keys, which
`common.model.ModelConfig` round-trips), so the engine needs nothing but that dict and the tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from common.errors import InvalidArgument

# HF key -> alternatives other configs use for the same fact.
_ALIASES = {
    "hidden_size": ("dim", "d_model"),
    "intermediate_size": ("ffn_dim", "hidden_dim"),
    "num_hidden_layers": ("n_layers", "num_layers"),
    "num_attention_heads": ("n_heads", "num_heads"),
    "num_key_value_heads": ("n_kv_heads", "num_kv_heads"),
    "rms_norm_eps": ("norm_eps",),
    "max_position_embeddings": ("max_seq_len", "context_length"),
    "tie_word_embeddings": ("tie_embeddings",),
}


def _get(cfg: dict[str, Any], key: str, default: Any = None) -> Any:
    for name in (key, *_ALIASES.get(key, ())):
        if cfg.get(name) is not None:
            return cfg[name]
    return default


@dataclass(frozen=True)
class ModelSpec:
    """Everything the paged forward needs to know about a Llama-family model."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: dict[str, Any] | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    quantization: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelSpec:
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if _get(cfg, k) is None]
        if missing:
            raise InvalidArgument(f"model config lacks {missing}; is this a Llama-family config.json?")
        hidden = int(_get(cfg, "hidden_size"))
        heads = int(_get(cfg, "num_attention_heads"))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (int(eos),))
        rope_scaling = cfg.get("rope_scaling")
        if rope_scaling:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if kind not in ("default", "llama3"):
                raise InvalidArgument(f"rope_scaling type {kind!r} is not supported (supported: default, llama3)")
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(_get(cfg, "intermediate_size", 4 * hidden)),
            num_layers=int(_get(cfg, "num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(_get(cfg, "num_key_value_heads", heads)),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(_get(cfg, "rms_norm_eps", 1e-5)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            max_position_embeddings=int(_get(cfg, "max_position_embeddings", 2048)),
            tie_word_embeddings=bool(_get(cfg, "tie_word_embeddings", False)),
            rope_scaling=rope_scaling or None,
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
            quantization=cfg.get("quantization") or None,
        )

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """K and V for one token across all layers: 2 * layers * kv_heads * head_dim * bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.finfo(dtype).bits // 8


@dataclass
class EngineConfig:
    """Engine knobs; defaults suit a CPU replica, the GPU bench sets its own."""

    block_size: int = 16
    num_blocks: int | None = None  # None: size the pool from kv_cache_memory_bytes
    kv_cache_memory_bytes: int = 256 * 1024 * 1024
    max_num_seqs: int = 64  # sequences in one step
    max_num_batched_tokens: int = 512  # token budget per step (prefill chunks + decodes)
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_waiting: int = 4096  # admission control: queued requests beyond this -> RESOURCE_EXHAUSTED
    enable_prefix_caching: bool = True
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    use_cuda_graphs: bool = True  # decode steps on CUDA; ignored on CPU
    cuda_graph_max_batch: int = 64
    default_max_tokens: int = 256
    extra: dict[str, Any] = field(default_factory=dict)

    def resolve_num_blocks(self, spec: ModelSpec) -> int:
        if self.num_blocks is not None:
            n = self.num_blocks
        else:
            per_block = spec.kv_bytes_per_token(self.dtype) * self.block_size
            n = self.kv_cache_memory_bytes // per_block
        if n < 2:
            raise InvalidArgument(
                f"KV cache pool has {n} blocks; raise kv_cache_memory_bytes (need at least 2 blocks of "
                f"{self.block_size} tokens)"
            )
        return int(n)

    def resolve_max_model_len(self, spec: ModelSpec) -> int:
        return min(self.max_model_len or spec.max_position_embeddings, spec.max_position_embeddings)

    def max_blocks_per_seq(self, spec: ModelSpec) -> int:
        return math.ceil(self.resolve_max_model_len(spec) / self.block_size)
