"""Batch sources for the worker loop: packed pre-training shards and prompt/response SFT examples.

Both expose ``next_batch() -> (inputs, targets)`` plus ``state_dict()/load_state_dict()`` recording
the *global* number of samples the job consumed, so a resume continues exactly, also on a different
worker count (the rank split is recomputed from that number).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from tokenmill.common.data.dataset import PackedDataset, TokenSampler
from tokenmill.common.errors import FailedPrecondition, InvalidArgument, NotFound
from tokenmill.common.model.transformer import IGNORE_INDEX
from tokenmill.common.trainer.checkpoint_io import CheckpointIO
from tokenmill.common.trainer.config import TrainConfig


class BatchSource(Protocol):
    """What the worker loop draws batches from; evaluation rewinds ``consumed`` to replay the same batches."""

    consumed: int  # samples the whole job has drawn (all ranks)

    def next_batch(self) -> Any: ...  # what the run's objective consumes (objectives.py)
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def load_tokenizer(path: str | Path):
    """A HF ``tokenizers.Tokenizer`` from tokenizer.json (imported lazily: pretraining needs none)."""
    from tokenizers import Tokenizer

    p = Path(path)
    if not p.is_file():
        raise NotFound(f"tokenizer {p} not found; pass the dataset or a tokenizer.json")
    return Tokenizer.from_file(str(p))


def read_jsonl_strings(path: str | Path, fields: Sequence[str], what: str) -> Iterator[tuple[str, list[str]]]:
    """Each non-blank line's string ``fields`` as ("file:line", values); InvalidArgument names the
    first line that is not a JSON object with those string fields, NotFound a missing file."""
    p = Path(path)
    if not p.is_file():
        raise NotFound(f"{what} {p} not found; give a JSONL file with {list(fields)} per line")
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise InvalidArgument(f"{p}:{lineno} is not JSON") from None
            if not isinstance(row, dict):
                raise InvalidArgument(f"{p}:{lineno} must be an object with {list(fields)}")
            missing = [k for k in fields if not isinstance(row.get(k), str)]
            if missing:
                raise InvalidArgument(
                    f"{p}:{lineno} lacks string field(s) {missing}; each line needs {list(fields)}"
                )
            yield f"{p}:{lineno}", [row[k] for k in fields]


def read_sft_jsonl(path: str | Path) -> list[tuple[str, str]]:
    """``{"prompt": ..., "response": ...}`` per line; InvalidArgument names the first bad line."""
    pairs = [
        (prompt, response)
        for _, (prompt, response) in read_jsonl_strings(path, ("prompt", "response"), "SFT data")
    ]
    if not pairs:
        raise InvalidArgument(f"{path} holds no prompt/response examples")
    return pairs


def encode_sft_example(
    prompt_ids: list[int], response_ids: list[int], eos_id: int, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """inputs/targets of length ``seq_len``: targets are next tokens with every position that predicts
    a prompt token (or padding) set to -100, so only response tokens (and the final eos) are learned."""
    ids = list(prompt_ids) + list(response_ids) + [eos_id]
    ids = ids[: seq_len + 1]
    inputs = np.full(seq_len, eos_id, dtype=np.int64)
    targets = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    n = len(ids) - 1
    inputs[:n] = ids[:-1]
    targets[:n] = ids[1:]
    targets[: max(0, len(prompt_ids) - 1)] = IGNORE_INDEX
    return inputs, targets


class SftSampler:
    """Seeded per-epoch permutation over encoded examples, rank-sharded like ``TokenSampler``."""

    def __init__(
        self,
        inputs: np.ndarray,
        targets: np.ndarray,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        if len(inputs) == 0:
            raise FailedPrecondition("no SFT examples to sample from")
        self.inputs, self.targets = inputs, targets
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, int(seed)
        self.consumed = 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _index(self, g: int) -> int:
        epoch, offset = divmod(g, len(self.inputs))
        if epoch != self._perm_epoch:
            self._perm = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(
                len(self.inputs)
            )
            self._perm_epoch = epoch
        return int(self._perm[offset])

    def take(self) -> list[int]:
        """This rank's example indices for the next batch; advances the job-wide position."""
        base = self.consumed + self.rank * self.batch_size
        idx = [self._index(base + i) for i in range(self.batch_size)]
        self.consumed += self.world_size * self.batch_size
        return idx

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.take()
        return torch.from_numpy(self.inputs[idx]), torch.from_numpy(self.targets[idx])

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "seed": self.seed, "examples": len(self.inputs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("examples", -1)) != len(self.inputs) or int(state.get("seed", -1)) != self.seed:
            raise FailedPrecondition(
                "sampler state was saved for other SFT/preference data or seed; resume with the same"
            )
        self.consumed = int(state["consumed"])


def build_sft_arrays(
    path: str | Path, tokenizer_path: str | Path, seq_len: int, eos_id: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    tok = load_tokenizer(tokenizer_path)
    if eos_id is None:
        eos_id = guess_eos(tok)
    pairs = read_sft_jsonl(path)
    enc_p = tok.encode_batch([p for p, _ in pairs], add_special_tokens=False)
    enc_r = tok.encode_batch([r for _, r in pairs], add_special_tokens=False)
    rows = [encode_sft_example(p.ids, r.ids, eos_id, seq_len) for p, r in zip(enc_p, enc_r, strict=True)]
    # Drop examples whose prompt fills the whole window: they would contribute no loss at all.
    rows = [r for r in rows if (r[1] != IGNORE_INDEX).any()]
    if not rows:
        raise InvalidArgument(f"every SFT example's prompt is longer than seq_len={seq_len}; raise seq_len")
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def guess_eos(tok) -> int:
    for name in ("<|endoftext|>", "</s>", "<eos>", "<|eos|>"):
        tid = tok.token_to_id(name)
        if tid is not None:
            return int(tid)
    raise InvalidArgument("tokenizer has no end-of-text token; the dataset manifest's eos_id is needed")


def make_sources(
    cfg: TrainConfig, rank: int, world_size: int, io: CheckpointIO | None = None
) -> tuple[BatchSource, BatchSource | None, int]:
    """Train source, optional val source, and the vocab size of the data (0 when unknown); ``io``
    reads the init checkpoint's tokenizer for preference data given without a dataset."""
    if cfg.mode in ("pretrain", "distill"):  # distillation reads packed text like pretraining
        return _pretrain_sources(cfg, rank, world_size)
    if cfg.mode == "dpo":
        return _preference_sources(cfg, rank, world_size, io)
    return _sft_sources(cfg, rank, world_size)


def _pretrain_sources(
    cfg: TrainConfig, rank: int, world_size: int
) -> tuple[TokenSampler, TokenSampler | None, int]:
    """Windows of the packed train split; val only when evaluating and the val split fills a window."""
    train = PackedDataset(cfg.dataset_path, "train")
    sampler = TokenSampler(train, cfg.seq_len, cfg.micro_batch_size, rank, world_size, cfg.seed)
    val = None
    if cfg.eval_every:
        vds = PackedDataset(cfg.dataset_path, "val")
        if vds.num_tokens > cfg.seq_len:
            val = TokenSampler(vds, cfg.seq_len, cfg.micro_batch_size, rank, world_size, cfg.seed)
    return sampler, val, train.vocab_size


def _sft_sources(cfg: TrainConfig, rank: int, world_size: int) -> tuple[SftSampler, SftSampler | None, int]:
    """Encoded prompt/response examples; when evaluating, every tenth example is held out for val."""
    eos = None
    vocab = 0
    if cfg.dataset_path:
        manifest = PackedDataset(cfg.dataset_path, "train").manifest
        eos, vocab = int(manifest["eos_id"]), int(manifest.get("vocab_size", 0))
    tokenizer = cfg.tokenizer_path or (
        str(Path(cfg.dataset_path) / "tokenizer.json") if cfg.dataset_path else ""
    )
    if not tokenizer:
        raise InvalidArgument("sft/lora need a tokenizer: give a dataset or tokenizer_path")
    inputs, targets = build_sft_arrays(cfg.sft_path, tokenizer, cfg.seq_len, eos)
    held = np.arange(len(inputs)) % 10 == 9 if (cfg.eval_every and len(inputs) >= 10) else None
    if held is not None:
        val = SftSampler(inputs[held], targets[held], cfg.micro_batch_size, rank, world_size, cfg.seed)
        train_s = SftSampler(inputs[~held], targets[~held], cfg.micro_batch_size, rank, world_size, cfg.seed)
        return train_s, val, vocab
    return SftSampler(inputs, targets, cfg.micro_batch_size, rank, world_size, cfg.seed), None, vocab


def _preference_sources(
    cfg: TrainConfig, rank: int, world_size: int, io: CheckpointIO | None
) -> tuple[BatchSource, None, int]:
    """Encoded preference pairs (no held-out split: DPO reports its reward metrics on training pairs)."""
    from tokenmill.common.trainer.preference import (
        PreferenceSampler,
        build_preference_arrays,
        load_pair_tokenizer,
    )

    eos, vocab, tokenizer = None, 0, cfg.tokenizer_path
    if cfg.dataset_path:
        manifest = PackedDataset(cfg.dataset_path, "train").manifest
        eos, vocab = int(manifest["eos_id"]), int(manifest.get("vocab_size", 0))
        tokenizer = tokenizer or str(Path(cfg.dataset_path) / "tokenizer.json")
    tok = load_pair_tokenizer(tokenizer, io, cfg.init_checkpoint)
    inputs, targets = build_preference_arrays(cfg.dpo_path, cfg.seq_len, tok, eos)
    sampler = PreferenceSampler(inputs, targets, cfg.micro_batch_size, rank, world_size, cfg.seed)
    return sampler, None, vocab or tok.get_vocab_size()
