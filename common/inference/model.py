"""The Llama-family decoder (Llama, Qwen2, Mistral) as a paged-attention forward over checkpoint tensors.

Parameter names are Hugging Face `LlamaForCausalLM`'s (what `tokenmill.common.model.transformer` saves), weights may be
dense or weight-only quantized (`tokenmill.common.model.quant`), q/k/v and gate/up are fused into one matmul each.
Attention reads K/V from the paged cache through per-sequence block tables: the new tokens' K/V
are scattered into their slots first, then each sequence gathers its context and attends with a
causal mask, narrowed to the last `sliding_window` keys on sliding layers (Mistral, Qwen2); the
masks are built once per step for each distinct window. GQA is computed without expanding K/V
(queries are grouped per KV head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.common.errors import InvalidArgument
from tokenmill.common.inference.config import ModelSpec
from tokenmill.common.inference.lora import LoraBatch
from tokenmill.common.model.families import Biases
from tokenmill.common.model.quant import QuantLinear, concat_linears, make_linear
from tokenmill.common.model.rope import dynamic_inv_freq, rope_attention_scaling, rope_inv_freq, rope_kind
from tokenmill.common.model.transformer import rope_cos_sin

PREFIX = "model."


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos/sin [T, D] (HF rotate-half convention)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


@dataclass
class DecodeMeta:
    """The decode sequences (one new token each): their block tables and context lengths."""

    tables: torch.Tensor  # [Bd, nblocks]
    ctx: torch.Tensor  # [Bd] context length including the new token


@dataclass
class PrefillMeta:
    """The prefill chunks, back to back: block tables, context and chunk lengths, padding."""

    tables: torch.Tensor  # [Bp, nblocks]
    ctx: torch.Tensor  # [Bp]
    qlen: torch.Tensor  # [Bp]
    pad_idx: torch.Tensor | None = None  # [Bp, Qmax] index into the prefill tokens (padding -> 0)
    valid: torch.Tensor | None = None  # [Bp, Qmax] bool; both None for one sequence (no padding)


@dataclass
class AttnMeta:
    """Where the step's tokens go and what each sequence attends to.

    Tokens are laid out decodes first (one per sequence), then the prefill chunks back to back.
    """

    slot_mapping: torch.Tensor  # [T] flat cache slot for each new token
    num_decodes: int
    decode: DecodeMeta | None  # None when the step has no decodes
    prefill: PrefillMeta | None  # None when the step has no prefills


def _load(
    tensors: dict[str, torch.Tensor], name: str, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    if name not in tensors:
        raise InvalidArgument(f"checkpoint lacks tensor {name!r}; is it a Llama-family checkpoint?")
    return tensors[name].to(device=device, dtype=dtype)


class BiasedLinear(QuantLinear):
    """A (possibly quantized, possibly fused) linear layer plus a dense bias (Qwen2's q/k/v)."""

    def __init__(self, inner: QuantLinear, bias: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + self.bias

    def weight_bytes(self) -> int:
        return self.inner.weight_bytes() + self.bias.numel() * self.bias.element_size()


class DecoderLayer(nn.Module):
    """One decoder layer's weights: norms, fused qkv, o, fused gate/up, down (biases as configured)."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        prefix: str,
        biases: Biases,
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__()

        def fused(names: tuple[str, ...], bias: bool) -> QuantLinear:
            parts = [make_linear(tensors, prefix + n, dtype=dtype, device=device) for n in names]
            layer = parts[0] if len(parts) == 1 else concat_linears(parts)
            if not bias:
                return layer
            return BiasedLinear(
                layer, torch.cat([_load(tensors, f"{prefix}{n}.bias", dtype, device) for n in names])
            )

        def norm(name: str) -> nn.Parameter:
            return nn.Parameter(_load(tensors, prefix + name, dtype, device), requires_grad=False)

        self.input_norm = norm("input_layernorm.weight")
        self.post_norm = norm("post_attention_layernorm.weight")
        self.qkv = fused(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), biases.qkv)
        self.o = fused(("self_attn.o_proj",), biases.o_proj)
        self.gate_up = fused(("mlp.gate_proj", "mlp.up_proj"), biases.mlp)
        self.down = fused(("mlp.down_proj",), biases.mlp)


class PagedLlama(nn.Module):
    cos: torch.Tensor  # [max positions, head dim] rotary tables (buffers)
    sin: torch.Tensor

    def __init__(self, spec: ModelSpec, tensors: dict[str, torch.Tensor], *, dtype: torch.dtype, device):
        super().__init__()
        self.spec = spec
        self.dtype = dtype
        self.device = torch.device(device)

        def t(name: str) -> torch.Tensor:
            return _load(tensors, name, dtype, self.device)

        self.embed = nn.Parameter(t(PREFIX + "embed_tokens.weight"), requires_grad=False)
        if self.embed.shape != (spec.vocab_size, spec.hidden_size):
            raise InvalidArgument(
                f"embed_tokens is {tuple(self.embed.shape)} but the config says "
                f"({spec.vocab_size}, {spec.hidden_size})"
            )
        layers = [
            DecoderLayer(tensors, f"{PREFIX}layers.{i}.", spec.config.biases, dtype, self.device)
            for i in range(spec.num_layers)
        ]
        self.layers = nn.ModuleList(layers)  # registers their weights with this module
        self.decoder_layers: tuple[DecoderLayer, ...] = tuple(layers)  # the same layers, typed
        self.norm = nn.Parameter(t(PREFIX + "norm.weight"), requires_grad=False)
        if "lm_head.weight" in tensors and not spec.tie_word_embeddings:
            self.lm_head = nn.Parameter(t("lm_head.weight"), requires_grad=False)
        else:
            self.lm_head = self.embed
        pos = torch.arange(spec.max_position_embeddings, device=self.device)
        scaling = rope_attention_scaling(spec.config)
        cos, sin = rope_cos_sin(rope_inv_freq(spec.config, self.device), pos, dtype, scaling)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        # Dynamic NTK: a token's rotation depends on its sequence's length (see rope_cos_sin_at).
        self.dynamic_rope = rope_kind(spec.config.rope_scaling) == "dynamic"
        self.windows = tuple(spec.config.layer_window(i) for i in range(spec.num_layers))
        self.q_size = spec.num_heads * spec.head_dim
        self.kv_size = spec.num_kv_heads * spec.head_dim
        self.scale = 1.0 / math.sqrt(spec.head_dim)

    def weight_bytes(self) -> int:
        total = sum(p.numel() * p.element_size() for p in (self.embed, self.norm))
        if self.lm_head is not self.embed:
            total += self.lm_head.numel() * self.lm_head.element_size()
        for layer in self.decoder_layers:
            total += sum(m.weight_bytes() for m in (layer.qkv, layer.o, layer.gate_up, layer.down))
            total += 2 * layer.input_norm.numel() * layer.input_norm.element_size()
        return total

    def num_parameters(self) -> int:
        s = self.spec
        per_layer = (
            s.hidden_size * (self.q_size + 2 * self.kv_size)
            + self.q_size * s.hidden_size
            + 3 * s.hidden_size * s.intermediate_size
            + 2 * s.hidden_size
        )
        n = s.vocab_size * s.hidden_size * (1 if self.lm_head is self.embed else 2)
        b = s.config.biases
        per_layer += (self.q_size + 2 * self.kv_size) * b.qkv + s.hidden_size * b.o_proj
        per_layer += (2 * s.intermediate_size + s.hidden_size) * b.mlp
        return n + s.num_layers * per_layer + s.hidden_size

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> list[torch.Tensor]:
        s = self.spec
        # [K|V, kv head, slot, head dim]: see _gather_attend for why heads come before slots.
        return [
            torch.zeros(
                2, s.num_kv_heads, num_blocks * block_size, s.head_dim, dtype=self.dtype, device=self.device
            )
            for _ in range(s.num_layers)
        ]

    # ------------------------------------------------------------------ attention

    def _gather_attend(
        self, q: torch.Tensor, cache: torch.Tensor, tables: torch.Tensor, mask: torch.Tensor, block_size: int
    ) -> torch.Tensor:
        """q [B, Q, H, D]; mask [B, Q, L] (True = attend) -> [B, Q, H*D].

        The cache is laid out [2, Hkv, slots, D] so that gathering whole blocks with index_select
        yields K/V as [Hkv, B, L, D] directly: batched matmuls read them without any transpose copy.
        """
        s = self.spec
        b, nq = q.shape[0], q.shape[1]
        hkv, d, g = s.num_kv_heads, s.head_dim, s.num_heads // s.num_kv_heads
        idx = tables.reshape(-1)
        k = cache[0].view(hkv, -1, block_size, d).index_select(1, idx).view(hkv, b, -1, d)  # [Hkv, B, L, D]
        v = cache[1].view(hkv, -1, block_size, d).index_select(1, idx).view(hkv, b, -1, d)
        qg = q.view(b, nq, hkv, g, d).permute(2, 0, 3, 1, 4).reshape(hkv, b, g * nq, d)  # [Hkv, B, G*Q, D]
        scores = torch.matmul(qg, k.transpose(-1, -2)).float() * self.scale  # [Hkv, B, G*Q, L]
        scores = scores.view(hkv, b, g, nq, -1).masked_fill(~mask[None, :, None, :, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype).view(hkv, b, g * nq, -1)
        out = torch.matmul(probs, v)  # [Hkv, B, G*Q, D]
        out = out.view(hkv, b, g, nq, d).permute(1, 3, 0, 2, 4)  # [B, Q, Hkv, G, D]
        return out.reshape(b, nq, self.q_size)

    def _masks(
        self, meta: AttnMeta, block_size: int, window: int | None, num_tokens: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(decode mask [Bd, 1, L], prefill mask [Bp, Q, L]), True = attend: causal, within the
        context, and with a window only the keys at most window-1 positions before the query."""
        dmask = pmask = None
        if meta.decode is not None:
            tables, ctx = meta.decode.tables, meta.decode.ctx
            kpos = torch.arange(tables.shape[1] * block_size, device=tables.device)[None, :]
            dmask = kpos < ctx[:, None]
            if window is not None:
                dmask &= kpos >= (ctx - window)[:, None]
            dmask = dmask[:, None, :]
        if meta.prefill is not None:
            pre = meta.prefill
            # queries per row: all prefill tokens for one sequence, else the padded width
            nq = num_tokens - meta.num_decodes if pre.pad_idx is None else pre.pad_idx.shape[1]
            start = (pre.ctx - pre.qlen)[:, None]  # absolute position of query 0
            qpos = (start + torch.arange(nq, device=start.device)[None, :])[:, :, None]  # [Bp, Q, 1]
            kpos = torch.arange(pre.tables.shape[1] * block_size, device=start.device)[None, None, :]
            pmask = (kpos <= qpos) & (kpos < pre.ctx[:, None, None])
            if window is not None:
                pmask &= kpos > qpos - window
        return dmask, pmask

    def _attention(
        self,
        q: torch.Tensor,
        cache: torch.Tensor,
        meta: AttnMeta,
        block_size: int,
        masks: tuple[torch.Tensor | None, torch.Tensor | None],
    ) -> torch.Tensor:
        s = self.spec
        q = q.view(-1, s.num_heads, s.head_dim)
        outs = []
        nd = meta.num_decodes
        dmask, pmask = masks
        if meta.decode is not None and dmask is not None:
            outs.append(self._gather_attend(q[:nd, None], cache, meta.decode.tables, dmask, block_size)[:, 0])
        if meta.prefill is not None and pmask is not None:
            pre = meta.prefill
            qp = q[nd:]
            # One sequence needs no padding.
            qpad = qp[None] if pre.pad_idx is None else qp[pre.pad_idx]
            out = self._gather_attend(qpad, cache, pre.tables, pmask, block_size)
            outs.append(out[0] if pre.valid is None else out[pre.valid])
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def rope_cos_sin_at(
        self, positions: torch.Tensor, rope_lens: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin per token. Dynamic NTK rotates a token with the frequencies of the sequence length
        HF had when it computed that token: the prompt length for prompt tokens, position + 1 for
        generated ones (`rope_lens`, given by the runner); the table for everything else."""
        if not self.dynamic_rope or rope_lens is None:
            return self.cos[positions], self.sin[positions]
        inv = dynamic_inv_freq(self.spec.config, rope_lens)
        return rope_cos_sin(inv, positions, self.dtype)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttnMeta,
        kv_caches: list[torch.Tensor],
        block_size: int,
        logits_indices: torch.Tensor | None = None,
        lora: LoraBatch | None = None,
        rope_lens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the new tokens through the model; returns float32 logits at `logits_indices` (or all).
        `rope_lens` [T]: each token's sequence length for dynamic NTK rope (ignored otherwise)."""
        s = self.spec
        h = F.embedding(input_ids, self.embed)
        cos, sin = self.rope_cos_sin_at(positions, rope_lens)
        masks = {w: self._masks(meta, block_size, w, len(input_ids)) for w in set(self.windows)}
        for i, layer in enumerate(self.decoder_layers):
            x = rms_norm(h, layer.input_norm, s.rms_norm_eps)
            qkv = layer.qkv(x)
            if lora is not None:
                lora.apply(qkv, x, i, ("q_proj", "k_proj", "v_proj"))
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = apply_rope(q.view(-1, s.num_heads, s.head_dim), cos, sin)
            k = apply_rope(k.view(-1, s.num_kv_heads, s.head_dim), cos, sin)
            cache = kv_caches[i]
            cache[0].index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
            cache[1].index_copy_(1, meta.slot_mapping, v.view(-1, s.num_kv_heads, s.head_dim).transpose(0, 1))
            attn = self._attention(q, cache, meta, block_size, masks[self.windows[i]])
            o = layer.o(attn)
            if lora is not None:
                lora.apply(o, attn, i, ("o_proj",))
            h = h + o
            x = rms_norm(h, layer.post_norm, s.rms_norm_eps)
            gu = layer.gate_up(x)
            if lora is not None:
                lora.apply(gu, x, i, ("gate_proj", "up_proj"))
            gate, up = gu.chunk(2, dim=-1)
            act = F.silu(gate) * up
            d = layer.down(act)
            if lora is not None:
                lora.apply(d, act, i, ("down_proj",))
            h = h + d
        if logits_indices is not None:
            h = h[logits_indices]
        h = rms_norm(h, self.norm, s.rms_norm_eps)
        return F.linear(h, self.lm_head).float()
