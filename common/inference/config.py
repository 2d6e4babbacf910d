"""Shapes of the served model and knobs of the engine.

`ModelSpec` is read from the checkpoint's config (`tokenmill.common.model.transformer.ModelConfig.to_dict()` or a Hugging
Face `config.json`), so the engine needs nothing but that dict and the tensors.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenmill.common.errors import InvalidArgument
from tokenmill.common.model.rope import rope_context_length
from tokenmill.common.model.transformer import ModelConfig

_NON_MODEL_KEYS = ("quantization", "lora", "tokenizer", "torch_dtype", "dtype")


def model_config_from_dict(cfg: dict[str, Any]) -> ModelConfig:
    """A stored config (ModelConfig.to_dict() or a HF config.json) -> ModelConfig."""
    try:
        if "num_hidden_layers" in cfg:
            return ModelConfig.from_hf_config(cfg)
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        return ModelConfig.from_dict({k: v for k, v in cfg.items() if k in known})
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(f"model config is not a Llama-family config: {exc}") from None


def parse_eos_token_ids(value: Any) -> tuple[int, ...]:
    """A config's `eos_token_id` as a tuple: HF allows none, one id or a list (Llama 3 lists several,
    and generation stops on any of them)."""
    if value is None:
        return ()
    items = value if isinstance(value, list | tuple) else [value]
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in items):
        raise InvalidArgument(f"eos_token_id must be a token id or a list of them, got {value!r}")
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True)
class ModelSpec:
    """Everything the paged forward needs to know about a Llama-family model."""

    config: ModelConfig
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int  # positions served: HF's, extended by dynamic / yarn rope scaling
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    quantization: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelSpec:
        mc = model_config_from_dict(cfg)
        eos_ids = parse_eos_token_ids(cfg.get("eos_token_id"))
        return cls.from_model_config(mc, eos_token_ids=eos_ids, quantization=cfg.get("quantization") or None)

    @classmethod
    def from_model_config(
        cls, mc: ModelConfig, *, eos_token_ids: tuple[int, ...] | None = None, quantization=None
    ) -> ModelSpec:
        if eos_token_ids is None:
            eos_token_ids = parse_eos_token_ids(mc.eos_token_id)
        return cls(
            config=mc,
            vocab_size=mc.vocab_size,
            hidden_size=mc.hidden_size,
            intermediate_size=mc.intermediate_size,
            num_layers=mc.num_layers,
            num_heads=mc.num_heads,
            num_kv_heads=mc.num_kv_heads,
            head_dim=mc.dim_head,
            rms_norm_eps=mc.rms_norm_eps,
            max_position_embeddings=rope_context_length(mc),
            tie_word_embeddings=mc.tie_embeddings,
            eos_token_ids=tuple(eos_token_ids),
            bos_token_id=mc.bos_token_id,
            quantization=quantization,
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
    # On CUDA, > 0: size the KV pool so weights + KV + activations use this fraction of the GPU
    # (vLLM's gpu_memory_utilization); overrides kv_cache_memory_bytes.
    gpu_memory_utilization: float = 0.0
    activation_reserve_bytes: int = 2 * 1024**3
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
