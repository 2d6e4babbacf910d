"""The labelled PII evaluation set (tests/fixtures/pii_eval): per-type precision and recall, and no
finding that touches code. Figures in docs/benchmarks.md "PII scrubbing"."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tokenmill.common.ingest.pii import PLACEHOLDERS, PiiScrubber
from tokenmill.common.ingest.pii_eval import code_damage, evaluate, load, scan_python_tree

ROOT = Path(__file__).parent / "fixtures" / "pii_eval"


@pytest.fixture(scope="module")
def scores():
    return evaluate(ROOT)


def test_every_group_and_type_is_planted(scores):
    assert set(scores) == {"prose", "code", "configs", "logs"}
    planted = {k: sum(s.tp[k] + s.fn[k] for s in scores.values()) for k in PLACEHOLDERS}
    assert all(n >= 4 for n in planted.values()), planted


def test_recall_per_type(scores):
    for kind in PLACEHOLDERS:
        tp = sum(s.tp[kind] for s in scores.values())
        fn = sum(s.fn[kind] for s in scores.values())
        assert tp / (tp + fn) >= 0.99, (kind, [m for s in scores.values() for m in s.misses])


@pytest.mark.parametrize("group", ["prose", "code", "configs", "logs"])
def test_precision_per_group(scores, group):
    score = scores[group]
    for kind in PLACEHOLDERS:
        assert score.precision(kind) >= 0.99, (kind, score.misses)


@pytest.mark.parametrize("path", sorted((ROOT / "code").glob("*.py")), ids=lambda p: p.name)
def test_fixture_code_is_python_and_untouched_outside_strings(path):
    text, _ = load(path.read_text(encoding="utf-8"))
    compile(text, str(path), "exec")  # real code: decorators, matmul, f-strings parse
    assert code_damage(text, PiiScrubber(code=True).find(text)) == []
    assert code_damage(text, PiiScrubber(code=False).find(text)) == []


def test_load_strips_marks():
    text, spans = load("mail ⟦email:a@b.example⟧ or ⟦phone:202-555-0143⟧.")
    assert text == "mail a@b.example or 202-555-0143."
    assert [(text[f.start : f.end], f.kind) for f in spans] == [
        ("a@b.example", "email"),
        ("202-555-0143", "phone"),
    ]
    with pytest.raises(ValueError, match="unknown PII kind"):
        load("⟦name:Ada⟧")


def test_code_damage_sees_operators():
    source = "y = x@self.weight\n"
    assert code_damage(source, PiiScrubber(code=True).find(source)) == []
    from tokenmill.common.ingest.pii import Finding

    assert code_damage(source, [Finding(4, 17, "email")]) == [Finding(4, 17, "email")]


@pytest.mark.skipif(importlib.util.find_spec("click") is None, reason="click not installed")
def test_real_code_is_not_corrupted():
    """An installed, real codebase (click): no finding overlaps a name, operator or decorator."""
    spec = importlib.util.find_spec("click")
    assert spec is not None and spec.origin
    report = scan_python_tree([Path(spec.origin).parent])
    assert report.files > 10
    assert report.damaged == []
