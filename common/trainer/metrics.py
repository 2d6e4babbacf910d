"""Throughput accounting: MFU per PaLM and a memory estimate for admission checks.

MFU = achieved model FLOP/s / peak FLOP/s, with model FLOPs per token = 6N + 12·L·H·Q·T (PaLM
appendix B; N without the input-embedding lookup; no causal discount; recomputation not counted).
The peak is the dense bf16 tensor-core figure from the table below; devices not in the table (and
CPUs) report MFU as None rather than a made-up number.
"""

from __future__ import annotations

from tokenmill.common.model.transformer import ModelConfig

# Dense (no 2:4 sparsity) bf16 peak FLOP/s per device, from the vendor spec sheets.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
}


def peak_flops(device_name: str) -> float | None:
    """Peak for a ``torch.cuda.get_device_name()`` string; None when unknown (MFU left unset)."""
    name = device_name.upper()
    if "H100" in name and ("PCIE" in name):
        return PEAK_BF16_FLOPS["H100 PCIe"]
    if "H100" in name and "NVL" in name:
        return PEAK_BF16_FLOPS["H100 NVL"]
    for key in ("H200", "H100", "A100", "L40S", "A10G"):
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def mfu(
    model: ModelConfig, seq_len: int, tokens_per_second_per_device: float, peak: float | None
) -> float | None:
    if not peak:
        return None
    return model.flops_per_token(seq_len) * tokens_per_second_per_device / peak


def estimate_bytes_per_worker(
    model: ModelConfig,
    *,
    workers: int,
    micro_batch_size: int,
    seq_len: int,
    bf16: bool,
    activation_checkpointing: bool,
    trainable_fraction: float = 1.0,
) -> int:
    """A deliberately simple upper-bound-ish estimate used to refuse configs that cannot fit.

    Sharded state: fp32 params + grads + 2 Adam moments = 16 B/param (trainable), 4 B/param frozen,
    divided by the worker count. Unsharded working set: one block's bf16/fp32 params gathered plus
    the full logits. Activations: ~34·B·T·C bytes per layer in fp16 per Korthikanti et al. (halved
    for checkpointing to one tensor per layer plus one live block), scaled by 2 for fp32.
    """
    n = model.num_params()
    trainable = n * trainable_fraction
    state = (trainable * 16 + (n - trainable) * 4) / workers
    act_scale = 1.0 if bf16 else 2.0
    b, t, c, layers = micro_batch_size, seq_len, model.hidden_size, model.num_layers
    per_layer = 34 * b * t * c * act_scale
    # Attention probabilities are materialised only by the unfused (CPU/fp32) SDPA path; the
    # flash/memory-efficient kernels used in bf16 on GPU keep O(T) state.
    heads_term = 0 if bf16 else 2 * b * model.num_heads * t * t * 4
    if activation_checkpointing:
        activations = layers * b * t * c * 2 * act_scale + per_layer + heads_term
    else:
        activations = layers * (per_layer + heads_term)
    logits = b * t * model.vocab_size * (4 + 4 + (2 if bf16 else 4))  # logits, fp32 copy, grad
    block_params = (n - model.vocab_size * model.hidden_size) / max(1, layers) * (2 if bf16 else 4)
    return int(state + activations + logits + 2 * block_params)
