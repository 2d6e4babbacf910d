"""The document as the filters see it, with the word split computed once and shared.

Word splitting approximates spaCy's blank English tokenizer (what datatrove's Gopher/FineWeb
filters use): words, numbers with inner ``.``/``,``, clitics (``n't``, ``'s``) as their own tokens,
``...`` as one token and every other punctuation character alone. A single compiled regex is
~20x faster than spaCy per document, which is where most of our per-core advantage comes from.
"""

from __future__ import annotations

import re

WORD_RE = re.compile(
    r"(?:https?|ftp)://[^\s\"'<>]+[^\s\"'<>.,;:!?)\]]|(?:[^\W\d_]\.){2,}|can(?=not\b)|\w+?(?=n['’]t\b)|n['’]t\b|['’](?:s|re|ve|ll|d|m)\b"
    r"|\w+(?:[.,:/@]\w+)*|\.\.\.|[^\w\s]",
    re.IGNORECASE,
)


class Doc:
    """Mutable text plus a cache of its words; assigning ``text`` invalidates the cache."""

    __slots__ = ("id", "_text", "_words")

    def __init__(self, id: str, text: str):
        self.id = id
        self._text = text
        self._words: list[str] | None = None

    @property
    def text(self) -> str:
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        if value != self._text:
            self._text = value
            self._words = None

    @property
    def words(self) -> list[str]:
        if self._words is None:
            self._words = WORD_RE.findall(self._text)
        return self._words


def split_words(text: str) -> list[str]:
    return WORD_RE.findall(text)
