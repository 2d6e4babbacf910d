"""Plumbing shared by the compress service's model jobs (compress now, eval later): find a stored
checkpoint and a packed dataset, check they fit each other, and read token batches from the dataset.

Everything here fails with a precise status before any model work starts: NOT_FOUND for a missing
checkpoint or dataset, FAILED_PRECONDITION for an empty or too-small split or a vocabulary mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenmill.common.checkpoint.format import layout_of, torch_dtype
from tokenmill.common.clients.checkpoint import CheckpointClient
from tokenmill.common.data.dataset import PackedDataset, read_manifest
from tokenmill.common.errors import FailedPrecondition, NotFound
from tokenmill.common.names import validate_name
from tokenmill.common.runtime.proto_struct import struct_to_dict
from tokenmill.v1 import checkpoint_pb2

MAX_EVAL_SEQ_LEN = 512  # perplexity windows: a model's context, at most this


@dataclass
class StoredModel:
    """A checkpoint version's identity and manifest; `tensors` are loaded only by `load`."""

    ref: str  # resolved "name:version"
    config: dict[str, Any]
    version: checkpoint_pb2.CheckpointVersion

    @property
    def vocab_size(self) -> int:
        return int(self.config.get("vocab_size", 0))

    @property
    def eval_window(self) -> int:
        """The longest perplexity window the model is measured with: its context (native or HF
        config), capped at MAX_EVAL_SEQ_LEN."""
        context = int(self.config.get("max_seq_len") or self.config.get("max_position_embeddings") or 0)
        return min(context or MAX_EVAL_SEQ_LEN, MAX_EVAL_SEQ_LEN)

    @property
    def compression(self) -> dict[str, Any]:
        """What compressed this version before (`{"steps": [...], "sparsity": ...}`); {} for a dense one."""
        recorded = self.config.get("compression")
        return dict(recorded) if isinstance(recorded, dict) else {}

    def meta_tensors(self) -> dict[str, torch.Tensor]:
        """Shape-and-dtype stand-ins (device 'meta') of the model's tensors as `load` returns them,
        for checks that need no values: a trainer's FSDP shards (`name@offsets`) as their logical
        tensor, its optimizer state left out."""
        out = {}
        for name, pieces in layout_of(self.version.manifest.tensors).items():
            if is_model_tensor(name):
                dtype = torch_dtype(pieces[0].dtype) or torch.float32
                out[name] = torch.empty(pieces[0].global_shape, dtype=dtype, device="meta")
        return out

    def load(self, client: CheckpointClient) -> dict[str, torch.Tensor]:
        tensors = client.load(self.ref)
        return {k: v for k, v in tensors.items() if is_model_tensor(k)}

    def files(self, client: CheckpointClient, names: set[str]) -> dict[str, bytes]:
        present = sorted(names & {f.name for f in self.version.manifest.files})
        return client.load_files(self.ref, present) if present else {}


def is_model_tensor(name: str) -> bool:
    """Not a trainer's optimizer state (stored beside the weights, e.g. optim.exp_avg.<weight>)."""
    return not name.startswith(("optim.", "optimizer."))


def find_model(client: CheckpointClient, ref: str) -> StoredModel:
    """The version `ref` names; NOT_FOUND (the store's message) when there is none."""
    try:
        version = client.get(ref, include_manifest=True)
    except NotFound:
        raise NotFound(f"checkpoint {ref!r} not found; list them with 'tokenmill ckpt list'") from None
    config = struct_to_dict(version.manifest.config)
    if not config.get("vocab_size"):
        raise FailedPrecondition(f"checkpoint {version.ref} has no model config; compress and eval need one")
    return StoredModel(version.ref, config, version)


def dataset_path(data_dir: str | Path, name: str, field: str) -> Path:
    """`data_dir/datasets/name` (where ingest publishes), NOT_FOUND when it is not there."""
    validate_name(name, what="dataset", field=field)
    path = Path(data_dir) / "datasets" / name
    if not (path / "manifest.json").is_file():
        raise NotFound(f"{field} {name!r} not found; list datasets with 'tokenmill data list'")
    return path


def check_dataset(path: Path, model: StoredModel, *, split: str, min_tokens: int, field: str) -> None:
    """FAILED_PRECONDITION when the split is too small or was tokenized for another vocabulary."""
    manifest = read_manifest(path)
    vocab = int(manifest.get("vocab_size", 0))
    if vocab and vocab > model.vocab_size:
        raise FailedPrecondition(
            f"{field} {path.name!r} was tokenized with a {vocab}-token vocabulary but {model.ref} has "
            f"vocab_size {model.vocab_size}; use a dataset built with the model's tokenizer"
        )
    tokens = sum(int(e["tokens"]) for e in manifest["splits"].get(split, []))
    if tokens < min_tokens:
        raise FailedPrecondition(
            f"{field} {path.name!r} has {tokens} tokens in its {split!r} split; at least {min_tokens} "
            "are needed"
        )


def token_batches(
    path: Path, *, split: str, rows: int, seq_len: int, batch_rows: int = 8, vocab_size: int | None = None
) -> list[torch.Tensor]:
    """`rows` consecutive windows of `seq_len` tokens from the start of the split, as [B, T] batches
    (deterministic: the same rows for every method and every re-run); see `_check_ids` for vocab_size."""
    data = PackedDataset(path, split)
    rows = min(rows, data.num_tokens // seq_len)
    tokens = _check_ids(data.tokens(0, rows * seq_len), path, split, vocab_size)
    flat = torch.from_numpy(tokens).view(rows, seq_len)
    return list(flat.split(batch_rows))


def eval_stream(path: Path, *, split: str, max_tokens: int, vocab_size: int | None = None) -> Any:
    """The first `max_tokens` tokens of the split as one numpy stream (for perplexity)."""
    data = PackedDataset(path, split)
    return _check_ids(data.tokens(0, min(max_tokens, data.num_tokens)), path, split, vocab_size)


def _check_ids(tokens: Any, path: Path, split: str, vocab_size: int | None) -> Any:
    """FAILED_PRECONDITION when a token id is outside [0, vocab_size): a dataset whose manifest does
    not record its vocabulary (so check_dataset could not compare it) holds ids the model lacks."""
    if vocab_size is not None and len(tokens) and int(tokens.max()) >= vocab_size:
        raise FailedPrecondition(
            f"dataset {path.name!r} ({split!r} split) holds token id {int(tokens.max())}, outside the "
            f"model's vocabulary of {vocab_size}; use a dataset built with the model's tokenizer"
        )
    return tokens
