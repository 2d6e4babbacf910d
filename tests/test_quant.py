"""Weight-only int8 / int4 formats (tokenmill.common.model.quant) and quantized models in the engine."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.inference import reference_greedy
from tokenmill.common.errors import InvalidArgument
from tokenmill.common.inference import EngineConfig, SamplingParams, build_engine
from tokenmill.common.model.quant import (
    DenseLinear,
    InputScaledLinear,
    Int4Linear,
    Int8Linear,
    LowRankLinear,
    concat_linears,
    dequantize_int4,
    dequantize_int8,
    dequantize_state_dict,
    make_linear,
    quantize_int4,
    quantize_int8,
    quantize_state_dict,
    unpack_int4,
)


def test_int8_round_trip_and_layout():
    w = torch.randn(48, 64)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == (48, 64) and s.shape == (48,)
    err = (dequantize_int8(q, s) - w).abs().max(dim=1).values
    assert torch.all(err <= s / 2 + 1e-6)  # round-to-nearest: at most half a step per channel


def test_int4_packing_is_low_nibble_first():
    w = torch.randn(8, 32)
    q, s, z = quantize_int4(w, group_size=16)
    assert q.dtype == torch.uint8 and q.shape == (8, 16) and s.shape == z.shape == (8, 2)
    vals = unpack_int4(q)
    assert torch.equal(vals[:, 0], q[:, 0] & 0xF) and torch.equal(vals[:, 1], q[:, 0] >> 4)
    err = (dequantize_int4(q, s, z) - w).abs()
    step = s.repeat_interleave(16, dim=1)
    assert torch.all(err <= step / 2 + 1e-5)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_layers_match_dequantized_weights(method):
    torch.manual_seed(0)
    w, x = torch.randn(32, 64), torch.randn(5, 64)
    if method == "int8":
        q, s = quantize_int8(w)
        layer, ref_w = Int8Linear(q, s, torch.float32), dequantize_int8(q, s)
    else:
        q, s, z = quantize_int4(w, 16)
        layer, ref_w = Int4Linear(q, s, z, torch.float32), dequantize_int4(q, s, z)
    torch.testing.assert_close(layer(x), x @ ref_w.t(), rtol=1e-5, atol=1e-5)
    fused = concat_linears([layer, layer])
    assert type(fused) is type(layer)
    torch.testing.assert_close(fused(x), torch.cat([layer(x), layer(x)], dim=-1))


def test_make_linear_picks_the_format_and_rejects_bad_tensors():
    w = torch.randn(16, 32)
    assert isinstance(make_linear({"a.weight": w}, "a", dtype=torch.float32, device="cpu"), DenseLinear)
    sd = quantize_state_dict({"x.q_proj.weight": w}, "int4", group_size=16)
    assert isinstance(make_linear(sd, "x.q_proj", dtype=torch.float32, device="cpu"), Int4Linear)
    with pytest.raises(InvalidArgument, match="no weight"):
        make_linear({}, "missing", dtype=torch.float32, device="cpu")
    with pytest.raises(InvalidArgument, match="zeros"):
        make_linear(
            {"x.qweight": sd["x.q_proj.qweight"], "x.scales": sd["x.q_proj.scales"]},
            "x",
            dtype=torch.float32,
            device="cpu",
        )
    with pytest.raises(InvalidArgument, match="divisible"):
        quantize_int4(torch.randn(4, 24), group_size=16)
    with pytest.raises(InvalidArgument, match="unknown quantization"):
        quantize_state_dict({}, "int3")


def test_low_rank_factors_run_as_two_matmuls():
    torch.manual_seed(1)
    u, v, x = torch.randn(32, 4), torch.randn(4, 64), torch.randn(5, 64)
    layer = make_linear({"a.svd_u": u, "a.svd_v": v}, "a", dtype=torch.float32, device="cpu")
    assert isinstance(layer, LowRankLinear) and (layer.in_features, layer.out_features) == (64, 32)
    assert layer.weight_bytes() == (32 * 4 + 4 * 64) * 4  # the factors, never the dense [32, 64]
    torch.testing.assert_close(layer(x), x @ (u @ v).t(), rtol=1e-5, atol=1e-5)
    fused = concat_linears([layer, layer])
    torch.testing.assert_close(fused(x), torch.cat([layer(x), layer(x)], dim=-1))
    with pytest.raises(InvalidArgument, match="needs both"):
        make_linear({"a.svd_u": u}, "a", dtype=torch.float32, device="cpu")
    with pytest.raises(InvalidArgument, match="svd_u"):
        LowRankLinear(u, torch.randn(5, 64), torch.float32)


def test_input_scale_divides_the_input_and_dequantizes_to_the_effective_weight():
    torch.manual_seed(2)
    w, x, s = torch.randn(16, 32), torch.randn(3, 32), torch.rand(32) + 0.5
    q, sc, z = quantize_int4(w * s[None, :], 16)
    tensors = {"a.qweight": q, "a.scales": sc, "a.zeros": z, "a.input_scale": s, "norm.weight": torch.ones(4)}
    layer = make_linear(tensors, "a", dtype=torch.float32, device="cpu")
    assert isinstance(layer, InputScaledLinear)
    dense = dequantize_state_dict(tensors)
    assert set(dense) == {"a.weight", "norm.weight"}
    torch.testing.assert_close(dense["a.weight"], dequantize_int4(q, sc, z) / s[None, :])
    torch.testing.assert_close(layer(x), x @ dense["a.weight"].t(), rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidArgument, match="input_scale must be"):
        make_linear({**tensors, "a.input_scale": torch.ones(3)}, "a", dtype=torch.float32, device="cpu")


@pytest.mark.parametrize(("method", "tol"), [("int8", 0.03), ("int4", 0.3)])
def test_quantized_model_is_close_to_dense(tiny_ckpt, method, tol):
    sd = quantize_state_dict(tiny_ckpt.tensors, method, group_size=32)
    assert any(k.endswith(".qweight") for k in sd) and "model.embed_tokens.weight" in sd
    cfg = EngineConfig(num_blocks=64, block_size=4)
    dense = build_engine(tiny_ckpt.tensors, tiny_ckpt.config_dict, cfg)
    quant = build_engine(sd, tiny_ckpt.config_dict, cfg)
    assert quant.model.weight_bytes() < 0.5 * dense.model.weight_bytes() + dense.model.embed.numel() * 4
    prompt = tiny_ckpt.encode("The quick brown fox jumps over the lazy dog")
    d_out = dense.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0]
    assert d_out.output_token_ids == reference_greedy(tiny_ckpt.model, prompt, 16)
    # Teacher-forced along the dense greedy path: logits close at every position, argmax mostly equal.
    seq = prompt + d_out.output_token_ids
    with torch.inference_mode():
        ref = tiny_ckpt.model(torch.tensor([seq]))[0, len(prompt) - 1 : -1]
    got = torch.stack([_last_logits(quant, seq[: len(prompt) + i]) for i in range(16)])
    rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max()
    assert rel < tol, float(rel)
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree >= (0.8 if method == "int8" else 0.5), float(agree)


def _last_logits(engine, prompt):
    """Last-position logits of `prompt` through the engine's paged forward."""
    req = engine.add_request(prompt_token_ids=prompt, params=SamplingParams(max_tokens=1, temperature=0.0))
    sched = engine.scheduler.schedule()
    logits = engine.runner.execute(sched.items, engine.adapters)[0]
    engine.abort(req.request_id)
    return logits[0]
