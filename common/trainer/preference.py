"""Preference data for DPO: prompt/chosen/rejected JSONL, tokenized like SFT examples, and a sampler.

Each pair is encoded as two SFT rows (prompt + chosen, prompt + rejected) with ``encode_sft_example``,
so only response tokens (and the final eos) carry labels, exactly as SFT learns them. The sampler is
the SFT sampler over pairs (same seeded permutation, same rank split, same resume state) that also
hands out each pair's index: the objective keys its cached reference log-probs by it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenmill.common.errors import FailedPrecondition, InvalidArgument, NotFound
from tokenmill.common.model.transformer import IGNORE_INDEX, ModelConfig
from tokenmill.common.trainer.checkpoint_io import CheckpointIO
from tokenmill.common.trainer.data import SftSampler, encode_sft_example, guess_eos, read_jsonl_strings

FIELDS = ("prompt", "chosen", "rejected")


@dataclass
class PreferenceBatch:
    """``index`` [B] pair ids; ``inputs``/``targets`` [B, 2, T], row 0 the chosen, row 1 the rejected."""

    index: torch.Tensor
    inputs: torch.Tensor
    targets: torch.Tensor


def read_preference_jsonl(path: str | Path) -> list[tuple[str, str, str]]:
    """``{"prompt", "chosen", "rejected"}`` strings per line; InvalidArgument names the first bad line."""
    triples: list[tuple[str, str, str]] = []
    for where, (prompt, chosen, rejected) in read_jsonl_strings(path, FIELDS, "preference data"):
        if not chosen or not rejected:
            raise InvalidArgument(f"{where} has an empty chosen or rejected response")
        if chosen == rejected:
            raise InvalidArgument(f"{where}: chosen == rejected; a pair must prefer one of two answers")
        triples.append((prompt, chosen, rejected))
    if not triples:
        raise InvalidArgument(f"{path} holds no prompt/chosen/rejected pairs")
    return triples


def encode_pairs(
    triples: list[tuple[str, str, str]], tok: Any, eos_id: int, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """inputs/targets [N, 2, seq_len]. Pairs left without a label on either side, or made identical by
    the seq_len cut, are dropped (they carry no preference); none left is an InvalidArgument."""
    prompts = tok.encode_batch([t[0] for t in triples], add_special_tokens=False)
    chosen = tok.encode_batch([t[1] for t in triples], add_special_tokens=False)
    rejected = tok.encode_batch([t[2] for t in triples], add_special_tokens=False)
    rows_in, rows_tg = [], []
    for p, c, r in zip(prompts, chosen, rejected, strict=True):
        ci, ct = encode_sft_example(p.ids, c.ids, eos_id, seq_len)
        ri, rt = encode_sft_example(p.ids, r.ids, eos_id, seq_len)
        if (ct == IGNORE_INDEX).all() or (rt == IGNORE_INDEX).all() or np.array_equal(ct, rt):
            continue
        rows_in.append(np.stack([ci, ri]))
        rows_tg.append(np.stack([ct, rt]))
    if not rows_in:
        raise InvalidArgument(
            f"no preference pair keeps two different responses within seq_len={seq_len}; raise seq_len"
        )
    return np.stack(rows_in), np.stack(rows_tg)


def load_pair_tokenizer(tokenizer_path: str, io: CheckpointIO | None, checkpoint: str) -> Any:
    """The dataset's tokenizer.json, else the one the checkpoint carries (as SFT data is tokenized)."""
    from tokenizers import Tokenizer

    if tokenizer_path:
        if not Path(tokenizer_path).is_file():
            raise NotFound(f"tokenizer {tokenizer_path} not found; pass the dataset or a tokenizer.json")
        return Tokenizer.from_file(tokenizer_path)
    if io is None or not checkpoint:
        raise InvalidArgument("dpo needs a tokenizer: give a dataset or a checkpoint that carries one")
    try:
        raw = io.read_files(checkpoint, ["tokenizer.json"])["tokenizer.json"]
    except NotFound:
        raise InvalidArgument(
            f"checkpoint {checkpoint!r} carries no tokenizer.json; pass the dataset it was trained on"
        ) from None
    return Tokenizer.from_str(raw.decode())


def build_preference_arrays(
    path: str, seq_len: int, tok: Any, eos_id: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    return encode_pairs(
        read_preference_jsonl(path), tok, guess_eos(tok) if eos_id is None else eos_id, seq_len
    )


class PreferenceSampler(SftSampler):
    """The SFT sampler over pairs; batches carry the pair indices (the reference cache's keys)."""

    def next_batch(self) -> PreferenceBatch:  # type: ignore[override]
        idx = self.take()
        return PreferenceBatch(
            torch.tensor(idx, dtype=torch.int64),
            torch.from_numpy(self.inputs[idx]),
            torch.from_numpy(self.targets[idx]),
        )


def check_reference(io: CheckpointIO | None, ref: str, model: ModelConfig) -> None:
    """The reference model must score the same tokens the policy does: same vocabulary, same shape
    (its weights are loaded into the policy's modules to compute the cached log-probs)."""
    if io is None or io.resolve(ref) is None:
        raise NotFound(f"reference checkpoint {ref!r} not found; list them with 'tokenmill ckpt list'")
    saved = ModelConfig.from_hf_config(json.loads(io.read_files(ref, ["config.json"])["config.json"]))
    if saved.vocab_size != model.vocab_size:
        raise FailedPrecondition(
            f"reference checkpoint {ref} has vocab_size {saved.vocab_size} but the policy has "
            f"vocab_size {model.vocab_size}; DPO compares log-probs of the same tokens: use a reference "
            "with the policy's tokenizer"
        )
    differ = sorted(k for k, v in vars(saved).items() if k != "max_seq_len" and getattr(model, k) != v)
    if differ:
        what = ", ".join(f"{k}={getattr(saved, k)} (policy {getattr(model, k)})" for k in differ)
        raise FailedPrecondition(f"reference checkpoint {ref} holds a model of another shape: {what}")
