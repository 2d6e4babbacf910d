"""Unicode and whitespace normalisation applied to every document before filtering.

Why each step: NFC makes visually equal strings byte-equal (so exact dedup and the tokenizer see
one form); control characters other than tab/newline are invisible noise that breaks tokenizers
and line-based filters; ``\\r\\n``/``\\r`` become ``\\n`` so line rules count lines the same way on
every platform; trailing spaces and runs of blank lines are layout, not content. Leading
indentation is kept (code depends on it).
"""

from __future__ import annotations

import re
import unicodedata

# C0 controls except \t (09) and \n (0A); DEL; C1 controls; zero-width/bidi format marks that carry
# no text; the BOM. Replacement characters from invalid UTF-8 are counted by the reader, kept here.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u200e\u200f\u202a-\u202e\u2060\u2066-\u2069\ufeff]")
_TRAILING_WS = re.compile(r"[ \t\u00a0\u3000]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{4,}")
_UNICODE_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")


def normalize_text(text: str) -> tuple[str, bool]:
    """Return the normalised text and whether anything beyond leading/trailing newlines changed."""
    out = text
    if "\r" in out:
        out = out.replace("\r\n", "\n").replace("\r", "\n")
    if not out.isascii():
        out = unicodedata.normalize("NFC", out)
        out = _UNICODE_SPACES.sub(" ", out)
    out = _CONTROL.sub("", out)
    out = _TRAILING_WS.sub("", out)
    out = _BLANK_RUNS.sub("\n\n\n", out)
    out = out.strip("\n")
    return out, out != text.strip("\n")
