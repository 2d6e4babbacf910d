"""Tokenizer wrapper and incremental, UTF-8 safe detokenization.

Byte-level BPE splits a multi-byte character across tokens; decoding a partial sequence then
yields U+FFFD. The incremental decoder (TGI/vLLM's prefix/read offsets) only releases text once
the newest tokens decode to complete characters, and decodes a short window, not the whole output.
"""

from __future__ import annotations

from tokenmill.common.errors import InvalidArgument
from tokenmill.common.inference.request import Request

MIN_TOKEN_BYTES = 4  # one UTF-8 character: no token bound is tighter than this


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` (imported lazily: the engine itself needs only torch).

    `max_input_bytes` (None = no fixed cap) bounds every text `encode` accepts, checked before any
    tokenization so an oversized prompt costs microseconds, not seconds and gigabytes."""

    def __init__(self, tok, max_input_bytes: int | None = None):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.max_input_bytes = max_input_bytes
        self.max_token_bytes = longest_token_bytes(tok)

    @classmethod
    def from_json(cls, data: bytes | str, max_input_bytes: int | None = None) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        text = data.decode("utf-8") if isinstance(data, bytes) else data
        try:
            return cls(HFTokenizer.from_str(text), max_input_bytes)
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise InvalidArgument(f"tokenizer.json could not be parsed: {exc}") from None

    def prompt_byte_limit(self, max_tokens: int | None = None) -> int | None:
        """The most UTF-8 bytes a text may have: `max_input_bytes`, and, given `max_tokens`, the
        bytes that many of the longest tokens cover (any longer text has more tokens than that)."""
        limits = [] if self.max_input_bytes is None else [self.max_input_bytes]
        if max_tokens is not None:
            limits.append(max_tokens * self.max_token_bytes)
        return min(limits, default=None)

    def encode(
        self, text: str, max_tokens: int | None = None, *, add_special_tokens: bool = True
    ) -> list[int]:
        """Token ids of `text` as HF's tokenizer gives them by default: the tokenizer.json's
        post-processor adds its special tokens (Llama's BOS; a plain byte-level BPE adds none), so the
        model sees what it was trained on and outputs match HF and vLLM. Pass
        `add_special_tokens=False` for text that already carries them (a rendered chat template).
        INVALID_ARGUMENT, before tokenizing, when `text` is over `prompt_byte_limit(max_tokens)`
        (pass the context length as `max_tokens`)."""
        limit = self.prompt_byte_limit(max_tokens)
        if limit is not None and len(text) * 4 > limit:  # a character is at most 4 bytes
            size = len(text.encode("utf-8", "surrogatepass"))
            if size > limit:
                context = f", {max_tokens} tokens of context" if max_tokens is not None else ""
                raise InvalidArgument(
                    f"the prompt is {size} bytes; this model accepts at most {limit} bytes{context} "
                    f"(its longest token is {self.max_token_bytes} bytes): shorten the prompt"
                )
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def tokens(self, ids: list[int]) -> list[str]:
        return [self.tok.id_to_token(i) or "" for i in ids]


def longest_token_bytes(tok) -> int:
    """The most input bytes one token can stand for, from the vocabulary (special tokens included).

    A token's own string is at least as long in UTF-8 as the text it matches: byte-level BPE writes
    each byte as one 1-2 byte character, SentencePiece writes a space as the 3-byte '\u2581'."""
    vocab = tok.get_vocab(with_added_tokens=True)
    longest = max((len(t.encode("utf-8", "surrogatepass")) for t in vocab), default=0)
    return max(longest, MIN_TOKEN_BYTES)


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
