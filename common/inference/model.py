"""The Llama-family decoder (Llama, Qwen2, Mistral) as a paged-attention forward over checkpoint tensors.

Parameter names are Hugging Face `LlamaForCausalLM`'s (what `tokenmill.common.model.transformer` saves), weights may be
dense or weight-only quantized (`tokenmill.common.model.quant`), q/k/v and gate/up are fused into one matmul each.
Attention reads K/V from the paged cache through per-sequence block tables: the new tokens' K/V
are scattered into their slots first, then each attention group (decodes of similar context length,
or prefill chunks of similar size, as the runner splits them) gathers its context and attends with
SDPA under a causal mask, narrowed to the last `sliding_window` keys on sliding layers (Mistral,
Qwen2); masks are built once per step. Chunks that start their sequence attend to their own new K/V
with a plain causal SDPA. GQA is computed without expanding K/V (queries are grouped per KV head).
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
    """The decode sequences (one new token each): block tables and context lengths.

    `buckets` splits the rows (sorted by context length) into runs that attend together, each as
    (end row, table width in blocks): a short context is then padded only to its bucket's longest
    context, not to the step's. None: one bucket of the full table width (the CUDA-graph path).
    """

    tables: torch.Tensor  # [Bd, nblocks]
    ctx: torch.Tensor  # [Bd] context length including the new token
    buckets: list[tuple[int, int]] | None = None


@dataclass
class PrefillMeta:
    """Prefill chunks attending together, back to back: block tables, context and chunk lengths,
    padding."""

    tables: torch.Tensor  # [Bp, nblocks]
    ctx: torch.Tensor  # [Bp]
    qlen: torch.Tensor  # [Bp]
    pad_idx: torch.Tensor | None = None  # [Bp, Qmax] index into these chunks' tokens (padding -> 0)
    valid: torch.Tensor | None = None  # [Bp, Qmax] bool; both None when every chunk has Qmax tokens
    num_tokens: int | None = None  # tokens of these chunks; None: all the step's tokens after the decodes
    fresh: bool = False  # every chunk starts at position 0 (equal lengths): attend to the chunks' own K/V


@dataclass
class AttnMeta:
    """Where the step's tokens go and what each sequence attends to.

    Tokens are laid out decodes first (one per sequence), then the prefill chunks back to back,
    group after group when `prefill` is a list (each group one batched attention call).
    """

    slot_mapping: torch.Tensor  # [T] flat cache slot for each new token
    num_decodes: int
    decode: DecodeMeta | None  # None when the step has no decodes
    prefill: PrefillMeta | list[PrefillMeta] | None  # None when the step has no prefills

    def prefill_groups(self) -> list[PrefillMeta]:
        if self.prefill is None:
            return []
        return [self.prefill] if isinstance(self.prefill, PrefillMeta) else self.prefill


@dataclass
class _Group:
    """Rows [start, end) of the step attending in one batched call: `tables` [B, W] and, per window
    that needs one, the additive mask (see _group_masks); `pad_idx`/`valid` as in PrefillMeta.
    `fresh`: B chunks of `nq` tokens that each start their sequence, so on layers whose window
    covers the chunk they attend causally to their own new K/V, neither gathered nor masked."""

    start: int
    end: int
    tables: torch.Tensor
    masks: dict[int | None, torch.Tensor]
    nq: int
    pad_idx: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    fresh: bool = False

    def causal_only(self, window: int | None) -> bool:
        return self.fresh and (window is None or window >= self.nq)


def _group_masks(
    windows: set[int | None],
    qstart: torch.Tensor,
    ctx: torch.Tensor,
    shape: tuple[int, int, int],
    block_size: int,
    dtype: torch.dtype,
) -> dict[int | None, torch.Tensor]:
    """Additive masks (0 = attend, -inf = not) for `shape` = (Q, W blocks, G): causal within the
    context (`qstart` [B]: absolute position of query 0), narrowed on sliding layers to the keys at
    most window-1 positions before the query. Shaped for _gather_attend's grouped queries:
    [B, 1, 1, L] for one query, else [B, 1, G*Q, L]. Float, so SDPA does not convert it per layer."""
    nq, width, group = shape
    dev = ctx.device
    qpos = (qstart[:, None] + torch.arange(nq, device=dev)[None, :])[:, :, None]  # [B, Q, 1]
    kpos = torch.arange(width * block_size, device=dev)[None, None, :]
    base = (kpos <= qpos) & (kpos < ctx[:, None, None])
    out = {}
    for w in windows:
        allowed = base if w is None else base & (kpos > qpos - w)
        b, length = allowed.shape[0], allowed.shape[2]
        if nq == 1:
            allowed = allowed[:, None]
        else:
            allowed = allowed[:, None, None].expand(b, 1, group, nq, length).reshape(b, 1, group * nq, length)
        out[w] = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill_(~allowed, float("-inf"))
    return out


def attention_groups(
    meta: AttnMeta, windows: set[int | None], block_size: int, num_tokens: int, group: int, dtype: torch.dtype
) -> list[_Group]:
    """The step's attention calls (decode buckets, then prefill groups) with their masks, built once
    per step and shared by every layer."""
    groups: list[_Group] = []
    if meta.decode is not None:
        dec = meta.decode
        start = 0
        for end, width in dec.buckets or [(meta.num_decodes, dec.tables.shape[1])]:
            ctx = dec.ctx[start:end]
            masks = _group_masks(windows, ctx - 1, ctx, (1, width, group), block_size, dtype)
            groups.append(_Group(start, end, dec.tables[start:end, :width], masks, 1))
            start = end
    start = meta.num_decodes
    for pre in meta.prefill_groups():
        n = num_tokens - start if pre.num_tokens is None else pre.num_tokens
        nq = n // len(pre.ctx) if pre.pad_idx is None else pre.pad_idx.shape[1]
        g = _Group(
            start, start + n, pre.tables, {}, nq, pre.pad_idx, pre.valid, pre.fresh and pre.pad_idx is None
        )
        masked = {w for w in windows if not g.causal_only(w)}
        shape = (nq, pre.tables.shape[1], group)
        g.masks = _group_masks(masked, pre.ctx - pre.qlen, pre.ctx, shape, block_size, dtype)
        groups.append(g)
        start += n
    return groups


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
        # CPU only: gathered K/V land in one reused buffer. A fresh tens-of-MB tensor per call costs
        # page faults several times the copy itself; CUDA's caching allocator already reuses memory
        # (and a growing buffer could not live inside a captured graph).
        self._gather_buf: torch.Tensor | None = (
            torch.empty(0, dtype=dtype) if self.device.type == "cpu" else None
        )

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
        """q [B, Q, H, D]; mask [B, 1, G*Q or 1, L] (True = attend, see _group_masks) -> [B, Q, H*D].

        The cache is laid out [2, Hkv, slots, D] so that one index_select of whole blocks yields K and
        V as [Hkv, B, L, D]; SDPA reads them through a transposed view, no further copy. Queries are
        grouped per KV head ([B, Hkv, G*Q, D]) so GQA needs neither expanded K/V nor `enable_gqa`.
        """
        s = self.spec
        b, nq = q.shape[0], q.shape[1]
        hkv, d, g = s.num_kv_heads, s.head_dim, s.num_heads // s.num_kv_heads
        kv = self._gather_blocks(cache.view(2 * hkv, -1, block_size, d), tables.reshape(-1))
        k, v = kv.view(2, hkv, b, -1, d).transpose(1, 2)  # each [B, Hkv, L, D]
        qg = q.view(b, nq, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * nq, d)
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=self.scale)  # [B, Hkv, G*Q, D]
        return out.view(b, hkv, g, nq, d).permute(0, 3, 1, 2, 4).reshape(b, nq, self.q_size)

    def _gather_blocks(self, blocks: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """blocks [2*Hkv, num blocks, block, D] at `idx` -> [2*Hkv, len(idx), block, D] (see _gather_buf)."""
        if self._gather_buf is None:
            return blocks.index_select(1, idx)
        shape = (blocks.shape[0], idx.numel(), *blocks.shape[2:])
        need = math.prod(shape)
        if self._gather_buf.numel() < need:
            self._gather_buf = torch.empty(need, dtype=blocks.dtype, device=blocks.device)
        return torch.index_select(blocks, 1, idx, out=self._gather_buf[:need].view(shape))

    def _attention(
        self,
        q: torch.Tensor,
        new_kv: tuple[torch.Tensor, torch.Tensor],
        cache: torch.Tensor,
        groups: list[_Group],
        window: int | None,
        block_size: int,
    ) -> torch.Tensor:
        """Each group's queries against its sequences' context (the cache, or for a fresh group on a
        layer its window covers, the step's new K/V [T, Hkv, D]); rows back in step order."""
        s = self.spec
        q = q.view(-1, s.num_heads, s.head_dim)
        outs = []
        for g in groups:
            qg = q[g.start : g.end]
            b = g.tables.shape[0]
            if g.causal_only(window):
                k, v = (
                    t[g.start : g.end].view(b, g.nq, s.num_kv_heads, s.head_dim).transpose(1, 2)
                    for t in new_kv
                )
                qh = qg.view(b, g.nq, s.num_heads, s.head_dim).transpose(1, 2)
                out = F.scaled_dot_product_attention(
                    qh, k, v, is_causal=True, scale=self.scale, enable_gqa=True
                )
                outs.append(out.transpose(1, 2).reshape(-1, self.q_size))
                continue
            qpad = qg.view(b, -1, s.num_heads, s.head_dim) if g.pad_idx is None else qg[g.pad_idx]
            out = self._gather_attend(qpad, cache, g.tables, g.masks[window], block_size)
            outs.append(out.reshape(-1, self.q_size) if g.valid is None else out[g.valid])
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
        group = s.num_heads // s.num_kv_heads
        groups = attention_groups(meta, set(self.windows), block_size, len(input_ids), group, self.dtype)
        for i, layer in enumerate(self.decoder_layers):
            x = rms_norm(h, layer.input_norm, s.rms_norm_eps)
            qkv = layer.qkv(x)
            if lora is not None:
                lora.apply(qkv, x, i, ("q_proj", "k_proj", "v_proj"))
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = apply_rope(q.view(-1, s.num_heads, s.head_dim), cos, sin)
            k = apply_rope(k.view(-1, s.num_kv_heads, s.head_dim), cos, sin)
            v = v.view(-1, s.num_kv_heads, s.head_dim)
            cache = kv_caches[i]
            cache[0].index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
            cache[1].index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
            attn = self._attention(q, (k, v), cache, groups, self.windows[i], block_size)
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
