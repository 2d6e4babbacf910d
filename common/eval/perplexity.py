"""Perplexity and bits per byte of a token stream: the one implementation eval and compression share.

The stream is cut into non-overlapping windows of ``seq_len + 1`` tokens that overlap by one, so
every token after the first is predicted exactly once, from at most ``seq_len`` tokens of context.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tokenmill.common.errors import InvalidArgument

Forward = Callable[[torch.Tensor], torch.Tensor]  # token ids [B, T] -> logits [B, T, V]


@dataclass(frozen=True)
class PerplexityResult:
    nll_sum: float  # nats, over every predicted token
    tokens: int
    bytes: int | None = None  # UTF-8 bytes of the predicted text, when a decoder was given

    @property
    def loss(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bits_per_byte(self) -> float | None:
        return None if not self.bytes else self.nll_sum / math.log(2) / self.bytes

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "tokens": self.tokens,
        }


def windows(tokens: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """[t0..tS], [tS..t2S], ...: each window's inputs predict its next seq_len tokens."""
    if seq_len < 1:
        raise InvalidArgument(f"seq_len must be >= 1, got {seq_len}")
    if len(tokens) < 2:
        raise InvalidArgument(f"perplexity needs at least 2 tokens, the split has {len(tokens)}")
    return [tokens[i : i + seq_len + 1] for i in range(0, len(tokens) - 1, seq_len)]


@torch.no_grad()
def perplexity(
    forward: Forward,
    tokens: np.ndarray,
    *,
    seq_len: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    decode: Callable[[list[int]], str] | None = None,
) -> PerplexityResult:
    """Score ``tokens`` with ``forward`` (e.g. a ``Transformer``); ``decode`` adds bits per byte."""
    pieces = windows(np.asarray(tokens, dtype=np.int64), seq_len)
    nll, count = 0.0, 0
    # Equal-length windows batch together; only the last one can be shorter.
    for start in range(0, len(pieces), batch_size):
        group = pieces[start : start + batch_size]
        for same in _by_length(group):
            batch = torch.from_numpy(np.stack(same)).to(device)
            logits = forward(batch[:, :-1]).float()
            losses = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
            )
            nll += float(losses)
            count += batch[:, 1:].numel()
    text_bytes = len(decode([int(t) for t in tokens[1:]]).encode("utf-8")) if decode else None
    return PerplexityResult(nll, count, text_bytes)


def _by_length(group: list[np.ndarray]) -> list[list[np.ndarray]]:
    lengths: dict[int, list[np.ndarray]] = {}
    for w in group:
        lengths.setdefault(len(w), []).append(w)
    return list(lengths.values())
