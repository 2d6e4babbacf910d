"""Model families, explicitly: Llama (with biases), Qwen2 (tied or not) and Mistral built and saved by
transformers, imported through the HF layout, equal HF's logits in both our training model and the
engine's paged prefill, and greedy ids through the engine; anything unsupported is refused at import
with INVALID_ARGUMENT naming the field, and nothing is stored."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tokenmill.common import errors
from tokenmill.common.inference import EngineConfig, SamplingParams, build_engine
from tokenmill.common.inference.config import ModelSpec
from tokenmill.common.inference.model import AttnMeta, DecodeMeta, PagedLlama, PrefillMeta
from tokenmill.common.model.transformer import ModelConfig, Transformer
from tokenmill.common.runtime.proto_struct import struct_to_dict

transformers = pytest.importorskip("transformers")

CONTEXT = 64
BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=CONTEXT,
    bos_token_id=1,
    eos_token_id=[2, 3],
)
CASES = {
    "llama-attention-mlp-bias": ("Llama", dict(attention_bias=True, mlp_bias=True)),
    "qwen2-untied": ("Qwen2", dict(tie_word_embeddings=False)),
    "qwen2-tied": ("Qwen2", dict(tie_word_embeddings=True)),
    "mistral-no-window": ("Mistral", dict(sliding_window=None)),
    "mistral-window-at-context": ("Mistral", dict(sliding_window=CONTEXT)),
}


def hf_model(family: str, **overrides):
    """A random HF model with spread-out weights and non-zero biases (HF initialises biases to 0)."""
    cfg = getattr(transformers, f"{family}Config")(**{**BASE, **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif p.dim() == 2:
                p.normal_(0.0, 0.08)
    return model


def engine_prefill_logits(
    config: dict,
    tensors: dict[str, torch.Tensor],
    ids: list[int],
    chunks: list[int] | None = None,
    block: int = 4,
) -> torch.Tensor:
    """The paged model's logits at every position of one sequence fed in `chunks` (default: one
    prefill chunk): chunks of 1 run as decode steps, longer ones as prefill chunks over the cache.
    Blocks are laid out in reverse order so a table is never the identity. For dynamic rope, each
    token's rope length is what the runner passes: the prompt (all of `ids`) for every position."""
    model = PagedLlama(ModelSpec.from_dict(config), tensors, dtype=torch.float32, device="cpu")
    n = len(ids)
    nblocks = -(-n // block)
    caches = model.allocate_kv_cache(nblocks + 1, block)
    table = torch.arange(nblocks, 0, -1)[None]
    out, start = [], 0
    for size in chunks or [n]:
        pos = torch.arange(start, start + size)
        slots = table[0, pos // block] * block + pos % block
        ctx = torch.tensor([start + size])
        if size == 1:
            meta = AttnMeta(slots, 1, DecodeMeta(table, ctx), None)
        else:
            meta = AttnMeta(slots, 0, None, PrefillMeta(table, ctx, torch.tensor([size])))
        with torch.inference_mode():
            lens = torch.full((size,), n)
            out.append(
                model(torch.tensor(ids[start : start + size]), pos, meta, caches, block, rope_lens=lens)
            )
        start += size
    assert start == n
    return torch.cat(out)


@pytest.mark.parametrize("case", sorted(CASES))
def test_family_imports_and_equals_hf(ckpt, tmp_path, case):
    family, overrides = CASES[case]
    hf = hf_model(family, **overrides)
    hf.save_pretrained(tmp_path / "hf")
    ckpt.client.import_hf(tmp_path / "hf", case)
    stored = ckpt.client.get(case, include_manifest=True)
    config = struct_to_dict(stored.manifest.config)
    assert config["model_type"] == family.lower() and config["eos_token_id"] == [2, 3]
    tensors = ckpt.client.load(stored.ref)

    ids = torch.randint(0, BASE["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(input_ids=ids).logits[0]
    ours = Transformer(ModelConfig.from_dict(config)).eval()
    missing, unexpected = ours.load_state_dict(tensors, strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if config["tie_embeddings"] else [])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        engine_prefill_logits(config, tensors, ids[0].tolist()), want, atol=1e-4, rtol=1e-4
    )

    engine = build_engine(
        tensors, config, EngineConfig(num_blocks=64, block_size=4, max_num_batched_tokens=16)
    )
    prompts = [ids[0, :n].tolist() for n in (1, 7, 23)]
    done = engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    for prompt, req in zip(prompts, done, strict=True):
        with torch.no_grad():
            g = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None)
        assert req.output_token_ids == g[0, len(prompt) :].tolist()


def _saved(tmp_path, family: str, **overrides):
    src = tmp_path / "hf"
    hf_model(family, **overrides).save_pretrained(src)
    return src


def _edit_config(src, **changes) -> None:
    path = src / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _rope(**rope):
    def edit(src) -> None:
        _edit_config(src, rope_parameters=rope, rope_scaling=rope)

    return edit


def _stray_tensor(src) -> None:
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})


REJECTED = {
    "unknown-architecture": (
        "Llama",
        {},
        lambda src: _edit_config(src, architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox"),
        "architectures",
    ),
    "longrope": ("Llama", {}, _rope(rope_type="longrope", factor=2.0), "rope_type='longrope'"),
    "dynamic-without-factor": ("Llama", {}, _rope(rope_type="dynamic"), "rope_scaling.factor"),
    "partial-rotary": (
        "Llama",
        {},
        lambda src: _edit_config(src, partial_rotary_factor=0.5),
        "partial_rotary",
    ),
    "qwen2-sliding-layers-without-window": (
        "Qwen2",
        {},
        lambda src: _edit_config(src, layer_types=["sliding_attention"] * 2),
        "layer_types has sliding_attention",
    ),
    "mistral-window-zero": (
        "Mistral",
        {},
        lambda src: _edit_config(src, sliding_window=0),
        "sliding_window=0",
    ),
    "qwen2-saved-as-llama": (
        "Qwen2",
        {},
        lambda src: _edit_config(src, architectures=["LlamaForCausalLM"], model_type="llama"),
        "q_proj.bias",
    ),
    "unused-tensor": ("Llama", {}, _stray_tensor, "model.layers.0.self_attn.q_proj.bias"),
    # transformers >= 5 keeps a distinct lm_head.weight untied; tokenmill would tie it to the embedding
    "tied-config-own-lm-head": (
        "Llama",
        {},
        lambda src: _edit_config(src, tie_word_embeddings=True),
        "tie_word_embeddings=True",
    ),
    "untied-config-tied-weights": (
        "Llama",
        dict(tie_word_embeddings=True),
        lambda src: _edit_config(src, tie_word_embeddings=False),
        "tie_word_embeddings=False",
    ),
    # configs the engine would load only to fail at serve time or compute NaN: refused at import
    "eos-not-a-token-id": ("Llama", {}, lambda src: _edit_config(src, eos_token_id="x"), "eos_token_id"),
    "rope-factor-zero": ("Llama", {}, _rope(rope_type="linear", factor=0), "rope_scaling.factor"),
    "yarn-factor-negative": (
        "Llama",
        {},
        _rope(rope_type="yarn", factor=-2.0, original_max_position_embeddings=32),
        "rope_scaling.factor",
    ),
    "rms-norm-eps-negative": ("Llama", {}, lambda src: _edit_config(src, rms_norm_eps=-1.0), "rms_norm_eps"),
    "no-context": (
        "Mistral",
        {},
        lambda src: _edit_config(src, max_position_embeddings=0),
        "max_position_embeddings",
    ),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_unsupported_config_is_refused_at_import_and_nothing_stored(ckpt, tmp_path, case):
    family, overrides, edit, field = REJECTED[case]
    src = _saved(tmp_path, family, **overrides)
    if edit is not None:
        edit(src)
    with pytest.raises(errors.InvalidArgument, match=field.replace("[", r"\[")):
        ckpt.client.import_hf(src, case)
    with pytest.raises(errors.NotFound):
        ckpt.client.get(case)
    assert ckpt.client.stats().chunks == 0


def test_tied_checkpoint_that_also_saves_lm_head_imports_and_equals_hf(ckpt, tmp_path):
    """Some tied checkpoints store lm_head.weight too, equal to the embedding: that is no mismatch."""
    hf = hf_model("Qwen2", tie_word_embeddings=True)
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    tensors = load_file(str(src / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    ckpt.client.import_hf(src, "tied")
    stored = ckpt.client.get("tied", include_manifest=True)
    config = struct_to_dict(stored.manifest.config)
    ids = torch.randint(0, BASE["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(input_ids=ids).logits[0]
    got = engine_prefill_logits(config, ckpt.client.load(stored.ref), ids[0].tolist())
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_cli_import_prints_the_reason_and_exits_non_zero(ckpt, tmp_path):
    from click.testing import CliRunner

    from tests.fixtures.checkpoint import TEST_TOKEN
    from tokenmill.common.cli.main import cli

    src = _saved(tmp_path, "Llama")
    _rope(rope_type="longrope", factor=2.0)(src)
    cfg = tmp_path / "cli.yaml"
    cfg.write_text(
        f"data_dir: {tmp_path}\nauth:\n  tokens: ['{TEST_TOKEN}']\n"
        f"services:\n  checkpoint:\n    port: {ckpt.app.port}\n"
    )
    result = CliRunner().invoke(cli, ["--config", str(cfg), "ckpt", "import", str(src), "windowed"])
    assert result.exit_code != 0
    assert "INVALID_ARGUMENT" in result.output and "rope_type='longrope'" in result.output
    with pytest.raises(errors.NotFound):
        ckpt.client.get("windowed")


def test_config_round_trip_keeps_family_biases_and_all_eos_ids():
    for family, overrides in CASES.values():
        hf_cfg = getattr(transformers, f"{family}Config")(**{**BASE, **overrides}).to_dict()
        ours = ModelConfig.from_hf_config(hf_cfg)
        assert ours.eos_token_ids == (2, 3) and ours.eos_token_id == [2, 3]
        again = ModelConfig.from_hf_config(ours.to_hf_config())
        assert again == ours, family
        rebuilt = getattr(transformers, f"{family}Config")(**ours.to_hf_config())
        assert ModelConfig.from_hf_config(rebuilt.to_dict()) == ours, family
