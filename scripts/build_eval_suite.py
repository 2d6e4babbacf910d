"""Build the offline `python` suite's next-line task from tokenmill's own source.

The demo trains on the Python standard library, so tokenmill's code is held out from it. For each
function, the model sees its first lines and must rank the true next line above three lines taken
from other functions at the same indentation (lm-eval multiple_choice; chance is 25 %). Run from the
repo root; the output is committed so the suite runs offline and never changes under a user.
"""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "common").rglob("*.py"))
OUT = ROOT / "common" / "eval" / "suites" / "python" / "next_line.jsonl"
MAX_CONTEXT_LINES, DOCS = 10, 200


def candidates(path: Path) -> list[tuple[list[str], str]]:
    """(context lines, next line) pairs: one per function long enough to have a body line to guess."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef) or node.end_lineno is None:
            continue
        body = lines[node.lineno - 1 : node.end_lineno]
        cut = min(len(body) - 1, 2 + (node.lineno % 5))
        answer = body[cut] if cut > 0 else ""
        if cut < 2 or len(answer.strip()) < 8 or answer.strip().startswith(("#", '"""')):
            continue
        out.append((body[max(0, cut - MAX_CONTEXT_LINES) : cut], answer.rstrip()))
    return out


def indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def main() -> None:
    rng = random.Random(0)
    pool = [c for p in SOURCES for c in candidates(p)]
    rng.shuffle(pool)
    docs = []
    for context, answer in pool:
        same = [a for _, a in pool if indent(a) == indent(answer) and a.strip() != answer.strip()]
        if len(same) < 3:
            continue
        choices = [answer, *rng.sample(same, 3)]
        rng.shuffle(choices)
        docs.append({"context": "\n".join(context) + "\n", "choices": choices, "gold": choices.index(answer)})
        if len(docs) == DOCS:
            break
    OUT.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    print(f"wrote {len(docs)} documents to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
