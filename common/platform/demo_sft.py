"""The demo's fine-tuning data: docstring -> body pairs from the same library modules it ingests.

`make demo` fine-tunes its pretrained model on what the shipped eval task `python_functions`
measures (common/eval/suites/python/functions.yaml): given a function's signature and docstring,
write its body. Each top-level function or method of a top-level class that has a docstring gives
one ``{"prompt": "def f(...):\\n    \\"\\"\\"doc\\"\\"\\"\\n", "response": "<body>\\n"}`` line, in the
format `tokenmill train --mode sft` reads (common/trainer/data.py ``read_sft_jsonl``). The files are
selected exactly as the ingest selects them (same code preset, same exclude globs), so the pairs
come from the corpus the model was pretrained on.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenmill.common.ingest.sources import SourceStats, iter_sources
from tokenmill.common.ingest.spec import IngestSpec

# Training windows are 128 tokens, ~3.3 characters each with the demo's 4096-token code tokenizer:
# a much longer pair would be cut to its signature and docstring, teaching little about bodies. With
# these limits 2,901 of the library's functions qualify; 314 of them run past 128 tokens (at most 222).
MAX_BODY_LINES = 40
MAX_PAIR_CHARS = 560
MAX_PROMPT_CHARS = 280
MAX_PAIRS = 2000


@dataclass(frozen=True)
class Pair:
    prompt: str
    response: str


def _dedent(lines: Sequence[str], columns: int) -> str:
    """Strip up to ``columns`` leading spaces per line: a method reads like a top-level function,
    while lines indented less (a string literal's continuation) are left as they are."""
    out = []
    for line in lines:
        indent = len(line) - len(line.lstrip(" "))
        out.append(line[min(indent, columns) :])
    return "".join(out)


def _functions(tree: ast.Module) -> Iterator[ast.FunctionDef]:
    """Top-level functions and the methods of top-level classes, in source order."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            yield node
        elif isinstance(node, ast.ClassDef):
            yield from (n for n in node.body if isinstance(n, ast.FunctionDef))


def _pair(node: ast.FunctionDef, lines: list[str]) -> Pair | None:
    """The pair for one function, or None when it has no docstring, no body after it, or is too long."""
    if ast.get_docstring(node, clean=False) is None or len(node.body) < 2 or node.end_lineno is None:
        return None
    doc_end = node.body[0].end_lineno
    if doc_end is None or node.body[1].lineno <= doc_end or node.lineno >= node.body[0].lineno:
        return None  # docstring on the def line, or code on the docstring's last line
    if node.end_lineno - doc_end > MAX_BODY_LINES:
        return None
    prompt = _dedent(lines[node.lineno - 1 : doc_end], node.col_offset)
    response = _dedent(lines[doc_end : node.end_lineno], node.col_offset)
    if not response.strip() or len(prompt) > MAX_PROMPT_CHARS or len(prompt) + len(response) > MAX_PAIR_CHARS:
        return None
    return Pair(prompt, response if response.endswith("\n") else response + "\n")


def pairs_from_source(text: str) -> list[Pair]:
    """All pairs of one module's source; a module that does not parse (a template, Python 2) gives none."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines(keepends=True)
    return [p for node in _functions(tree) if (p := _pair(node, lines)) is not None]


def extract_pairs(root: str | Path, excludes: Sequence[str], limit: int = MAX_PAIRS) -> list[Pair]:
    """Pairs from the ``.py`` files the code-preset ingest of ``root`` with ``excludes`` reads, in its
    (sorted) order; over ``limit``, an evenly spaced subset, so every part of the tree stays in."""
    spec = IngestSpec(name="sft", sources=[str(root)], preset="code", exclude_globs=list(excludes))
    pairs: list[Pair] = []
    for doc in iter_sources([str(root)], spec.source_options(), SourceStats()):
        if doc.id.endswith(".py"):
            pairs.extend(pairs_from_source(doc.text))
    if len(pairs) <= limit:
        return pairs
    return [pairs[i * len(pairs) // limit] for i in range(limit)]


def write_jsonl(pairs: Sequence[Pair], path: Path) -> None:
    """One ``{"prompt", "response"}`` object per line, the SFT format of `tokenmill train`."""
    with path.open("w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps({"prompt": p.prompt, "response": p.response}) + "\n")
