"""The model-family registry as the trainer and the checkpoint HF interop see it.

Tiny Llama (biases, every rope type), Qwen2 (tied, untied, per-layer windows) and Mistral (a window
shorter than the sequence) models are built and saved by transformers, imported with ``import_hf``,
and then: the training Transformer gives HF's logits, loss and gradients; the trainer engine
fine-tunes from the imported checkpoint and ``export_hf`` writes a directory transformers loads as
the same family with the trainer's logits; the exported config.json imports again without new
bytes; and configs no family serves exactly are refused at import, naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tokenmill.common import errors
from tokenmill.common.model.transformer import ModelConfig, Transformer
from tokenmill.common.runtime.proto_struct import struct_to_dict

transformers = pytest.importorskip("transformers")

VOCAB = 512  # the train_dataset tokenizer's vocabulary
CONTEXT = 32
SEQ = 48  # longer than the context (dynamic rope) and than every window below
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=CONTEXT,
    bos_token_id=1,
    eos_token_id=2,
)
LLAMA3 = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)
YARN = dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=16, beta_fast=16, beta_slow=2)
CASES = {
    "llama-biases": ("Llama", dict(attention_bias=True, mlp_bias=True)),
    "llama-linear": ("Llama", dict(rope_scaling=dict(rope_type="linear", factor=2.0))),
    "llama-dynamic": ("Llama", dict(rope_scaling=dict(rope_type="dynamic", factor=2.0))),
    "llama-llama3": ("Llama", dict(rope_scaling=LLAMA3, attention_bias=True)),
    "llama-yarn": ("Llama", dict(rope_scaling=YARN, mlp_bias=True)),
    "qwen2-tied": ("Qwen2", dict(tie_word_embeddings=True)),
    "qwen2-untied": ("Qwen2", dict(tie_word_embeddings=False)),
    "qwen2-window-layers": ("Qwen2", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "mistral-window": ("Mistral", dict(sliding_window=5)),
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


def _ids(n: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


def _imported(ckpt, tmp_path: Path, case: str):
    family, overrides = CASES[case]
    hf = hf_model(family, **overrides)
    hf.save_pretrained(tmp_path / "hf")
    version = ckpt.client.import_hf(tmp_path / "hf", case)
    stored = ckpt.client.get(version.ref, include_manifest=True)
    return hf, version.ref, struct_to_dict(stored.manifest.config)


def _ours(config: dict, tensors: dict[str, torch.Tensor]) -> Transformer:
    model = Transformer(ModelConfig.from_dict(config))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if config["tie_embeddings"] else [])
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_model_equals_hf_logits_loss_and_gradients(ckpt, tmp_path, case):
    hf, ref, config = _imported(ckpt, tmp_path, case)
    ours = _ours(config, ckpt.client.load(ref))
    hf.train()
    ours.train()
    ids = _ids()
    labels = ids.clone()
    labels[0, :7] = -100  # masked prompt tokens, as SFT sends them
    want = hf(input_ids=ids, labels=labels)
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)  # ours: already shifted
    logits, loss = ours(ids, targets)
    torch.testing.assert_close(logits, want.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, want.loss, rtol=1e-4, atol=1e-5)
    want.loss.backward()
    loss.backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        g = theirs[name].grad
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-4 * float(g.abs().max()), msg=name)


def _fine_tune(ckpt, train_dataset, init: str, run_id: str) -> str:
    from tokenmill.common.trainer.backends.local import run_local
    from tokenmill.common.trainer.config import TrainConfig

    cfg = TrainConfig(
        dataset_path=str(train_dataset),
        init_checkpoint=init,
        output_name=f"{run_id}-ft",
        run_id=run_id,
        workers=1,
        steps=3,
        micro_batch_size=2,
        seq_len=SEQ,
        lr=3e-3,
        warmup_steps=0,
        checkpoint_every=0,
    )
    result = run_local(cfg, {"kind": "local", "root": str(ckpt.root)})
    assert result["status"] == "completed", result
    return result["checkpoint"]


CHAT = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
TRAINED = ["llama-biases", "llama-yarn", "qwen2-tied", "qwen2-window-layers", "mistral-window"]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", TRAINED)
def test_fine_tuned_import_exports_as_the_same_family(ckpt, tmp_path, train_dataset, case):
    family, overrides = CASES[case]
    hf = hf_model(family, pad_token_id=0, **overrides)
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    side = {
        "tokenizer.json": (train_dataset / "tokenizer.json").read_bytes(),  # the model's = the data's
        "tokenizer_config.json": json.dumps({"eos_token": "<|endoftext|>", "chat_template": CHAT}).encode(),
    }
    for name, data in side.items():
        (src / name).write_bytes(data)
    ref = ckpt.client.import_hf(src, case).ref
    trained = _fine_tune(ckpt, train_dataset, ref, case)
    stored = ckpt.client.get(trained, include_manifest=True)
    tensors = ckpt.client.load(stored.ref)
    assert not torch.equal(tensors["model.embed_tokens.weight"], hf.model.embed_tokens.weight), "not trained"
    out = ckpt.client.export_hf(trained, tmp_path / "out")
    # the imported config.json and side files travel through fine-tuning unchanged (pad_token_id too)
    for name in ("config.json", "generation_config.json", *side):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    exported = json.loads((out / "config.json").read_text())
    original = json.loads((src / "config.json").read_text())
    for key in (
        "model_type",
        "architectures",
        "attention_bias",
        "mlp_bias",
        "tie_word_embeddings",
        "head_dim",
        "eos_token_id",
    ):
        assert exported.get(key) == original.get(key), key
    assert _semantics(exported) == _semantics(original)
    cls = getattr(transformers, original["architectures"][0])
    reloaded, info = cls.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    reloaded.eval()
    ours = _ours(model_config(stored), tensors).eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
    # (3) the export is the checkpoint itself: importing it again stores nothing new
    again = ckpt.new_client().import_hf(out, f"{case}-again")  # the trainer's chunk size
    assert again.new_bytes == 0
    twice = ckpt.client.export_hf(again.ref, tmp_path / "twice")
    assert (twice / "config.json").read_bytes() == (out / "config.json").read_bytes()


def model_config(stored) -> dict:
    """The tokenmill model config of a stored version (from its HF config when it stores one)."""
    config = struct_to_dict(stored.manifest.config)
    if "num_hidden_layers" in config:
        return ModelConfig.from_hf_config(config).to_dict()
    return config


def _semantics(hf_config: dict) -> dict:
    """What transformers makes of a config.json: rope parameters and per-layer attention kinds."""
    cfg = transformers.AutoConfig.for_model(**hf_config)
    layer_types = getattr(cfg, "layer_types", None) if cfg.model_type == "qwen2" else None
    window = getattr(cfg, "sliding_window", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        window = None
    return {
        "rope": cfg.rope_parameters,
        "layer_types": layer_types,
        "window": window,
        "biases": [getattr(cfg, k, None) for k in ("attention_bias", "mlp_bias")],
    }


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lora_fine_tunes_a_qwen2_import_with_its_qkv_biases(ckpt, tmp_path, train_dataset, sft_jsonl):
    """Qwen2's q/k/v carry biases: LoRA over them keeps each frozen bias (it used to refuse any
    biased projection, so the default q_proj/v_proj targets could not train a Qwen2 model)."""
    from tokenmill.common.model.lora import adapter_state_dict, apply_lora, load_adapter, merge_lora
    from tokenmill.common.trainer.backends.local import run_local
    from tokenmill.common.trainer.checkpoint_io import read_full
    from tokenmill.common.trainer.config import LoraSettings, TrainConfig
    from tokenmill.common.trainer.local_io import LocalCheckpointIO

    hf, ref, config = _imported(ckpt, tmp_path, "qwen2-untied")
    cfg = TrainConfig(
        mode="lora",
        sft_path=str(sft_jsonl),
        dataset_path=str(train_dataset),
        init_checkpoint=ref,
        output_name="qwen2-adapter",
        run_id="qwen2-lora",
        workers=1,
        steps=3,
        micro_batch_size=2,
        seq_len=SEQ,
        lr=1e-2,
        warmup_steps=0,
        lora=LoraSettings(rank=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]),
    )
    result = run_local(cfg, {"kind": "local", "root": str(ckpt.root)})
    assert result["status"] == "completed", result
    adapters = read_full(LocalCheckpointIO(ckpt.root), result["checkpoint"])
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if ".lora_B." in k), "adapters never trained"

    model = _ours(config, ckpt.client.load(ref)).eval()
    apply_lora(model, rank=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj"])
    assert set(adapter_state_dict(model)) == set(adapters)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)  # B = 0: the base
        load_adapter(model, adapters)
        adapted = model(ids)
        merge_lora(model)
        torch.testing.assert_close(model(ids), adapted, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(adapted, hf(ids).logits, atol=1e-3)


def _strip(src: Path, *fields: str) -> None:
    path = src / "config.json"
    cfg = json.loads(path.read_text())
    for name in fields:
        cfg.pop(name, None)
    path.write_text(json.dumps(cfg))


OMITTED = {
    # a trimmed config.json means what transformers' config class defaults make of it
    "mistral": ("Mistral", dict(num_attention_heads=16, hidden_size=256, head_dim=None), ("sliding_window", "rms_norm_eps", "num_key_value_heads")),
    "qwen2": ("Qwen2", dict(num_attention_heads=32, hidden_size=256, head_dim=None), (
        "rms_norm_eps", "num_key_value_heads", "max_position_embeddings", "layer_types", "max_window_layers",
    )),
    "llama": ("Llama", {}, ("rms_norm_eps", "max_position_embeddings", "bos_token_id", "eos_token_id")),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(OMITTED))
def test_omitted_config_fields_take_the_family_defaults_of_transformers(tmp_path, case):
    family, overrides, omitted = OMITTED[case]
    cfg = getattr(transformers, f"{family}Config")(**{**BASE, **overrides})
    src = tmp_path / "hf"
    cfg.save_pretrained(src)
    _strip(src, *omitted)
    loaded = transformers.AutoConfig.from_pretrained(src)  # what transformers builds from the file
    ours = ModelConfig.from_hf_config(json.loads((src / "config.json").read_text()))
    assert ours == ModelConfig.from_hf_config(loaded.to_dict())
    assert ours.rms_norm_eps == loaded.rms_norm_eps == 1e-6
    assert ours.num_kv_heads == loaded.num_key_value_heads
    assert ours.max_seq_len == loaded.max_position_embeddings


ROPE_BOTH = {
    # transformers reads a non-empty rope_scaling (and rope_theta) and ignores rope_parameters then
    "scaling-wins": dict(
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        rope_theta=5000.0,
        rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 7000.0},
    ),
    "default-scaling-wins": dict(
        rope_scaling={"rope_type": "default"},
        rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 7000.0},
    ),
    "theta-inside-scaling": dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 700.0}),
}


@pytest.mark.parametrize("case", sorted(ROPE_BOTH))
def test_rope_read_as_transformers_reads_both_spellings(ckpt, tmp_path, case):
    src = tmp_path / "hf"
    hf_model("Llama").save_pretrained(src)
    path = src / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **ROPE_BOTH[case]}))
    hf = transformers.LlamaForCausalLM.from_pretrained(src).eval()
    version = ckpt.client.import_hf(src, case)
    config = struct_to_dict(ckpt.client.get(version.ref, include_manifest=True).manifest.config)
    ours = _ours(config, ckpt.client.load(version.ref)).eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def _edit(**changes):
    def edit(src: Path) -> None:
        path = src / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


REFUSED = {
    "longrope": ("Llama", _edit(rope_parameters={"rope_type": "longrope", "factor": 2.0}), "rope_type='longrope'"),
    "gelu": ("Qwen2", _edit(hidden_act="gelu_pytorch_tanh"), "hidden_act='gelu_pytorch_tanh'"),
    "head-dim-mismatch": ("Mistral", _edit(head_dim=32), "head_dim=32"),
    "head-dim-zero": ("Llama", _edit(head_dim=0), "head_dim must be positive"),
    "rope-theta-zero": ("Llama", _edit(rope_parameters={"rope_type": "default", "rope_theta": 0.0}), "rope_theta"),
    "qwen2-window-layers-without-use": (
        "Qwen2",
        _edit(use_sliding_window=False, sliding_window=8, layer_types=["sliding_attention"] * 3),
        "use_sliding_window=False",
    ),
    "kv-heads-mismatch": ("Llama", _edit(num_key_value_heads=4), "num_key_value_heads=4"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_config_no_family_serves_exactly_is_refused_at_import(ckpt, tmp_path, case):
    family, edit, field = REFUSED[case]
    src = tmp_path / "hf"
    hf_model(family).save_pretrained(src)
    edit(src)
    with pytest.raises(errors.InvalidArgument, match=field.replace("[", r"\[")):
        ckpt.client.import_hf(src, case)
    with pytest.raises(errors.NotFound):
        ckpt.client.get(case)
