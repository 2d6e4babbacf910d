"""Export checkpoints to, and import them from, the Hugging Face model layout.

The layout is a directory with ``config.json`` (a Llama, Qwen2 or Mistral config), ``model.safetensors`` (or
sharded ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``) and
``tokenizer.json``; ``transformers`` loads it as e.g. ``LlamaForCausalLM``. Parameter names need no
mapping: `tokenmill.common.model.transformer` uses HF's names. Weights are read only from safetensors: a directory that
has only ``pytorch_model.bin`` is refused rather than unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tokenmill.common import errors
from tokenmill.common.errors import InvalidArgument

if TYPE_CHECKING:
    from tokenmill.common.clients.checkpoint import CheckpointClient

WEIGHT_PREFIXES = ("model.", "lm_head.")
# files carried through an import/export unchanged when present
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",  # transformers >= 4.5x saves the chat template here, not in tokenizer_config
)


def hf_config_from_manifest(config: Mapping[str, Any], files: Mapping[str, bytes]) -> dict[str, Any]:
    """The config.json to write: the imported one if the checkpoint carries it, else derived
    from the tokenmill model config (tokenmill.common.model.transformer.ModelConfig) or taken as-is if already HF."""
    if "config.json" in files:
        return json.loads(files["config.json"])
    if not config:
        raise errors.FailedPrecondition(
            "checkpoint has no model config and no config.json file; it cannot be exported to the HF layout"
        )
    if "num_hidden_layers" in config:  # already an HF config.json (ModelConfig says num_layers)
        return dict(config)
    from tokenmill.common.model.transformer import ModelConfig

    try:
        return ModelConfig.from_dict(dict(config)).to_hf_config()
    except (TypeError, ValueError) as exc:
        raise errors.FailedPrecondition(f"checkpoint config is not a model config: {exc}") from None


def model_config_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The tokenmill model config for an imported HF config; InvalidArgument names the field of
    anything outside the supported families (never stored as-is to fail or run wrong later)."""
    from tokenmill.common.model.transformer import ModelConfig

    return ModelConfig.from_hf_config(dict(hf)).to_dict()


# Buffers some HF checkpoints save that the model recomputes from the config.
_RECOMPUTED_SUFFIXES = ("rotary_emb.inv_freq",)


def check_tensors(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """InvalidArgument unless `tensors` are exactly the model's parameters (names and shapes):
    a tensor the model would not read means a feature it would silently ignore."""
    from tokenmill.common.model.transformer import ModelConfig, Transformer

    cfg = ModelConfig.from_dict(dict(config))
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    optional = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unused = sorted(k for k in tensors if k not in expected and not k.endswith(_RECOMPUTED_SUFFIXES))
    if unused:
        raise InvalidArgument(
            f"{len(unused)} tensor(s) that a {cfg.model_type} model with this config.json does not use: "
            f"{unused[:8]}; importing would silently drop them"
        )
    missing = sorted(set(expected) - set(tensors) - optional)
    if missing == ["lm_head.weight"]:
        raise InvalidArgument(
            "tie_word_embeddings=False but the checkpoint has no lm_head.weight; "
            "a model saved with tied embeddings needs tie_word_embeddings=True"
        )
    if missing:
        raise InvalidArgument(f"{len(missing)} tensor(s) missing from the checkpoint: {missing[:8]}")
    wrong = [k for k, shape in expected.items() if k in tensors and tuple(tensors[k].shape) != shape]
    if wrong:
        fields = sorted({f for k in wrong for f in _shape_fields(k)})
        values = _hf_shape_values(cfg)
        raise InvalidArgument(
            "tensor shapes do not match config.json: "
            f"{[f'{k} {tuple(tensors[k].shape)} != {expected[k]}' for k in wrong[:8]]}; "
            f"check {', '.join(f'{f}={values[f]}' for f in fields)}"
        )
    embed = tensors["model.embed_tokens.weight"]
    head = tensors.get("lm_head.weight") if cfg.tie_embeddings else None
    if head is not None and not torch.equal(head.to(embed.dtype), embed):
        # transformers >= 5 then keeps the two apart (it ties only equal tensors); tokenmill would tie them
        raise InvalidArgument(
            "tie_word_embeddings=True but lm_head.weight differs from model.embed_tokens.weight; "
            "set tie_word_embeddings=False if the output projection is its own tensor"
        )


# The config.json fields a parameter's shape follows, by the end of its name.
_SHAPE_FIELDS = (
    (("q_proj.weight", "q_proj.bias", "o_proj.weight"), ("num_attention_heads", "head_dim", "hidden_size")),
    (
        ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"),
        ("num_key_value_heads", "head_dim", "hidden_size"),
    ),
    (
        ("gate_proj.weight", "up_proj.weight", "down_proj.weight", "_proj.bias"),
        ("intermediate_size", "hidden_size"),
    ),
    (("embed_tokens.weight", "lm_head.weight"), ("vocab_size", "hidden_size")),
)


def _shape_fields(name: str) -> tuple[str, ...]:
    for suffixes, fields in _SHAPE_FIELDS:
        if name.endswith(suffixes):
            return fields
    return ("hidden_size",)


def _hf_shape_values(cfg: Any) -> dict[str, int]:
    """The shape fields as config.json names them, with the values this config gives them."""
    return {
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.dim_head,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
    }


def write_hf_dir(
    out_dir: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    hf_config: Mapping[str, Any],
    files: Mapping[str, bytes],
) -> Path:
    """Write the layout: model weights only (optimizer/training state stays in the store)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in tensors.items() if k.startswith(WEIGHT_PREFIXES)}
    if not weights:
        raise errors.FailedPrecondition(
            f"no model weights (names starting with {WEIGHT_PREFIXES}) to export; tensors: {sorted(tensors)[:5]}"
        )
    if (
        hf_config.get("tie_word_embeddings")
        and "lm_head.weight" in weights
        and "model.embed_tokens.weight" in weights
    ):
        weights.pop("lm_head.weight")  # tied: transformers rebuilds it from the embedding
    tmp = out / "model.safetensors.tmp"
    save_file(weights, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    (out / "config.json").write_bytes(_config_bytes(hf_config, files.get("config.json")))
    for name, data in files.items():
        if name in SIDE_FILES and name != "config.json":
            (out / name).write_bytes(data)
    return out


def _config_bytes(hf_config: Mapping[str, Any], stored: bytes | None) -> bytes:
    """The checkpoint's own config.json bytes when they say `hf_config` (an export then imports
    again as the same bytes), else `hf_config` written out."""
    if stored is not None:
        with contextlib.suppress(ValueError):
            if json.loads(stored) == dict(hf_config):
                return stored
    return (json.dumps(dict(hf_config), indent=2, sort_keys=True) + "\n").encode()


def read_hf_dir(
    in_dir: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, bytes]]:
    """(tensors, hf config, side files) from an HF model directory; safetensors only."""
    src = Path(in_dir)
    if not (src / "config.json").is_file():
        raise errors.NotFound(f"{src} has no config.json; is it a Hugging Face model directory?")
    hf = json.loads((src / "config.json").read_text())
    index = src / "model.safetensors.index.json"
    if (src / "model.safetensors").is_file():
        shards = [src / "model.safetensors"]
    elif index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        shards = [src / name for name in sorted(set(weight_map.values()))]
        for shard in shards:
            if shard.parent != src or not shard.is_file():
                raise errors.InvalidArgument(f"index names weight file {shard.name!r} that is not in {src}")
    elif any(src.glob("*.bin")) or any(src.glob("*.pt")):
        raise errors.FailedPrecondition(
            f"{src} holds pickle weights (*.bin/*.pt) and no safetensors; tokenmill never unpickles. "
            "Convert them to model.safetensors first"
        )
    else:
        raise errors.NotFound(f"{src} has no model.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[key] = f.get_tensor(key)
    files = {name: (src / name).read_bytes() for name in SIDE_FILES if (src / name).is_file()}
    return tensors, hf, files


def export_hf(client: CheckpointClient, ref: str, out_dir: str | os.PathLike[str]) -> Path:
    """Write checkpoint `ref` as an HF directory that `LlamaForCausalLM.from_pretrained` loads. A
    compressed version's weights are written dense, as the served model computes with them
    (transformers would ignore qweight/scales tensors and leave those layers randomly initialised)."""
    from tokenmill.common.runtime.proto_struct import struct_to_dict  # a client's messages: gRPC is there

    version = client.get(ref, include_manifest=True)
    have = {f.name for f in version.manifest.files}
    files = client.load_files(version.ref, [n for n in SIDE_FILES if n in have])
    hf = hf_config_from_manifest(struct_to_dict(version.manifest.config), files)
    return write_hf_dir(out_dir, dense_tensors(client.load(version.ref)), hf, files)


def dense_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stored tensors with every compressed linear (int8, int4, low-rank) as its dense weight, in
    the dtype of the model's embedding."""
    from tokenmill.common.model.quant import dequantize_state_dict

    embed = tensors.get("model.embed_tokens.weight")
    dense = dequantize_state_dict(tensors)
    if embed is None:
        return dense
    return {k: v.to(embed.dtype) if k not in tensors else v for k, v in dense.items()}


def import_hf(
    client: CheckpointClient,
    in_dir: str | os.PathLike[str],
    name: str,
    *,
    tags: Sequence[str] = (),
    labels: Mapping[str, str] | None = None,
    idempotency_key: str = "",
) -> Any:
    """Store an HF directory as a new version of `name` (config.json and tokenizer files kept).
    Everything is checked before anything is stored: an unsupported model raises InvalidArgument."""
    tensors, hf, files = read_hf_dir(in_dir)
    config = model_config_from_hf(hf)
    check_tensors(config, tensors)
    return client.save(
        name,
        tensors,
        files=files,
        config=config,
        lineage={"parent": f"hf:{Path(in_dir).name}"},
        labels=dict(labels or {}),
        tags=tags,
        idempotency_key=idempotency_key,
    )
