"""The shared model matches transformers' LlamaForCausalLM exactly (names, shapes, logits)."""

from __future__ import annotations

import pytest
import torch

from tokenmill.common.model.transformer import (
    IGNORE_INDEX,
    PRESETS,
    ModelConfig,
    Transformer,
    apply_rope,
    count_parameters,
    preset,
    rope_cos_sin,
)

transformers = pytest.importorskip("transformers")

SMALL = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=160,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_seq_len=64,
)


def _hf_model(cfg: ModelConfig):
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf_config())
    hf_cfg._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(hf_cfg).eval()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_embeddings": True},
        {"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 4.0}},
        {
            "rope_scaling": {
                "type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        },
        {"num_kv_heads": 4, "head_dim": 24},
    ],
    ids=["gqa", "tied", "linear-rope", "llama3-rope", "mha-headdim"],
)
def test_logits_equal_hf_llama(overrides):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**SMALL, **overrides})
    ours = Transformer(cfg).eval()
    hf = _hf_model(cfg)
    assert set(ours.state_dict()) == set(hf.state_dict())
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected
    ids = torch.randint(0, cfg.vocab_size, (2, 48))
    with torch.no_grad():
        a = ours(ids)
        b = hf(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_hf_config_round_trip_and_transformers_reads_it():
    for name, cfg in PRESETS.items():
        hf_dict = cfg.to_hf_config()
        back = ModelConfig.from_hf_config(hf_dict)
        assert back == cfg, name
        hf_cfg = transformers.LlamaConfig(**hf_dict)
        assert hf_cfg.num_key_value_heads == cfg.num_kv_heads
        assert ModelConfig.from_hf_config(hf_cfg.to_dict()) == cfg, name
    assert ModelConfig.from_dict(PRESETS["llama-1b"].to_dict()) == PRESETS["llama-1b"]


def test_preset_sizes_and_param_count():
    assert 0.8e6 <= PRESETS["test-1m"].num_params() <= 1.5e6
    assert 120e6 <= PRESETS["gpt2-124m"].num_params() <= 130e6
    assert 1.1e9 <= PRESETS["llama-1b"].num_params() <= 1.3e9
    cfg = preset("test-1m", tie_embeddings=False)
    assert count_parameters(Transformer(cfg)) == cfg.num_params()
    assert count_parameters(Transformer(PRESETS["test-1m"])) == PRESETS["test-1m"].num_params()
    for biased in (
        preset("test-1m", qkv_bias=True, o_proj_bias=True, mlp_bias=True),
        preset("test-1m", model_type="qwen2", qkv_bias=True),
    ):
        model = Transformer(biased)
        assert count_parameters(model) == biased.num_params()
        assert all(
            not p.any() for n, p in model.named_parameters() if n.endswith(".bias")
        )  # biases start at 0


def test_family_bias_combinations_are_checked():
    with pytest.raises(ValueError, match="qwen2"):
        ModelConfig(**SMALL, model_type="qwen2")  # Qwen2 always has q/k/v biases
    with pytest.raises(ValueError, match="llama"):
        ModelConfig(**SMALL, qkv_bias=True)  # Llama's attention_bias covers o_proj too
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        ModelConfig(**SMALL, model_type="gpt2")


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"num_heads": 5}, "does not divide hidden_size"),
        ({"num_kv_heads": 3}, "must divide num_heads"),
        ({"vocab_size": 0}, "vocab_size must be positive"),
        ({"rope_scaling": {"type": "longrope"}}, "unsupported"),
        ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "original_max_position_embeddings"),
        ({"sliding_window": 8}, "no sliding-window attention"),
        ({"model_type": "mistral", "sliding_window": 8, "layer_types": ["full_attention"] * 2}, "qwen2"),
    ],
)
def test_invalid_configs_name_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**SMALL, **bad})
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("nope")
    with pytest.raises(ValueError, match="unknown model config field"):
        ModelConfig.from_dict({"hidden": 3})


def test_loss_ignores_masked_labels():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SMALL))
    ids = torch.randint(0, 96, (1, 16))
    targets = ids.clone()
    targets[:, :8] = IGNORE_INDEX
    logits, loss = model(ids, targets)
    ref = torch.nn.functional.cross_entropy(logits[0, 8:], ids[0, 8:])
    torch.testing.assert_close(loss, ref)


def test_exposed_pieces_reproduce_attention_for_ragged_tokens():
    """An inference engine computing q/k/v from flattened tokens with explicit positions gets the same
    attention output as the module's batched forward."""
    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL)
    model = Transformer(cfg).eval()
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 10, cfg.hidden_size)
    pos = torch.arange(10)
    cos, sin = rope_cos_sin(model.rope_inv_freq, pos)
    full = attn(x, cos, sin)
    q, k, v = attn.project_qkv(x[0], cos, sin)  # [N, H, D] ragged layout
    rep = cfg.num_heads // cfg.num_kv_heads
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    y = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True
    )
    out = attn.o_proj(y.transpose(0, 1).reshape(10, -1))
    torch.testing.assert_close(out, full[0], atol=1e-5, rtol=1e-5)
    # rope is a rotation: norms are preserved
    qr = apply_rope(torch.ones(3, 1, cfg.dim_head), *rope_cos_sin(model.rope_inv_freq, torch.arange(3)))
    torch.testing.assert_close(qr.norm(dim=-1), torch.ones(3, 1) * cfg.dim_head**0.5)


def test_activation_checkpointing_gives_identical_loss_and_grads():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SMALL))
    ids = torch.randint(0, 96, (2, 24))
    grads = []
    for ac in (False, True):
        model.zero_grad()
        model.activation_checkpointing = ac
        _, loss = model(ids, ids)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b)
