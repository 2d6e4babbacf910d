"""Load a served model (and LoRA adapters) from the checkpoint store into an engine.

The store's manifest config is the source of truth for shapes; `tokenizer.json` travels with the
checkpoint; quantized tensors (`*.qweight`) are recognised by name (tokenmill.common.model.quant formats).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from tokenmill.common.errors import FailedPrecondition, InvalidArgument, NotFound
from tokenmill.common.inference import LoraAdapter, Tokenizer
from tokenmill.common.inference.config import parse_eos_token_ids
from tokenmill.common.inference.lora import PeftScaling
from tokenmill.common.runtime.proto_struct import struct_to_dict
from tokenmill.services.inference.dispatch.selector import Served

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    ref: str  # resolved "name:version"
    name: str
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    tokenizer: Tokenizer | None
    tags: tuple[str, ...] = ()  # the tags the served version was resolved through (see dispatch.selector)
    # Decided at load time: the engine takes the tensors (and `tensors` is emptied) before anyone asks.
    quantization: str = ""

    @property
    def served(self) -> Served:
        return Served(self.ref, self.tags)


def detect_quantization(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """ "int8", "int4" or "" (dense): the config's `quantization.method`, else the stored tensors'
    format (common.model.quant: int8 `qweight` is int8, int4 packs two values per uint8)."""
    q = config.get("quantization") or {}
    if isinstance(q, dict) and q.get("method"):
        return str(q["method"])
    for name, t in tensors.items():
        if name.endswith(".qweight"):
            return "int8" if t.dtype == torch.int8 else "int4"
    return ""


def load_model(client, ref: str, *, max_prompt_bytes: int | None = None) -> LoadedModel:
    """client: a CheckpointClient. NotFound when the ref does not exist (with the store's message).
    `max_prompt_bytes`: a fixed cap on prompt text (config.inference_limits), checked before tokenizing."""
    version = client.get(ref, include_manifest=True)
    config = struct_to_dict(version.manifest.config)
    if not config:
        raise FailedPrecondition(f"checkpoint {version.ref} has no model config; it cannot be served")
    tensors = client.load(version.ref)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(("optim.", "optimizer."))}
    tokenizer_files = {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    }
    names = {f.name for f in version.manifest.files} & (tokenizer_files | {"generation_config.json"})
    files = client.load_files(version.ref, sorted(names)) if names else {}
    if "generation_config.json" in files:
        config = with_generation_eos(config, files["generation_config.json"])
    tokenizer = None
    if "tokenizer.json" in files:
        tokenizer = Tokenizer.from_files(files, max_prompt_bytes)  # with its chat template
    else:
        log.warning(
            "checkpoint %s has no tokenizer.json: only prompt_token_ids requests will work", version.ref
        )
    return LoadedModel(
        version.ref,
        version.name,
        tensors,
        config,
        tokenizer,
        resolved_tags(ref, version.tags),
        detect_quantization(config, tensors),
    )


def with_generation_eos(config: dict[str, Any], generation_config: bytes) -> dict[str, Any]:
    """`config` whose `eos_token_id` also lists the generation config's: HF `generate` stops on the
    generation_config.json ids (Llama 3 Instruct lists end-of-turn there), so the engine must too."""
    try:
        extra = parse_eos_token_ids(json.loads(generation_config).get("eos_token_id"))
    except (ValueError, AttributeError, InvalidArgument) as exc:
        log.warning("generation_config.json ignored: %s", exc)
        return config
    if not extra:
        return config
    ids = parse_eos_token_ids(config.get("eos_token_id")) + extra
    return {**config, "eos_token_id": list(dict.fromkeys(ids))}


def resolved_tags(ref: str, stored_tags: Iterable[str]) -> tuple[str, ...]:
    """The tags a request may name this version by: those it carried when loaded, plus `latest` when
    it was loaded as the newest (a bare name or `name:latest`)."""
    qualifier = ref.partition(":")[2]
    tags = set(stored_tags) | ({"latest"} if qualifier in ("", "latest") else set())
    return tuple(sorted(tags))


def load_adapter(
    client, ref: str, *, dtype: torch.dtype, device, base_shapes: dict[str, tuple[int, int]]
) -> tuple[LoraAdapter, Served]:
    """A LoRA adapter saved by the trainer (tensors `*.lora_A.weight`/`*.lora_B.weight` +
    adapter_config.json), named `ref` in the engine, and what it serves as a model of its own
    (requests may name it as `model`, routed to replicas that hold it over their base)."""
    try:
        version = client.get(ref, include_manifest=True)
    except NotFound:
        raise NotFound(
            f"LoRA adapter {ref!r} is not in the checkpoint store; list them with 'tokenmill ckpt list'"
        ) from None
    files = {f.name for f in version.manifest.files}
    scaling = None
    if "adapter_config.json" in files:
        body = json.loads(client.load_files(version.ref, ["adapter_config.json"])["adapter_config.json"])
        if not isinstance(body, dict):
            raise InvalidArgument(f"adapter {version.ref}: adapter_config.json is not a JSON object")
        scaling = PeftScaling.from_config(version.ref, body)
    tensors = client.load(version.ref)
    if not any(".lora_" in k for k in tensors):
        raise InvalidArgument(f"checkpoint {version.ref} is not a LoRA adapter (no lora_A/lora_B tensors)")
    adapter = LoraAdapter.from_tensors(
        ref, tensors, dtype=dtype, device=device, base_shapes=base_shapes, scaling=scaling
    )
    return adapter, Served(version.ref, resolved_tags(ref, version.tags))
