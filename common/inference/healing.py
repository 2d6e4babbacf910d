"""Token healing: a prompt that ends inside what would be one token in the training text.

A prompt like ``"def "`` tokenizes as ``def`` + a lone space token that the model almost never saw
before a name, because the tokenizer glues the space to the next word (``" name"``). Generation
then continues from an unnatural boundary and the completion goes wrong. Healing backs the prompt
up by its last token and lets the first generated token be only one that starts with the removed
token's text (the approach of Microsoft guidance and HF ``generate(token_healing=True)``), so the
model picks the boundary itself. The removed text is then cut from the completion: the caller
still gets the continuation of the prompt it sent.

Prefixes are compared on the vocabulary's raw token strings: byte-level BPE writes one character
per byte and SentencePiece writes a space as ``'\u2581'``, so a raw prefix is a text prefix, for
every token including partial UTF-8 ones. Added tokens (specials, user tokens) neither heal nor
are offered.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import lru_cache
from typing import Any


@dataclass(frozen=True)
class Healing:
    prompt_token_ids: list[int]  # the prompt without its last token
    allowed_token_ids: tuple[int, ...]  # the first generated token must be one of these


class TokenHealer:
    """Finds, for a prompt's last token, the tokens that extend it (sorted raw vocabulary + bisect)."""

    def __init__(self, tok: Any):
        added = set(tok.get_added_tokens_decoder())
        vocab = [(raw, i) for raw, i in tok.get_vocab(with_added_tokens=True).items() if i not in added]
        vocab.sort()
        self._raw = [raw for raw, _ in vocab]
        self._ids = [i for _, i in vocab]
        self._raw_of = {i: raw for raw, i in vocab}
        self.extensions = lru_cache(maxsize=4096)(self._extensions)

    def _extensions(self, prefix: str) -> tuple[int, ...]:
        """Ids of every token whose raw string starts with ``prefix`` (the prefix's own token too)."""
        lo = bisect.bisect_left(self._raw, prefix)
        hi = lo
        while hi < len(self._raw) and self._raw[hi].startswith(prefix):
            hi += 1
        return tuple(sorted(self._ids[lo:hi]))

    def heal(self, prompt_token_ids: list[int]) -> Healing | None:
        """The healed prompt, or None when healing changes nothing: a one-token prompt, a last token
        that is an added/special token, or one that no longer token extends."""
        if len(prompt_token_ids) < 2:
            return None
        raw = self._raw_of.get(prompt_token_ids[-1])
        if raw is None:
            return None
        allowed = self.extensions(raw)
        if len(allowed) < 2:
            return None
        return Healing(prompt_token_ids[:-1], allowed)
