"""Hugging Face layout: an exported checkpoint loads in transformers as LlamaForCausalLM, and an
HF directory imports and round-trips exactly."""

from __future__ import annotations

import json

import pytest
import torch

from tokenmill.common import errors

transformers = pytest.importorskip("transformers")


def tiny_tokenizer_json() -> bytes:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(
        ["hello world", "hello tokenmill"], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"])
    )
    return tok.to_str().encode()


def tiny_llama_config() -> transformers.LlamaConfig:
    """A Llama small enough to build, save and run in a test: 2 layers, GQA (4 heads, 2 KV)."""
    return transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def test_import_export_round_trip_in_transformers(ckpt, tmp_path):
    cfg = tiny_llama_config()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    src = tmp_path / "hf"
    model.save_pretrained(src)
    (src / "tokenizer.json").write_bytes(tiny_tokenizer_json())
    v = ckpt.client.import_hf(src, "llama-tiny", tags=["imported"])
    assert v.ref == "llama-tiny:1" and "imported" in v.tags
    stored = ckpt.client.get("llama-tiny")
    assert stored.manifest.config["num_layers"] == 2  # tokenmill model config derived from config.json
    assert {f.name for f in stored.manifest.files} >= {"config.json", "tokenizer.json"}
    out = ckpt.client.export_hf("llama-tiny:imported", tmp_path / "out")
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    # importing the export again stores no new bytes (same tensors, same files)
    again = ckpt.client.import_hf(out, "llama-tiny")
    assert again.new_bytes == 0


def test_trainer_checkpoint_exports_to_transformers(ckpt, tmp_path):
    from tokenmill.common.model.transformer import ModelConfig, Transformer

    cfg = ModelConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=64,
    )
    torch.manual_seed(1)
    model = Transformer(cfg).eval()
    state = {k: v for k, v in model.state_dict().items()}
    state["optim.step"] = torch.tensor(3)  # training state is kept in the store, not exported
    ckpt.client.save("trained", state, config=cfg.to_dict(), files={"tokenizer.json": tiny_tokenizer_json()})
    out = ckpt.client.export_hf("trained", tmp_path / "out")
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["model_type"] == "llama" and hf_cfg["num_hidden_layers"] == 2
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        ours = model(ids)
        ours = ours[0] if isinstance(ours, tuple) else ours
        torch.testing.assert_close(hf(ids).logits, ours, rtol=1e-4, atol=1e-4)


def test_pickle_only_directory_is_refused(ckpt, tmp_path):
    src = tmp_path / "pickled"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    # a pickle that would run code if loaded; the importer must never open it
    (src / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'touch /tmp/pwned-by-ckpt-test'\ntR.")
    with pytest.raises(errors.FailedPrecondition, match="never unpickles"):
        ckpt.client.import_hf(src, "evil")
    with pytest.raises(errors.NotFound, match="config.json"):
        ckpt.client.import_hf(tmp_path, "nothing")


def test_export_without_config_is_failed_precondition(ckpt, tmp_path):
    ckpt.client.save("noconf", {"model.w": torch.zeros(2)})
    with pytest.raises(errors.FailedPrecondition, match="no model config"):
        ckpt.client.export_hf("noconf", tmp_path / "out")


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_compressed_checkpoint_exports_dense_weights_transformers_loads(ckpt, tmp_path, method):
    """A quantized version exports as the dense weights it serves with: transformers loads every
    tensor (none left randomly initialised) and computes what the dequantized weights compute."""
    from tokenmill.common.model.quant import dequantize_state_dict, quantize_state_dict

    cfg = tiny_llama_config()
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    base = ckpt.client.import_hf(tmp_path / "hf", "llama-q")
    stored = ckpt.client.get(base.ref, include_manifest=True)
    quantized = quantize_state_dict(ckpt.client.load(base.ref), method, group_size=16)
    files = ckpt.client.load_files(base.ref, [f.name for f in stored.manifest.files])
    v = ckpt.client.save("llama-q", quantized, files=files, config=dict(stored.manifest.config))

    out = ckpt.client.export_hf(v.ref, tmp_path / "out")
    reloaded, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    reference = transformers.LlamaForCausalLM(cfg).eval()
    reference.load_state_dict(dequantize_state_dict(quantized))
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(ids).logits, reference(ids).logits)
