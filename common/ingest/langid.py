"""Language identification with py3langid: its naive-Bayes model ships inside the wheel
(``py3langid/data/model.npz.xz``, loaded with ``allow_pickle=False``), so nothing is downloaded at
run time and nothing is unpickled.

Probabilities are normalised (``norm_probs=True``); a document is kept when the top language is
in ``languages`` with probability >= ``threshold``. The default 0.65 is datatrove's
``LanguageFilter`` default (``language_threshold=0.65``) that FineWeb used with fastText; the
scores of the two models are not identical, so tune it with ``filter_overrides`` when needed.
Only the first ``max_chars`` characters are scored: language is decided by the opening text and
the model's cost is linear in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from tokenmill.common.ingest.doc import Doc


@lru_cache(maxsize=1)
def _identifier() -> Any:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def detect(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the most likely language."""
    lang, prob = _identifier().classify(text)
    return lang, float(prob)


@dataclass
class LanguageFilter:
    languages: tuple[str, ...] = ("en",)
    threshold: float = 0.65
    max_chars: int = 4000
    name: str = "language"

    def __call__(self, doc: Doc) -> str | None:
        lang, prob = detect(doc.text[: self.max_chars].replace("\n", " "))
        if lang not in self.languages:
            return f"lang_{lang}"
        if prob < self.threshold:
            return "lang_low_confidence"
        return None
