"""The Llama-family decoder shared by training, compression and inference.

Readable in the spirit of nanoGPT: one file, plain modules. Parameter names and layouts equal
Hugging Face ``LlamaForCausalLM`` state_dict keys (and Qwen2's and Mistral's, which differ only in
biases and attention variants: `tokenmill.common.model.families`), so checkpoints move between the two without a
conversion table and a test can compare logits directly. The pieces an inference engine needs to run
its own (paged) attention are exposed: :func:`rope_cos_sin`, :func:`apply_rope` and
:meth:`Attention.project_qkv` / ``o_proj``.

Engines import this module on GPU boxes that have only torch: no redis, ray, grpc or generated stubs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.common.errors import InvalidArgument
from tokenmill.common.model.families import (
    ROPE_REQUIRED,
    SUPPORTED_ROPE_TYPES,
    Biases,
    family,
    family_of_hf,
    hf_rope,
    hf_sliding_window,
    hf_window_fields,
)
from tokenmill.common.model.rope import (
    dynamic_inv_freq,
    rope_attention_scaling,
    rope_inv_freq,
    rope_kind,
)

IGNORE_INDEX = -100  # label value excluded from the loss (SFT prompt tokens, padding)


@dataclass
class ModelConfig:
    """Shapes and numerics of one model. The single source of truth for a checkpoint's architecture."""

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: int = 12
    head_dim: int | None = None  # None: hidden_size // num_heads
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    # None or {"type": one of families.SUPPORTED_ROPE_TYPES, **that type's HF parameters}, e.g.
    # {"type": "yarn", "factor", "original_max_position_embeddings", "beta_fast", ...}.
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None  # as HF gives it: one id or all of them
    # The family (tokenmill.common.model.families) and which projections add a bias.
    model_type: str = "llama"
    qkv_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    # Sliding-window attention: a query attends to itself and the window-1 keys before it, on the
    # layers layer_types marks "sliding_attention" (None: every layer), as transformers masks it.
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # carried through, never interpreted

    def __post_init__(self) -> None:
        self.validate()

    @property
    def dim_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def biases(self) -> Biases:
        return Biases(qkv=self.qkv_bias, o_proj=self.o_proj_bias, mlp=self.mlp_bias)

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (None: full causal attention)."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation (HF's eos_token_id may be one id or a list)."""
        eos = self.eos_token_id
        if eos is None:
            return ()
        return tuple(int(e) for e in eos) if isinstance(eos, list | tuple) else (int(eos),)

    def validate(self) -> None:
        """Raise ValueError naming the field when the shapes cannot form a model."""
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "max_seq_len",
        ):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.rms_norm_eps >= 0:
            raise ValueError(f"rms_norm_eps must be non-negative, got {self.rms_norm_eps}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if name == "eos_token_id" and isinstance(value, list | tuple) else [value]
            if value is not None and not all(_is_token_id(i) for i in ids):
                raise ValueError(
                    f"{name} must be a token id (a non-negative integer), a list of them or null, got {value!r}"
                )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} does not divide hidden_size={self.hidden_size}; "
                "pick a head count that divides it or set head_dim explicitly"
            )
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads} "
                "(grouped-query attention shares each K/V head across a whole group)"
            )
        if self.head_dim is not None and int(self.head_dim) <= 0:
            raise ValueError(
                f"head_dim must be positive (or null: hidden_size // num_heads), got {self.head_dim}"
            )
        if not self.rope_theta > 0 or math.isinf(self.rope_theta):
            raise ValueError(f"rope_theta must be a positive finite number, got {self.rope_theta}")
        if self.dim_head % 2:
            raise ValueError(f"head_dim={self.dim_head} must be even for rotary embeddings")
        kind = rope_kind(self.rope_scaling)
        if kind not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_scaling type {kind!r} unsupported; use one of {list(SUPPORTED_ROPE_TYPES)}"
            )
        missing = [k for k in ROPE_REQUIRED[kind] if (self.rope_scaling or {}).get(k) is None]
        if missing:
            raise ValueError(f"rope_scaling of type {kind!r} needs {missing}")
        factor = (self.rope_scaling or {}).get("factor")
        if factor is not None and (
            isinstance(factor, bool) or not isinstance(factor, int | float) or not factor > 0
        ):
            raise ValueError(f"rope_scaling.factor must be a positive number, got {factor!r}")
        fam = family(self.model_type)
        fam.check_biases(self.biases)
        fam.check_window(self.sliding_window, self.layer_types, self.num_layers)

    # -- parameter / FLOP accounting ------------------------------------------------------------
    def num_params(self, *, non_embedding: bool = False) -> int:
        """Exact parameter count of :class:`Transformer` (tied embeddings counted once)."""
        h, d, kv = self.hidden_size, self.dim_head, self.num_kv_heads
        attn = h * self.num_heads * d * 2 + h * kv * d * 2
        attn += (self.num_heads + 2 * kv) * d * self.qkv_bias + h * self.o_proj_bias
        mlp = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h) * self.mlp_bias
        per_layer = attn + mlp + 2 * h
        embed = self.vocab_size * h
        head = 0 if self.tie_embeddings else self.vocab_size * h
        total = self.num_layers * per_layer + h + embed + head
        return total - embed if non_embedding else total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token as in PaLM appendix B: 6N + 12·L·H·Q·T (N excludes the input
        embedding table, which is a lookup; the output projection is a matmul and stays in N)."""
        n = self.num_params(non_embedding=True)
        if self.tie_embeddings:
            n += self.vocab_size * self.hidden_size  # the tied table is also the lm_head matmul
        return 6.0 * n + 12.0 * self.num_layers * self.num_heads * self.dim_head * seq_len

    # -- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **overrides: Any) -> ModelConfig:
        """A copy with fields changed (validated), e.g. a preset with a dataset's vocab size."""
        return ModelConfig.from_dict({**self.to_dict(), **overrides})

    def to_hf_config(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers reads as this family (old and new rope keys)."""
        rope_params: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        scaling = None
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            body = {k: v for k, v in self.rope_scaling.items() if k not in ("type", "rope_type")}
            scaling = {"rope_type": kind, "type": kind, **body}
            rope_params = {"rope_theta": self.rope_theta, "rope_type": kind, **body}
        fam = family(self.model_type)
        cfg: dict[str, Any] = {
            "architectures": [fam.architecture],
            "model_type": fam.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.dim_head,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": scaling,
            "rope_parameters": rope_params,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            **fam.hf_bias_fields(self.biases),
            **hf_window_fields(fam, self.sliding_window, self.layer_types, self.num_layers),
            "initializer_range": self.init_std,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        }
        return cfg

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Read a ``config.json`` of a supported family (transformers 4.x ``rope_scaling`` or 5.x
        ``rope_parameters``). InvalidArgument names the field of anything this code cannot run."""
        fam = family_of_hf(cfg)
        cfg = fam.with_hf_defaults(cfg)
        if cfg.get("hidden_act", "silu") != "silu":
            raise InvalidArgument(f"hidden_act={cfg.get('hidden_act')!r} is not supported; only 'silu'")
        try:
            heads = int(cfg["num_attention_heads"])
            head_dim = cfg.get("head_dim")
            if head_dim is not None and int(head_dim) * heads == int(cfg["hidden_size"]):
                head_dim = None  # the default; keep configs canonical so round trips compare equal
            context = int(cfg.get("max_position_embeddings", 2048))
            if context <= 0:
                raise ValueError(f"max_position_embeddings must be positive, got {context}")
            window, layer_types = hf_sliding_window(fam, cfg, int(cfg["num_hidden_layers"]))
            biases = fam.biases(cfg)
            theta, scaling = hf_rope(cfg)
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=int(cfg["hidden_size"]),
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=None if head_dim is None else int(head_dim),
                max_seq_len=context,
                rope_theta=theta,
                rope_scaling=scaling,
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                init_std=float(cfg.get("initializer_range", 0.02)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=cfg.get("eos_token_id"),
                model_type=fam.model_type,
                qkv_bias=biases.qkv,
                o_proj_bias=biases.o_proj,
                mlp_bias=biases.mlp,
                sliding_window=window,
                layer_types=layer_types,
            )
        except KeyError as exc:
            raise InvalidArgument(f"config.json lacks the field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"config.json is not a valid {fam.model_type} config: {exc}") from None


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


PRESETS: dict[str, ModelConfig] = {
    # ~1M parameters: tests and the CPU demo.
    "test-1m": ModelConfig(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=384,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=512,
        tie_embeddings=True,
    ),
    # GPT-2 small class (124M with tied embeddings); vocab padded to a multiple of 64 as in nanoGPT.
    "gpt2-124m": ModelConfig(
        vocab_size=50304,
        hidden_size=768,
        intermediate_size=2048,
        num_layers=12,
        num_heads=12,
        num_kv_heads=12,
        max_seq_len=1024,
        tie_embeddings=True,
    ),
    # Llama-3.2-1B shapes (1.24B parameters).
    "llama-1b": ModelConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        max_seq_len=131072,
        rope_theta=500000.0,
        rope_scaling={
            "type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_embeddings=True,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name with optional field overrides; ValueError lists the known names."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name].replace()


# -- rotary embeddings ------------------------------------------------------------------------------
def rope_cos_sin(
    inv_freq: torch.Tensor,
    positions: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [*positions.shape, head_dim] for any position tensor (e.g. per-token
    positions of a ragged paged batch); inv_freq is [head_dim/2] or per position [..., head_dim/2]
    (dynamic NTK). Computed in fp32, times yarn's attention scaling, then cast (as HF does)."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device, torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [..., T, H, D] by cos/sin [..., T, D] (broadcast over heads), HF half-split layout."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + _rotate_half(x) * sin


# -- blocks -----------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like HF/Llama, then scale in the input dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query causal self-attention with rotary embeddings, optionally in a sliding window."""

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.window = config.layer_window(layer)
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.dim_head,
        )
        h = config.hidden_size
        qkv, o = config.qkv_bias, config.o_proj_bias
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=qkv)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=qkv)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=qkv)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=o)

    def project_qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [..., T, H, D], k/v [..., T, KV, D] with rope applied to q and k. Works on [B, T, C]
        and on flattened ragged tokens [N, C] (cos/sin [N, D]) as inference engines use."""
        lead = x.shape[:-1]
        q = self.q_proj(x).view(*lead, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``mask`` [B, 1, T, T] bool (True: may attend) replaces the causal mask, e.g. for scoring
        several continuations of one context in one sequence; ``Transformer.hidden_states`` has
        already combined it with this layer's window."""
        b, t, _ = x.shape
        q, k, v = self.project_qkv(x, cos, sin)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, heads, T, D]
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif self.window is None or self.window >= t:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(t, self.window, x.device))
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


def window_mask(t: int, window: int, device: torch.device) -> torch.Tensor:
    """[t, t] bool, True where query i may attend key j: j <= i and j > i - window (HF's mask)."""
    i = torch.arange(t, device=device)
    rel = i[:, None] - i[None, :]
    return (rel >= 0) & (rel < window)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block; the unit FSDP2 shards and activation checkpointing wraps."""

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The trunk (``model.*`` in HF naming)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    """Decoder-only LM. ``state_dict()`` keys equal HF ``LlamaForCausalLM``'s."""

    rope_inv_freq: torch.Tensor  # a buffer, registered in __init__

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Non-persistent: recomputed from the config, never part of a checkpoint (as in HF).
        self.register_buffer("rope_inv_freq", rope_inv_freq(config), persistent=False)
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nanoGPT/GPT-2 init: N(0, std), residual projections scaled by 1/sqrt(2L), norms 1, biases 0."""
        std = self.config.init_std
        resid_std = std / math.sqrt(2 * self.config.num_layers)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=resid_std)
            else:
                nn.init.normal_(p, mean=0.0, std=std)
        with torch.no_grad():
            self.rope_inv_freq.copy_(rope_inv_freq(self.config, self.rope_inv_freq.device))

    def _inv_freq(self, position_ids: torch.Tensor) -> torch.Tensor:
        """The frequencies for this forward: dynamic NTK stretches them to the longest position, as
        HF's rotary embedding does for a sequence past max_position_embeddings."""
        if rope_kind(self.config.rope_scaling) != "dynamic":
            return self.rope_inv_freq
        seq_len = position_ids.max() + 1
        if int(seq_len) <= self.config.max_seq_len:
            return self.rope_inv_freq
        return dynamic_inv_freq(self.config, seq_len).to(self.rope_inv_freq.device)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for these positions as every forward uses them (dynamic NTK, yarn's scaling):
        also for callers that run the blocks themselves (compression's calibration)."""
        inv_freq = self._inv_freq(position_ids)
        return rope_cos_sin(inv_freq, position_ids, dtype, rope_attention_scaling(self.config))

    def _layer_masks(
        self, mask: torch.Tensor | None, position_ids: torch.Tensor
    ) -> list[torch.Tensor | None]:
        """A caller's mask, narrowed per sliding-window layer to keys within its window (built once
        per distinct window)."""
        if mask is None:
            return [None] * len(self.model.layers)
        rel = (position_ids[..., :, None] - position_ids[..., None, :]).unsqueeze(-3)
        by_window: dict[int | None, torch.Tensor] = {}
        out: list[torch.Tensor | None] = []
        for i in range(self.config.num_layers):
            window = self.config.layer_window(i)
            if window not in by_window:
                by_window[window] = mask if window is None else mask & (rel < window)
            out.append(by_window[window])
        return out

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The normed trunk output [B, T, C]: callers that need logits at a few positions only
        (scoring) apply ``lm_head`` to those rows and skip the rest of the vocabulary projection."""
        _, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, x.dtype)
        masks = self._layer_masks(mask, position_ids)
        for layer, layer_mask in zip(self.model.layers, masks, strict=True):
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, layer_mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, layer_mask)
        return self.model.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """logits [B, T, V]; with ``targets`` also the mean cross-entropy over labels != -100."""
        logits = self.lm_head(self.hidden_states(input_ids, position_ids))
        if targets is None:
            return logits
        loss = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX
        )
        return logits, loss


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Unique parameters (tied weights once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total
