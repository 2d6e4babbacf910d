"""Each quality filter on hand-made documents on both sides of its threshold, plus normalisation,
language ID and preset/override validation."""

from __future__ import annotations

import pytest

from tests.fixtures.ingest import GOOD_SENTENCES, good_web_text
from tokenmill.common.errors import InvalidArgument
from tokenmill.common.ingest import filters_code as fc
from tokenmill.common.ingest import filters_web as fw
from tokenmill.common.ingest.doc import Doc, split_words
from tokenmill.common.ingest.langid import LanguageFilter
from tokenmill.common.ingest.normalize import normalize_text
from tokenmill.common.ingest.spec import IngestSpec, build_filters


def run(f, text: str) -> str | None:
    return f(Doc("t", text))


def words_doc(n: int, word: str = "garden") -> str:
    return " ".join(f"the {word}{i % 7} grows" for i in range(n // 3))


# ----------------------------------------------------------------------------------- normalisation


def test_normalize_nfc_controls_whitespace():
    text, changed = normalize_text("Cafe\u0301\r\nline\x00two\x1b  \t\n\n\n\n\n\nend\ufeff")
    assert changed
    assert text == "Caf\u00e9\nlinetwo\n\n\nend"
    same, changed = normalize_text("def f():\n    return 1\n")
    assert same == "def f():\n    return 1" and not changed  # indentation kept; final newline ignored


def test_word_split_matches_spacy_conventions():
    assert split_words("I don't think the U.S. economy's fine...") == [
        "I", "do", "n't", "think", "the", "U.S.", "economy", "'s", "fine", "...",
    ]  # fmt: skip
    assert split_words("costs $4,000.50 at http://x.org/a?b=1!") == [
        "costs",
        "$",
        "4,000.50",
        "at",
        "http://x.org/a?b=1",
        "!",
    ]
    assert split_words("---------- __doc__ read-only --help") == [
        "----------", "_", "_", "doc", "_", "_", "read", "-", "only", "--help",
    ]  # fmt: skip


# ----------------------------------------------------------------------------------- Gopher quality


def test_gopher_quality_passes_good_text():
    assert run(fw.GopherQualityFilter(), good_web_text()) is None


def test_gopher_word_count_bounds():
    f = fw.GopherQualityFilter()
    base = "the apple and the river with the garden"  # 8 words, 4+ stop words
    assert run(f, " ".join([base] * 6)) == "gopher_short_doc"  # 48 words
    assert run(f, " ".join([base] * 7)) is None  # 56 words
    assert run(fw.GopherQualityFilter(max_doc_words=100), " ".join([base] * 13)) == "gopher_long_doc"


def test_gopher_mean_word_length():
    f = fw.GopherQualityFilter()
    short = " ".join(["the", "to", "of", "and", "a", "be", "it", "is"] * 10)  # mean < 3
    assert run(f, short) == "gopher_below_avg_threshold"
    ok = " ".join(["the", "and", "with", "apple", "is", "to"] * 10)  # mean ~3.2
    assert run(f, ok) is None
    long = " ".join(["the", "and", "internationalization", "responsibilities"] * 20)
    assert run(f, long) == "gopher_above_avg_threshold"


def test_gopher_hash_and_ellipsis_ratios():
    f = fw.GopherQualityFilter()
    body = good_web_text()
    n = len(split_words(body))
    few = body + " " + " ".join(["#tag"] * (n // 20))
    many = body + " " + " ".join(["#tag"] * (n // 5))
    assert run(f, few) is None
    assert run(f, many) == "gopher_too_many_hashes"
    assert run(f, body + " " + " ".join(["wait…"] * (n // 5))) == "gopher_too_many_ellipsis"


def test_gopher_bullets_and_end_ellipsis_lines():
    f = fw.GopherQualityFilter()
    lines = GOOD_SENTENCES[:10]
    assert run(f, "\n".join("• " + s for s in lines[:9]) + "\n" + lines[9]) is None  # 90% is not > 90%
    assert run(f, "\n".join("• " + s for s in lines)) == "gopher_too_many_bullets"
    three = [s[:-1] + "..." if i < 3 else s for i, s in enumerate(lines)]
    four = [s[:-1] + "..." if i < 4 else s for i, s in enumerate(lines)]
    f2 = fw.GopherQualityFilter(max_symbol_word_ratio=1.0)
    assert run(f2, "\n".join(three)) is None
    assert run(f2, "\n".join(four)) == "gopher_too_many_end_ellipsis"


def test_gopher_alpha_words_and_stop_words():
    f = fw.GopherQualityFilter()
    body = good_web_text()
    n = len(split_words(body))
    assert run(f, body + " " + " ".join(["1234"] * (n // 2))) == "gopher_below_alpha_threshold"
    assert run(f, body + " " + " ".join(["1234"] * (n // 10))) is None
    no_stop = " ".join(["apple", "river", "garden", "stone", "window", "market"] * 10)
    assert run(f, no_stop) == "gopher_enough_stop_words"
    assert run(f, no_stop + " the and") is None


# ----------------------------------------------------------------------------------- Gopher repetition


def test_gopher_repetition_lines_and_paragraphs():
    f = fw.GopherRepetitionFilter()
    assert run(f, good_web_text()) is None
    long_lines = GOOD_SENTENCES[:7]
    short_dups = long_lines + ["Yes."] * 5  # 4 duplicate lines of 12 (0.33 > 0.3), few characters
    assert run(f, "\n".join(short_dups)) == "dup_line_frac"
    assert run(f, "\n".join(long_lines + ["Yes."] * 4)) is None  # 3 of 11 = 0.27
    char_dups = GOOD_SENTENCES[:10] + GOOD_SENTENCES[:3]  # 3 of 13 lines (0.23) but ~0.23 of characters
    assert run(f, "\n".join(char_dups)) == "dup_line_char_frac"
    assert run(f, "\n\n".join(short_dups)) == "dup_para_frac"
    assert run(f, "\n\n".join(char_dups)) == "dup_para_char_frac"
    relaxed = fw.GopherRepetitionFilter(dup_line_char_frac=1, dup_para_char_frac=1)
    assert run(relaxed, "\n".join(char_dups)) == "duplicated_5_n_grams"  # the next rule still sees it


def test_gopher_repetition_top_ngram():
    f = fw.GopherRepetitionFilter(
        dup_line_frac=1, dup_line_char_frac=1, dup_para_frac=1, dup_para_char_frac=1
    )
    base = good_web_text().replace("\n", " ")
    repeated = base + " " + " ".join(["blue whale"] * 60)
    assert run(f, repeated) == "top_2_gram"
    assert run(f, base + " " + " ".join(["blue whale"] * 3)) is None


def test_gopher_repetition_duplicated_ngrams():
    f = fw.GopherRepetitionFilter(
        dup_line_frac=1, dup_line_char_frac=1, dup_para_frac=1, dup_para_char_frac=1
    )
    base = good_web_text().replace("\n", " ")
    half = base[: len(base) // 4]
    assert run(f, base + " " + half).startswith("duplicated_")
    assert run(f, base) is None


# ----------------------------------------------------------------------------------- C4


def test_c4_line_rules_and_rewrite():
    f = fw.C4QualityFilter()
    body = good_web_text()
    doc = Doc(
        "t",
        body + "\nPlease enable JavaScript to view this page.\nRead our privacy policy here.\nshort line.",
    )
    assert f(doc) is None
    assert "JavaScript" not in doc.text and "privacy" not in doc.text and "short line" not in doc.text
    assert doc.text.startswith(body.split("\n")[0])


def test_c4_document_rules():
    f = fw.C4QualityFilter()
    body = good_web_text()
    assert run(f, body + "\nLorem ipsum dolor sit amet, consectetur.") == "lorem_ipsum"
    assert run(f, body + "\nThe function body is { return x; } here.") == "curly_bracket"
    assert run(f, "\n".join(GOOD_SENTENCES[:4])) == "too_few_sentences"
    assert run(f, "\n".join(GOOD_SENTENCES[:5])) is None


def test_c4_terminal_punctuation_option():
    lines = [s.rstrip(".") for s in GOOD_SENTENCES]
    assert run(fw.C4QualityFilter(filter_no_terminal_punct=False), "\n".join(lines)) is None
    assert run(fw.C4QualityFilter(filter_no_terminal_punct=True), "\n".join(lines)) == "too_few_sentences"


# ----------------------------------------------------------------------------------- FineWeb


def test_fineweb_line_punctuation():
    f = fw.FineWebQualityFilter()
    lines = [s.rstrip(".") for s in GOOD_SENTENCES]
    assert run(f, "\n".join(lines)) == "line_punct_ratio"
    lines[0] += "."
    lines[1] += "."  # 2/12 = 0.17 > 0.12
    assert run(f, "\n".join(lines)) is None


def test_fineweb_short_lines_duplicates_and_list_ratio():
    f = fw.FineWebQualityFilter()
    assert run(f, good_web_text()) is None
    shorts = "\n".join(f"Item {i} is here." for i in range(30)) + "\n" + "\n".join(GOOD_SENTENCES[:5])
    assert run(f, shorts) == "short_line_ratio"
    dup = good_web_text() + "\n" + GOOD_SENTENCES[0]
    assert run(f, dup) == "char_dup_ratio"
    assert run(fw.FineWebQualityFilter(char_duplicates_ratio=0.2), dup) is None
    listy = "\n".join(f"Apples and pears number {i} are here today." for i in range(40))
    assert run(fw.FineWebQualityFilter(new_line_ratio=0.05), listy) == "list_ratio"


# ----------------------------------------------------------------------------------- language


def test_language_filter():
    f = LanguageFilter()
    assert run(f, good_web_text()) is None
    german = (
        "Der Fluss fließt an der alten Mühle vorbei und wendet sich dann dem Meer zu. "
        "Die Bauern im Tal bauen seit vielen Generationen Äpfel und Birnen an."
    )
    assert run(f, german) == "lang_de"
    assert run(LanguageFilter(languages=("de",)), german) is None
    assert run(LanguageFilter(threshold=1.01), good_web_text()) == "lang_low_confidence"


# ----------------------------------------------------------------------------------- code


CODE = (
    "import os\n\n\ndef main(path):\n    for name in os.listdir(path):\n        print(name)\n    return 0\n"
)


def test_code_size_bounds():
    assert run(fc.SizeFilter(), CODE) is None
    assert run(fc.SizeFilter(), "x = 1\n") == "too_small"
    assert run(fc.SizeFilter(max_chars=50), CODE) == "too_large"


def test_code_line_lengths():
    f = fc.LineLengthFilter()
    assert run(f, CODE) is None
    assert run(f, CODE + "x = '" + "a" * 1000 + "'\n") == "max_line_length"
    # a 996-char line is below the max, so the mean decides: ~120 chars over 9 lines is above 100
    below_max = CODE + "x = '" + "a" * 990 + "'\n"
    assert run(f, below_max) == "mean_line_length"
    assert run(fc.LineLengthFilter(max_mean_line_length=200), below_max) is None
    wide = "\n".join(["y = " + "1 + " * 30 + "1"] * 10)  # ~128 chars per line
    assert run(f, wide) == "mean_line_length"
    assert run(fc.LineLengthFilter(max_mean_line_length=200), wide) is None


def test_code_alphanumeric_fraction():
    f = fc.AlphanumericFilter()
    assert run(f, CODE) is None
    assert run(f, "x = 1\n" + "{}[]();:,.<>" * 20) == "low_alphanumeric"


def test_code_autogenerated_and_minified():
    f = fc.AutogeneratedFilter()
    assert run(f, "# Code generated by protoc-gen-go. DO NOT EDIT.\npackage x\n") == "autogenerated"
    assert run(f, "# -*- coding: utf-8 -*-\n# This file is auto-generated\nX = 1\n") == "autogenerated"
    assert run(f, '"""Codec generated from CP1252.TXT with gencodec.py."""\nimport codecs\n') is None
    assert run(f, "\n" * 10 + "# autogenerated below line 5\n") is None
    m = fc.MinifiedFilter()
    bundle = "var a=function(b){return b+1};" * 40
    assert run(m, bundle) == "minified"
    assert run(m, CODE) is None
    assert run(m, "x = [" + ", ".join(str(i) for i in range(200)) + "]") is None  # long but spaced


def test_code_license_only():
    f = fc.LicenseOnlyFilter()
    header = "# Copyright (c) 2020 Example Corp.\n# Licensed under the Apache License, Version 2.0.\n"
    assert run(f, header) == "license_header_only"
    assert run(f, "/*\n * SPDX-License-Identifier: MIT\n */\n") == "license_header_only"
    assert run(f, header + CODE) is None
    assert run(f, "# just a comment\n") is None  # no licence text: not this filter's business


def _real_python_files() -> list[str]:
    """The source of installed, real codebases (click, flask, requests: dependencies of the repo)."""
    import importlib.util
    from pathlib import Path

    texts = []
    for pkg in ("click", "flask", "requests"):
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.origin:
            texts += [p.read_text(encoding="utf-8") for p in sorted(Path(spec.origin).parent.rglob("*.py"))]
    return [t for t in texts if len(t) >= 32]


def test_code_repetition_keeps_real_code():
    files = _real_python_files()
    if len(files) < 20:
        pytest.skip("no installed Python codebase to measure on")
    f = fc.RepetitionFilter()
    dropped = [t[:80] for t in files if run(f, t) is not None]
    assert not dropped, dropped


def test_code_repetition_drops_repeated_lines_and_blocks():
    f = fc.RepetitionFilter()
    assert run(f, "print('hello world')\n" * 200) == "dup_line_fraction"
    assert run(f, "x = 1\n" + "x += 1\n" * 9) == "dup_line_fraction"  # 8 of 10 lines repeat
    block = "\n".join(
        f"def handler_{i}(request):\n    return render(request, 'page_{i}.html')" for i in range(8)
    )
    assert run(f, block) is None
    assert run(f, block + "\n" + block) == "dup_block_fraction"  # a file pasted twice
    assert run(f, block + "\n" + block + "\n" + block) in ("dup_block_fraction", "dup_line_fraction")
    long_dup = "value = compute_the_really_long_expression(alpha, beta, gamma, delta)\n"
    text = "".join(f"n{i} = {i}\n" for i in range(10)) + long_dup * 10  # 9/20 lines, 83 % of chars
    assert run(f, text) == "dup_line_char_fraction"
    assert run(f, "one line only") is None


def test_code_repetition_in_preset_and_overrides():
    spec = IngestSpec(name="d", sources=["x"], preset="code")
    assert build_filters(spec)[-1].name == "repetition"
    spec.filter_overrides = {"repetition": {"max_dup_block_fraction": 0.9, "block_lines": 8.0}}
    f = build_filters(spec)[-1]
    assert f.max_dup_block_fraction == 0.9 and f.block_lines == 8 and isinstance(f.block_lines, int)
    for params, match in [
        (
            {"max_dup_line_fraction": 1.5},
            r"filter_overrides\['repetition'\]: max_dup_line_fraction 1.5 must lie in \[0, 1\]",
        ),
        ({"block_lines": 1}, "block_lines 1 must be at least 2"),
        ({"block_lines": 2.5}, r"filter_overrides\['repetition'\].block_lines must be an integer, got 2.5"),
        (
            {"max_dup_line_fraction": "high"},
            r"filter_overrides\['repetition'\].max_dup_line_fraction must be a number",
        ),
        ({"max_dup_line_fraction": True}, "must be a number, got True"),
    ]:
        spec.filter_overrides = {"repetition": params}
        with pytest.raises(InvalidArgument, match=match):
            build_filters(spec)


# ----------------------------------------------------------------------------------- presets


def test_presets_and_overrides():
    spec = IngestSpec(name="d", sources=["x"], preset="web")
    assert [f.name for f in build_filters(spec)] == [
        "language",
        "gopher_repetition",
        "gopher_quality",
        "c4",
        "fineweb",
    ]
    spec.filter_overrides = {"gopher_quality": {"min_doc_words": 5}, "c4": False}
    chain = build_filters(spec)
    assert [f.name for f in chain] == ["language", "gopher_repetition", "gopher_quality", "fineweb"]
    assert chain[2].min_doc_words == 5
    spec.language_threshold = 0.9
    assert build_filters(spec)[0].threshold == 0.9
    with pytest.raises(InvalidArgument, match="preset"):
        IngestSpec.from_dict({"name": "d", "sources": ["x"], "preset": "books"})
    with pytest.raises(InvalidArgument, match="min_doc_words"):
        IngestSpec.from_dict(
            {"name": "d", "sources": ["x"], "filter_overrides": {"gopher_quality": {"min_words": 1}}}
        )
    with pytest.raises(InvalidArgument, match="not in preset"):
        IngestSpec.from_dict(
            {"name": "d", "sources": ["x"], "preset": "code", "filter_overrides": {"c4": False}}
        )
    with pytest.raises(InvalidArgument, match="name"):
        IngestSpec.from_dict({"name": "../etc", "sources": ["x"]})
    with pytest.raises(InvalidArgument, match="web"):
        IngestSpec.from_dict({"name": "d", "sources": ["x"], "preset": "code", "language_threshold": 0.5})
