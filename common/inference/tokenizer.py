"""Tokenizer wrapper and incremental, UTF-8 safe detokenization.

Byte-level BPE splits a multi-byte character across tokens; decoding a partial sequence then
yields U+FFFD. The incremental decoder (TGI/vLLM's prefix/read offsets) only releases text once
the newest tokens decode to complete characters, and decodes a short window, not the whole output.
"""

from __future__ import annotations

from tokenmill.common.errors import InvalidArgument
from tokenmill.common.inference.request import Request


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` (imported lazily: the engine itself needs only torch)."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def from_json(cls, data: bytes | str) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        text = data.decode("utf-8") if isinstance(data, bytes) else data
        try:
            return cls(HFTokenizer.from_str(text))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise InvalidArgument(f"tokenizer.json could not be parsed: {exc}") from None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def tokens(self, ids: list[int]) -> list[str]:
        return [self.tok.id_to_token(i) or "" for i in ids]


def detokenize_incrementally(tokenizer: Tokenizer, req: Request) -> str:
    """Append newly decodable text to `req.text`; returns the new piece ('' when waiting for bytes)."""
    ids = req.output_token_ids
    if req.detok_read_offset >= len(ids):
        return ""
    prefix = tokenizer.decode(ids[req.detok_prefix_offset : req.detok_read_offset])
    full = tokenizer.decode(ids[req.detok_prefix_offset :])
    if full.endswith("\ufffd") or len(full) <= len(prefix):
        return ""  # an incomplete UTF-8 sequence: wait for the next token
    new = full[len(prefix) :]
    req.detok_prefix_offset = req.detok_read_offset
    req.detok_read_offset = len(ids)
    req.text += new
    return new


def flush_detokenizer(tokenizer: Tokenizer, req: Request) -> str:
    """At the end of a request: release whatever is left, replacement characters included."""
    ids = req.output_token_ids
    if req.detok_read_offset >= len(ids):
        return ""
    prefix = tokenizer.decode(ids[req.detok_prefix_offset : req.detok_read_offset])
    full = tokenizer.decode(ids[req.detok_prefix_offset :])
    new = full[len(prefix) :]
    req.detok_prefix_offset = req.detok_read_offset = len(ids)
    req.text += new
    return new
