"""The demo's verdict on a completion: its full lines must parse as Python (issue 14, item 6)."""

from __future__ import annotations

import pytest

from tokenmill.common.platform.demo import cut_at_last_full_line, parses_as_python


def test_cut_drops_the_unfinished_last_line() -> None:
    assert cut_at_last_full_line("import os\nimport sys\nfrom coll") == "import os\nimport sys\n"
    assert cut_at_last_full_line("x = 1\n") == "x = 1\n"
    assert cut_at_last_full_line("no newline at all") == ""


@pytest.mark.parametrize(
    "text",
    [
        "def f(x):\n    return x + 1\n    y = (",  # the cut-off tail is ignored
        "class A(object):\n    pass\n\nclass B",
        "import os\nimport sys\n",
        "def f(self):\n        self.x = 1\n        return self.x\n",  # any consistent indent
    ],
)
def test_code_whose_full_lines_are_python_parses(text: str) -> None:
    assert parses_as_python(text)


@pytest.mark.parametrize(
    "text",
    [
        "def f(x):\n",  # a def with no body yet
        "class A:\n    def m(self):\n",
        "def f(x):\n    return x\n  y = 2\n",  # dedent to no enclosing level
        "import os, \n",
        "def \x00f():\n    pass\n",  # NUL byte: ValueError in ast.parse, not SyntaxError
        "",
        "def f",  # nothing but a partial line
        "\n\n",
        "the quick brown fox\njumps over\n",
    ],
)
def test_noise_and_unfinished_blocks_do_not_parse(text: str) -> None:
    assert not parses_as_python(text)
