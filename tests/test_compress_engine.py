"""The compression engine (tokenmill.common.compress): each method's quality against its baseline,
the formats it writes served by the inference engine, and every bad input rejected before work."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.inference import reference_greedy
from tokenmill.common.compress import MethodSpec, Progress, compress_model
from tokenmill.common.compress.awq import fake_int4, search_scales
from tokenmill.common.compress.gptq import gptq_int4, sparsegpt
from tokenmill.common.compress.lowrank import truncated_svd
from tokenmill.common.compress.prune import magnitude_prune, pack_nm_index, unpack_nm_index, wanda_prune
from tokenmill.common.errors import FailedPrecondition, InvalidArgument
from tokenmill.common.inference import EngineConfig, SamplingParams, build_engine
from tokenmill.common.model.quant import dequantize_int4, dequantize_state_dict, pack_int4, quantize_int4
from tokenmill.common.model.transformer import Transformer

Q_PROJ = "model.layers.0.self_attn.q_proj"


def correlated_inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Activations like a real model's: correlated features with a few large-magnitude channels."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / dim**0.5 + torch.eye(dim)
    scale = torch.ones(dim)
    scale[torch.randperm(dim, generator=g)[: dim // 16]] = 10.0
    return (torch.randn(n, dim, generator=g) @ mix) * scale


def out_err(w: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ (w - approx).t()).norm() / (x @ w.t()).norm())


def calib(vocab: int, rows: int = 8, seq: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (rows // 2, seq), generator=g) for _ in range(2)]


# ------------------------------------------------------------------ methods vs baselines


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_reconstruction_error_is_below_rtn(act_order):
    torch.manual_seed(1)
    w, x = torch.randn(64, 128), correlated_inputs(512, 128)
    codes, s, z = gptq_int4(w, 2 * x.t() @ x / len(x), group_size=32, act_order=act_order, block_size=48)
    assert codes.min() >= 0 and codes.max() <= 15 and s.shape == z.shape == (64, 4)
    gptq = dequantize_int4(pack_int4(codes), s, z)
    rtn = dequantize_int4(*quantize_int4(w, 32))
    assert out_err(w, gptq, x) < 0.8 * out_err(w, rtn, x), (out_err(w, gptq, x), out_err(w, rtn, x))


def test_awq_scaling_error_is_below_rtn_on_outlier_activations():
    torch.manual_seed(5)
    w, x = torch.randn(64, 128), correlated_inputs(512, 128)
    s = search_scales([w], x, x.abs().mean(0), group_size=32, grid=20)
    awq = fake_int4(w * s[None, :], 32) / s[None, :]
    assert out_err(w, awq, x) < 0.9 * out_err(w, fake_int4(w, 32), x)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_error_is_below_magnitude_at_the_same_sparsity(pattern):
    torch.manual_seed(2)
    w, x = torch.randn(64, 128), correlated_inputs(512, 128)
    wanda, kept_w = wanda_prune(w, (x * x).sum(0), 0.5, pattern)
    mag, kept_m = magnitude_prune(w, 0.5, pattern)
    sgpt, kept_s = sparsegpt(w, 2 * x.t() @ x / len(x), sparsity=0.5, pattern=pattern, block_size=32)
    for kept in (kept_w, kept_m, kept_s):
        assert int((~kept).sum()) == w.numel() // 2
    assert out_err(w, wanda, x) < out_err(w, mag, x)
    assert out_err(w, sgpt, x) < out_err(w, mag, x)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_two_four_masks_keep_exactly_two_of_every_four(method):
    torch.manual_seed(3)
    w, x = torch.randn(16, 40), correlated_inputs(256, 40)
    if method == "magnitude":
        pruned, kept = magnitude_prune(w, 0.5, "2:4")
    elif method == "wanda":
        pruned, kept = wanda_prune(w, (x * x).sum(0), 0.5, "2:4")
    else:
        pruned, kept = sparsegpt(w, 2 * x.t() @ x / len(x), sparsity=0.5, pattern="2:4", block_size=16)
    assert torch.all((pruned != 0).reshape(16, 10, 4).sum(-1) == 2)
    assert torch.all(kept.reshape(16, 10, 4).sum(-1) == 2)
    packed = pack_nm_index(kept)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 5)
    assert torch.equal(unpack_nm_index(packed, 40), kept)


def test_svd_at_full_rank_reproduces_the_layer_and_energy_picks_the_rank():
    torch.manual_seed(4)
    w = torch.randn(24, 40)
    u, v = truncated_svd(w, rank=24)
    torch.testing.assert_close(u @ v, w, rtol=1e-5, atol=1e-5)
    low = torch.randn(24, 3) @ torch.randn(3, 40)  # rank 3: 100% of the energy in 3 values
    u, v = truncated_svd(low, energy=0.999)
    assert u.shape == (24, 3) and v.shape == (3, 40)
    assert truncated_svd(w, rank_fraction=0.5)[0].shape == (24, 12)


# ------------------------------------------------------------------ served formats


SERVED = {
    "int8": [MethodSpec("int8")],
    "int4-rtn": [MethodSpec("int4-rtn", group_size=32)],
    "int4-gptq": [MethodSpec("int4-gptq", group_size=32, act_order=True)],
    "int4-awq": [MethodSpec("int4-awq", group_size=32)],
    "prune-magnitude": [MethodSpec("prune-magnitude", sparsity=0.5)],
    "prune-sparsegpt": [MethodSpec("prune-sparsegpt", sparsity=0.5)],
    "wanda-2:4+int8": [MethodSpec("prune-wanda", pattern="2:4"), MethodSpec("int8")],
    "wanda-2:4": [MethodSpec("prune-wanda", pattern="2:4")],
    "sparsegpt-2:4+int4-rtn": [
        MethodSpec("prune-sparsegpt", pattern="2:4"),
        MethodSpec("int4-rtn", group_size=32),
    ],
    "svd": [MethodSpec("svd", rank_fraction=0.5)],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SERVED))
def test_every_format_serves_the_greedy_output_of_its_reconstructed_weights(tiny_ckpt, name):
    cfg = tiny_ckpt.config
    events: list[Progress] = []
    result = compress_model(
        tiny_ckpt.tensors,
        SERVED[name],
        calib(cfg.vocab_size),
        events.append,
        config=cfg,
        min_calibration_tokens=64,
    )
    assert (
        all(torch.isfinite(torch.tensor(e.error)) for e in events)
        and events[-1].index == events[-1].total == 14
    )
    assert len(result.per_layer_errors) == 14 and result.bytes_after > 0
    reference = Transformer(cfg).eval()
    reference.load_state_dict(dequantize_state_dict(result.tensors))
    engine = build_engine(result.tensors, cfg.to_dict(), EngineConfig(num_blocks=64, block_size=4))
    prompt = tiny_ckpt.encode("The quick brown fox jumps over the lazy dog")
    out = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0]
    assert out.output_token_ids == reference_greedy(reference, prompt, 16)


def test_composition_keeps_two_four_metadata_and_records_the_steps(tiny_ckpt):
    steps = [MethodSpec("prune-magnitude", pattern="2:4"), MethodSpec("int8")]
    result = compress_model(tiny_ckpt.tensors, steps)
    assert result.sparsity == 0.5
    q = result.tensors[f"{Q_PROJ}.qweight"]
    assert torch.all((q != 0).reshape(q.shape[0], -1, 4).sum(-1) <= 2)
    assert f"{Q_PROJ}.nm_index" in result.tensors and f"{Q_PROJ}.weight" not in result.tensors
    assert result.manifest_meta["quantization"]["method"] == "int8"
    assert [s["method"] for s in result.manifest_meta["compression"]["steps"]] == ["prune-magnitude", "int8"]
    assert set(result.per_layer_errors[Q_PROJ]) == {"prune-magnitude", "int8"}
    assert result.ratio > 1.0


def test_keep_dense_leaves_the_named_layers_untouched(tiny_ckpt):
    result = compress_model(
        tiny_ckpt.tensors, MethodSpec("int4-rtn", group_size=32, keep_dense=("model.layers.0.*",))
    )
    assert torch.equal(result.tensors[f"{Q_PROJ}.weight"], tiny_ckpt.tensors[f"{Q_PROJ}.weight"])
    assert "model.layers.1.self_attn.q_proj.qweight" in result.tensors
    assert torch.equal(
        result.tensors["model.embed_tokens.weight"], tiny_ckpt.tensors["model.embed_tokens.weight"]
    )
    assert result.manifest_meta["quantization"] == {"method": "int4", "group_size": 32, "algorithm": "rtn"}


def test_int4_packing_is_exact_for_every_code():
    codes = torch.arange(16).repeat(4, 2)  # every value in both nibble positions
    from tokenmill.common.model.quant import unpack_int4

    assert torch.equal(unpack_int4(pack_int4(codes)), codes.to(torch.uint8))


# ------------------------------------------------------------------ bad input, before any work


def test_bad_inputs_are_rejected_before_work(tiny_ckpt):
    t = tiny_ckpt.tensors
    with pytest.raises(InvalidArgument, match="group_size 48 does not divide in_features 64"):
        compress_model(t, MethodSpec("int4-rtn", group_size=48))
    with pytest.raises(InvalidArgument, match="rank bound"):
        compress_model(t, MethodSpec("svd", rank=65))
    odd = {f"{Q_PROJ}.weight": torch.randn(8, 6)}
    with pytest.raises(InvalidArgument, match="not divisible by 4"):
        compress_model(odd, MethodSpec("prune-magnitude", pattern="2:4"))
    broken = dict(t)
    broken[f"{Q_PROJ}.weight"] = t[f"{Q_PROJ}.weight"].clone()
    broken[f"{Q_PROJ}.weight"][0, 0] = float("nan")
    with pytest.raises(FailedPrecondition, match="NaN/Inf"):
        compress_model(broken, MethodSpec("int8"))


def test_calibration_data_is_checked(tiny_ckpt):
    cfg, t, gptq = tiny_ckpt.config, tiny_ckpt.tensors, MethodSpec("int4-gptq", group_size=32)
    with pytest.raises(InvalidArgument, match="needs calibration data"):
        compress_model(t, gptq, [], config=cfg)
    with pytest.raises(InvalidArgument, match="has 8 tokens; int4-gptq needs at least 128"):
        compress_model(t, gptq, [torch.zeros(1, 8, dtype=torch.long)], config=cfg)
    with pytest.raises(InvalidArgument, match="outside the model's vocabulary"):
        compress_model(t, gptq, [torch.full((4, 64), cfg.vocab_size)], config=cfg)
    with pytest.raises(InvalidArgument, match="integer token ids"):
        compress_model(t, gptq, [torch.zeros(4, 64)], config=cfg)
    with pytest.raises(InvalidArgument, match="pass its ModelConfig"):
        compress_model(t, gptq, calib(cfg.vocab_size))


def test_compositions_that_do_not_apply_say_why(tiny_ckpt):
    """The source checkpoint's state is a FAILED_PRECONDITION, two steps of one call that contradict
    each other an INVALID_ARGUMENT; either way the message names both methods."""
    t = tiny_ckpt.tensors
    int4 = compress_model(t, MethodSpec("int4-rtn", group_size=32)).tensors
    with pytest.raises(
        FailedPrecondition, match="int4-rtn cannot be applied to .* with int4 quant.*already quantized"
    ):
        compress_model(int4, MethodSpec("int4-rtn", group_size=32))
    with pytest.raises(FailedPrecondition, match="svd cannot be applied to .* with int4 quantization"):
        compress_model(int4, MethodSpec("svd", rank=4))
    with pytest.raises(FailedPrecondition, match="prune-magnitude cannot be applied to .* with int4"):
        compress_model(int4, MethodSpec("prune-magnitude"))
    int8 = compress_model(t, MethodSpec("int8")).tensors
    with pytest.raises(FailedPrecondition, match="int4-rtn cannot be applied to .* with int8 quantization"):
        compress_model(int8, MethodSpec("int4-rtn", group_size=32))
    svd = compress_model(t, MethodSpec("svd", rank=4)).tensors
    with pytest.raises(FailedPrecondition, match="int8 cannot be applied to .* with svd.*not a dense weight"):
        compress_model(svd, MethodSpec("int8"))
    with pytest.raises(
        InvalidArgument, match="int4-gptq cannot be applied to the output of prune-wanda.*refill"
    ):
        compress_model(
            t, [MethodSpec("prune-wanda"), MethodSpec("int4-gptq")], calib(tiny_ckpt.config.vocab_size)
        )
    with pytest.raises(InvalidArgument, match="int8 cannot be applied to the output of svd"):
        compress_model(t, [MethodSpec("svd", rank=4), MethodSpec("int8")])


def test_keep_dense_patterns_that_match_nothing_or_everything_are_refused(tiny_ckpt):
    """A typo would silently compress what it meant to keep; keeping everything would label the
    source as compressed."""
    with pytest.raises(InvalidArgument, match="pattern '\\*.down_prj' matches no decoder linear"):
        compress_model(tiny_ckpt.tensors, MethodSpec("int8", keep_dense=("*.down_prj",)))
    with pytest.raises(InvalidArgument, match="keeps every one of the .* linears dense"):
        compress_model(tiny_ckpt.tensors, MethodSpec("int8", keep_dense=("*",)))


def test_reported_sparsity_counts_the_zeros_stored_and_a_step_that_prunes_nothing_is_refused(tiny_ckpt):
    first = compress_model(tiny_ckpt.tensors, MethodSpec("prune-magnitude", sparsity=0.7))
    history = first.manifest_meta["compression"]
    then = compress_model(first.tensors, MethodSpec("prune-magnitude", pattern="2:4"), history=history)
    linears = [v for k, v in then.tensors.items() if k.endswith("_proj.weight")]
    zeros = sum(int((w == 0).sum()) for w in linears) / sum(w.numel() for w in linears)
    assert then.sparsity == pytest.approx(zeros) and then.sparsity > 0.7
    with pytest.raises(FailedPrecondition, match="sparsity 0.3 would prune nothing: .* already 0.7 sparse"):
        compress_model(first.tensors, MethodSpec("prune-magnitude", sparsity=0.3), history=history)
    with pytest.raises(InvalidArgument, match="sparsity 0.5 would prune nothing"):
        compress_model(
            tiny_ckpt.tensors, [MethodSpec("prune-magnitude", sparsity=0.6), MethodSpec("prune-magnitude")]
        )


def test_svd_keeps_dense_the_layers_whose_factors_would_be_larger_and_says_so(tiny_ckpt):
    t = tiny_ckpt.tensors
    with pytest.raises(
        InvalidArgument, match="every layer.s factors would be larger .* rank_fraction <= 0\\.6"
    ):
        compress_model(t, MethodSpec("svd", rank_fraction=0.9))
    # An energy threshold fixes no rank up front: the step finds out, and a result that would be
    # the source again (every layer dense) fails rather than storing a copy with ratio 1.0.
    with pytest.raises(FailedPrecondition, match="svd energy 1.0: every layer .* lower the energy"):
        compress_model(t, MethodSpec("svd", energy=1.0))
    q = t[f"{Q_PROJ}.weight"]
    low_rank_q = {**t, f"{Q_PROJ}.weight": q[:, :4] @ q[:4, :]}  # rank 4: all its energy in 4 values
    some = compress_model(low_rank_q, MethodSpec("svd", energy=0.999))
    dense = [k for k in t if k.endswith("_proj.weight") and k in some.tensors]
    assert f"{Q_PROJ}.svd_u" in some.tensors and some.ratio > 1.0 and len(some.notes) == len(dense) > 0
    assert all("kept dense: rank" in note for note in some.notes)
    assert torch.equal(some.tensors[dense[0]], t[dense[0]])
    half = compress_model(t, MethodSpec("svd", rank_fraction=0.5))
    assert half.notes == [] and f"{Q_PROJ}.svd_u" in half.tensors and half.ratio > 1.0


def test_a_recorded_history_names_the_earlier_method_and_is_carried_into_the_new_manifest(tiny_ckpt):
    """An unstructured-pruned checkpoint looks dense; its manifest's history is what says GPTQ would
    refill it, and a following int8 records both steps and keeps the sparsity."""
    pruned = compress_model(tiny_ckpt.tensors, MethodSpec("prune-magnitude", sparsity=0.5))
    history = pruned.manifest_meta["compression"]
    with pytest.raises(FailedPrecondition, match="int4-gptq cannot be applied to .* with prune-magnitude"):
        compress_model(
            pruned.tensors, MethodSpec("int4-gptq", group_size=32), calib(tiny_ckpt.config.vocab_size),
            config=tiny_ckpt.config, history=history,
        )  # fmt: skip
    with pytest.raises(FailedPrecondition, match="svd cannot be applied to .* with prune-magnitude"):
        compress_model(pruned.tensors, MethodSpec("svd", rank=4), history=history)
    then = compress_model(pruned.tensors, MethodSpec("int8"), history=history)
    steps = then.manifest_meta["compression"]["steps"]
    assert [s["method"] for s in steps] == ["prune-magnitude", "int8"] and steps[0]["sparsity"] == 0.5
    assert then.sparsity == 0.5 and then.manifest_meta["compression"]["sparsity"] == 0.5
    assert then.manifest_meta["quantization"] == {"method": "int8", "algorithm": "rtn"}
    w = dequantize_state_dict(then.tensors)[f"{Q_PROJ}.weight"]
    assert torch.equal(w == 0, pruned.tensors[f"{Q_PROJ}.weight"] == 0)  # int8 keeps every zero a zero

    with pytest.raises(InvalidArgument, match="unknown compression method"):
        MethodSpec("int3")
    with pytest.raises(InvalidArgument, match="sparsity must be in"):
        MethodSpec("prune-magnitude", sparsity=1.0)
    with pytest.raises(InvalidArgument, match="exactly one of rank"):
        MethodSpec("svd", rank=4, energy=0.9)
    with pytest.raises(InvalidArgument, match="unknown compression setting"):
        MethodSpec.from_dict({"method": "int8", "bits": 3})


@pytest.mark.parametrize(
    "overrides",
    [
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}},
        {"model_type": "mistral", "sliding_window": 8},
    ],
    ids=["yarn", "sliding-window"],
)
def test_calibration_feeds_each_block_what_the_model_feeds_it(tiny_ckpt, overrides):
    """Blocks run one at a time for calibration see the model's own activations: yarn's attention
    scaling (and every other rope setting) included, not a plain rope rebuilt beside the model."""
    from tests.fixtures.inference import random_model, tiny_config
    from tokenmill.common.compress.calibrate import blocks_with_inputs

    model = random_model(tiny_config(tiny_ckpt.config.vocab_size, **overrides))
    batches = calib(model.config.vocab_size, rows=2, seq=40)
    *_, (_, _, inputs) = blocks_with_inputs(model, batches)  # the last block's inputs
    last = model.model.layers[-1]
    with torch.no_grad():
        outputs = [model.model.norm(last(x, cos, sin)) for x, cos, sin in inputs]
        for ids, got in zip(batches, outputs, strict=True):
            assert torch.allclose(got, model.hidden_states(ids), atol=1e-5)
