"""Scoring ``PiiScrubber`` against labelled documents, and checking it leaves real Python code alone.

Labelled documents mark each planted item inline as ``⟦kind:value⟧`` (``load`` strips the marks and
returns the expected spans); a finding counts as correct only with the exact span and kind.
``code_damage`` needs no labels: in Python, personal data can only sit in string literals and
comments, so a finding that overlaps any other token (a name, an operator such as ``@``, a
decorator) corrupts code. Run ``python -m tokenmill.common.ingest.pii_eval LABELLED_DIR [PY_TREE...]``
for the per-type table and the damage count over real code (docs/benchmarks.md).
"""

from __future__ import annotations

import io
import re
import sys
import tokenize
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tokenmill.common.ingest.pii import PLACEHOLDERS, Finding, PiiScrubber

_MARK = re.compile(r"⟦([a-z_]+):(.*?)⟧", re.DOTALL)
PROSE_DIRS = frozenset({"prose"})  # scored in prose mode; every other folder in code mode


def load(text: str) -> tuple[str, list[Finding]]:
    """The document without marks, and the marked spans in it."""
    out: list[str] = []
    spans: list[Finding] = []
    pos = length = 0
    for m in _MARK.finditer(text):
        kind, value = m.group(1), m.group(2)
        if kind not in PLACEHOLDERS:
            raise ValueError(
                f"unknown PII kind {kind!r} in mark {m.group(0)!r}; use one of {sorted(PLACEHOLDERS)}"
            )
        before = text[pos : m.start()]
        out += [before, value]
        length += len(before)
        spans.append(Finding(length, length + len(value), kind))
        length += len(value)
        pos = m.end()
    out.append(text[pos:])
    return "".join(out), spans


@dataclass
class Score:
    """True/false positives and false negatives per kind."""

    tp: Counter = field(default_factory=Counter)
    fp: Counter = field(default_factory=Counter)
    fn: Counter = field(default_factory=Counter)
    misses: list[str] = field(default_factory=list)  # "file: kind 'text'" of every error

    def add(self, name: str, text: str, expected: list[Finding], found: list[Finding]) -> None:
        exp, got = set(expected), set(found)
        for f in exp & got:
            self.tp[f.kind] += 1
        for f in got - exp:
            self.fp[f.kind] += 1
            self.misses.append(f"{name}: false {f.kind} {text[f.start : f.end]!r}")
        for f in exp - got:
            self.fn[f.kind] += 1
            self.misses.append(f"{name}: missed {f.kind} {text[f.start : f.end]!r}")

    def precision(self, kind: str | None = None) -> float:
        tp, fp = self._total(self.tp, kind), self._total(self.fp, kind)
        return tp / (tp + fp) if tp + fp else 1.0

    def recall(self, kind: str | None = None) -> float:
        tp, fn = self._total(self.tp, kind), self._total(self.fn, kind)
        return tp / (tp + fn) if tp + fn else 1.0

    @staticmethod
    def _total(counts: Counter, kind: str | None) -> int:
        return counts[kind] if kind else sum(counts.values())

    def table(self) -> str:
        lines = [f"{'type':<12} {'planted':>7} {'found':>6} {'precision':>9} {'recall':>7}"]
        for kind in PLACEHOLDERS:
            planted, found = self.tp[kind] + self.fn[kind], self.tp[kind] + self.fp[kind]
            lines.append(
                f"{kind:<12} {planted:>7} {found:>6} {self.precision(kind):>9.3f} {self.recall(kind):>7.3f}"
            )
        planted = sum((self.tp + self.fn).values())
        found = sum((self.tp + self.fp).values())
        lines.append(f"{'all':<12} {planted:>7} {found:>6} {self.precision():>9.3f} {self.recall():>7.3f}")
        return "\n".join(lines)


def evaluate(root: Path) -> dict[str, Score]:
    """Scores per top-level folder of ``root`` (prose, code, configs, logs), each in its mode."""
    scores: dict[str, Score] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "README.md"):
        group = path.relative_to(root).parts[0]
        scrubber = PiiScrubber(code=group not in PROSE_DIRS)
        text, expected = load(path.read_text(encoding="utf-8"))
        name = str(path.relative_to(root))
        scores.setdefault(group, Score()).add(name, text, expected, scrubber.find(text))
    return scores


def code_damage(source: str, found: Iterable[Finding]) -> list[Finding]:
    """Findings that overlap a Python token other than a string or comment (corrupted code)."""
    lines = source.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    code_spans = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.STRING, tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE):
            continue
        if tok.type in (tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            continue
        (r0, c0), (r1, c1) = tok.start, tok.end
        code_spans.append((starts[r0 - 1] + c0, starts[r1 - 1] + c1))
    return [f for f in found if any(s < f.end and f.start < e for s, e in code_spans)]


@dataclass
class TreeReport:
    files: int = 0
    findings: Counter = field(default_factory=Counter)
    damaged: list[str] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)


def scan_python_tree(roots: Iterable[Path], scrubber: PiiScrubber | None = None) -> TreeReport:
    """Run the code-mode scrubber over every parseable ``*.py`` under ``roots``."""
    scrubber = scrubber or PiiScrubber(code=True)
    report = TreeReport()
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            try:
                source = path.read_text(encoding="utf-8")
                found = scrubber.find(source)
                damaged = code_damage(source, found)
            except (UnicodeDecodeError, tokenize.TokenError, SyntaxError):
                continue
            report.files += 1
            report.findings.update(f.kind for f in found)
            report.examples += [f"{path}: {f.kind} {source[f.start : f.end]!r}" for f in found]
            report.damaged += [f"{path}: {f.kind} {source[f.start : f.end]!r}" for f in damaged]
    return report


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    for group, score in evaluate(Path(argv[0])).items():
        print(f"\n[{group}]\n{score.table()}")
        for miss in score.misses:
            print("  " + miss)
    if argv[1:]:
        report = scan_python_tree(Path(p) for p in argv[1:])
        print(
            f"\n[real code] {report.files} files, findings {dict(report.findings)}, corrupting code: {len(report.damaged)}"
        )
        for line in report.examples:
            print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
