"""Quality filters for web text: Gopher quality, Gopher repetition, C4 and FineWeb rules.

Each filter is a callable ``f(doc) -> reason | None`` (``None`` keeps the document; C4 may also
rewrite ``doc.text`` by dropping lines). Thresholds are the published defaults, taken from the
datatrove implementations that FineWeb used (huggingface/datatrove, v0.10.1):

* Gopher quality + repetition: Rae et al. 2021, "Scaling Language Models: Methods, Analysis &
  Insights from Training Gopher", arXiv:2112.11446, section A.1.1 and Table A1;
  ``datatrove/pipeline/filters/gopher_{quality,repetition}_filter.py``.
* C4: Raffel et al. 2020, JMLR 21(140), section 2.2, and tensorflow_datasets ``c4_utils.py``;
  ``datatrove/pipeline/filters/c4_filters.py`` (FineWeb runs it with ``filter_no_terminal_punct=False``).
* FineWeb: Penedo et al. 2024, "The FineWeb Datasets", arXiv:2406.17557, section 3.3;
  ``datatrove/pipeline/filters/fineweb_quality_filter.py``.

The semantics (what is counted, which denominators, strict vs. non-strict comparisons) follow
datatrove line by line so that the same input keeps the same documents (bench/ingest.py checks it).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from tokenmill.common.ingest.doc import Doc, repeated, split_words
from tokenmill.common.ingest.punctuation import PUNCTUATION_SET, TERMINAL_PUNCTUATION_TUPLE

GOPHER_STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])


def _is_symbol(word: str) -> bool:
    return all(ch in PUNCTUATION_SET for ch in word)


@dataclass
class GopherQualityFilter:
    """Gopher "quality filters" (arXiv:2112.11446, A.1.1)."""

    min_doc_words: int = 50
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3
    max_avg_word_length: float = 10
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = (
        0.8  # datatrove calls it max_non_alpha_words_ratio but uses it as a minimum
    )
    min_stop_words: int = 2
    name: str = "gopher_quality"

    def __call__(self, doc: Doc) -> str | None:
        text = doc.text
        words = doc.words
        n_words = len(words)
        non_symbol = [w for w in words if not _is_symbol(w)]
        n = len(non_symbol)
        if n < self.min_doc_words:
            return "gopher_short_doc"
        if n > self.max_doc_words:
            return "gopher_long_doc"
        avg = sum(map(len, non_symbol)) / n
        if avg < self.min_avg_word_length:
            return "gopher_below_avg_threshold"
        if avg > self.max_avg_word_length:
            return "gopher_above_avg_threshold"
        if text.count("#") / n_words > self.max_symbol_word_ratio:
            return "gopher_too_many_hashes"
        if (text.count("...") + text.count("…")) / n_words > self.max_symbol_word_ratio:
            return "gopher_too_many_ellipsis"
        lines = text.splitlines() or [""]
        bullets = sum(1 for s in lines if s.lstrip().startswith(("•", "-")))
        if bullets / len(lines) > self.max_bullet_lines_ratio:
            return "gopher_too_many_bullets"
        ellipsis = sum(1 for s in lines if s.rstrip().endswith(("...", "…")))
        if ellipsis / len(lines) > self.max_ellipsis_lines_ratio:
            return "gopher_too_many_end_ellipsis"
        alpha = sum(1 for w in words if any(c.isalpha() for c in w))
        if alpha / n_words < self.min_alpha_words_ratio:
            return "gopher_below_alpha_threshold"
        if len(GOPHER_STOP_WORDS.intersection(words)) < self.min_stop_words:
            return "gopher_enough_stop_words"
        return None


_PARAGRAPH_SPLIT = re.compile(r"\n{2,}")
_LINE_SPLIT = re.compile("\n+")


def _top_ngram_chars(words: list[str], n: int) -> int:
    grams = Counter(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    if not grams:
        return 0
    gram, count = grams.most_common(1)[0]
    return len(gram) * count


def _dup_ngram_chars(words: list[str], n: int) -> int:
    """Characters covered by n-grams seen before; a matched n-gram skips ahead (non-overlapping)."""
    seen: set[str] = set()
    repeated = idx = 0
    last = len(words) - n + 1
    while idx < last:
        gram = "".join(words[idx : idx + n])
        if gram in seen:
            repeated += len(gram)
            idx += n
        else:
            seen.add(gram)
            idx += 1
    return repeated


@dataclass
class GopherRepetitionFilter:
    """Gopher repetition removal (arXiv:2112.11446, Table A1). Fractions are of ``len(text)``."""

    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    top_n_grams: tuple[tuple[int, float], ...] = ((2, 0.2), (3, 0.18), (4, 0.16))
    dup_n_grams: tuple[tuple[int, float], ...] = (
        (5, 0.15),
        (6, 0.14),
        (7, 0.13),
        (8, 0.12),
        (9, 0.11),
        (10, 0.1),
    )
    name: str = "gopher_repetition"

    def __call__(self, doc: Doc) -> str | None:
        text = doc.text
        if not text:
            return "empty"
        paragraphs = _PARAGRAPH_SPLIT.split(text.strip())
        n_dup, chars = repeated(paragraphs)
        if n_dup / len(paragraphs) > self.dup_para_frac:
            return "dup_para_frac"
        if chars / len(text) > self.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = _LINE_SPLIT.split(text)
        n_dup, chars = repeated(lines)
        if n_dup / len(lines) > self.dup_line_frac:
            return "dup_line_frac"
        if chars / len(text) > self.dup_line_char_frac:
            return "dup_line_char_frac"
        words = doc.words
        for n, frac in self.top_n_grams:
            if _top_ngram_chars(words, n) / len(text) > frac:
                return f"top_{n}_gram"
        for n, frac in self.dup_n_grams:
            if _dup_ngram_chars(words, n) / len(text) > frac:
                return f"duplicated_{n}_n_grams"
        return None


_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_END_PUNCTUATION = (".", "?", "!", '"', "'")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_SENTENCE_END = re.compile(r"[.!?]+(?:[\"'’”)\]]*)(?=\s+|$)")


def count_sentences(line: str) -> int:
    """Sentences in a line: terminal-punctuation boundaries followed by space/end, at least one."""
    n = len(_SENTENCE_END.findall(line))
    tail = _SENTENCE_END.split(line)[-1].strip() if n else line.strip()
    return n + (1 if tail else 0)


@dataclass
class C4QualityFilter:
    """C4 line/page rules (Raffel et al. 2020, section 2.2). Rewrites the text to its kept lines."""

    filter_no_terminal_punct: bool = False  # FineWeb's setting; True is the original C4
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    remove_citations: bool = True
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True
    name: str = "c4"

    def __call__(self, doc: Doc) -> str | None:
        kept: list[str] = []
        sentences = 0
        for raw in doc.text.splitlines():
            line = raw.strip()
            words = line.split()
            if self.max_word_length > 0 and any(len(w) > self.max_word_length for w in words):
                continue
            if self.remove_citations:
                line = _CITATION.sub("", line)
            if self.filter_no_terminal_punct and (
                not line.endswith(_END_PUNCTUATION) or line.endswith("...")
            ):
                continue
            if len(words) < self.min_words_per_line:
                continue
            low = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in low:
                return "lorem_ipsum"
            if self.filter_javascript and "javascript" in low:
                continue
            if self.filter_curly_bracket and "{" in line:
                return "curly_bracket"
            if self.filter_policy and any(p in low for p in _POLICY):
                continue
            if self.min_num_sentences > 0:
                sentences += count_sentences(line)
            kept.append(line)
        if sentences < self.min_num_sentences:
            return "too_few_sentences"
        doc.text = "\n".join(kept).strip()
        return None


@dataclass
class FineWebQualityFilter:
    """FineWeb's custom rules (arXiv:2406.17557, section 3.3)."""

    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3
    name: str = "fineweb"

    def __call__(self, doc: Doc) -> str | None:
        text = doc.text
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            return "empty"
        ratio = sum(1 for line in lines if line.endswith(TERMINAL_PUNCTUATION_TUPLE)) / len(lines)
        if ratio < self.line_punct_thr and not (ratio == 0 and self.line_punct_exclude_zero):
            return "line_punct_ratio"
        if sum(1 for line in lines if len(line) <= self.short_line_length) / len(lines) > self.short_line_thr:
            return "short_line_ratio"
        flat = len(text) - text.count("\n")
        if flat and repeated(lines)[1] / flat > self.char_duplicates_ratio:
            return "char_dup_ratio"
        words = doc.words if doc.text is text else split_words(text)
        if words and text.count("\n") / len(words) > self.new_line_ratio:
            return "list_ratio"
        return None
