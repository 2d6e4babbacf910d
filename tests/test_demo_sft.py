"""The demo's docstring -> body SFT data: extracted from a fixture tree, and read by the real trainer loader."""

from __future__ import annotations

import json
from pathlib import Path

from tests.fixtures.train import train_tokenizer
from tokenmill.common.model.transformer import IGNORE_INDEX
from tokenmill.common.platform import demo_sft
from tokenmill.common.platform.demo import CORPUS_EXCLUDES
from tokenmill.common.trainer.data import build_sft_arrays, read_sft_jsonl

MODULE = '''\
import os


def add(a, b):
    """Return the sum of a and b."""
    total = a + b
    return total


def undocumented(x):
    return x


def only_doc():
    """Nothing but a docstring."""


class Greeter:
    """A class docstring is not a pair."""

    @staticmethod
    def greet(name: str) -> str:
        """Say hello.

        Over two lines.
        """
        text = f"hello {name}"
        return text

    def nested(self):
        """Holds an inner function."""

        def inner():
            """Not top-level: no pair of its own."""
            return 1

        return inner()
'''
LONG_BODY = 'def long_one():\n    """Too long to learn whole."""\n' + "    x = 1\n" * (
    demo_sft.MAX_BODY_LINES + 1
)
WIDE_BODY = 'def wide_one():\n    """Too many characters."""\n    return ' + "1 + " * 150 + "1\n"
SHORT = 'def short():\n    """Kept."""\n    return 0\n'


def fixture_tree(root: Path) -> Path:
    """A library tree with modules the demo's exclude globs skip and ones it reads."""
    for rel, text in {
        "pkg/mod.py": MODULE,
        "pkg/long.py": LONG_BODY + WIDE_BODY + SHORT,
        "pkg/broken.py": "def f(:\n",
        "pkg/notes.txt": SHORT,
        "pkg/tests/test_mod.py": SHORT.replace("short", "in_tests"),
        "test/test_top.py": SHORT.replace("short", "in_test"),
        "encodings/codec.py": SHORT.replace("short", "in_encodings"),
    }.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_pairs_are_signature_and_docstring_then_body(tmp_path):
    pairs = demo_sft.extract_pairs(fixture_tree(tmp_path), CORPUS_EXCLUDES)
    assert [p.prompt.split("(")[0] for p in pairs] == ["def short", "def add", "def greet", "def nested"]
    add, greet = pairs[1], pairs[2]
    assert add.prompt == 'def add(a, b):\n    """Return the sum of a and b."""\n'
    assert add.response == "    total = a + b\n    return total\n"
    # a method reads like a top-level function: dedented, its decorator left out
    assert greet.prompt == 'def greet(name: str) -> str:\n    """Say hello.\n\n    Over two lines.\n    """\n'
    assert greet.response == '    text = f"hello {name}"\n    return text\n'
    assert "def inner():" in pairs[3].response
    assert all(p.prompt.rstrip().endswith('"""') for p in pairs)


def test_excluded_trees_long_bodies_and_unparsable_modules_give_no_pairs(tmp_path):
    names = {p.prompt.split("(")[0] for p in demo_sft.extract_pairs(fixture_tree(tmp_path), CORPUS_EXCLUDES)}
    assert not names & {"def in_tests", "def in_test", "def in_encodings", "def long_one", "def wide_one"}
    assert not names & {"def undocumented", "def only_doc", "def inner"}
    # without the demo's excludes the same tree yields the library's test and codec modules too
    everything = {p.prompt.split("(")[0] for p in demo_sft.extract_pairs(tmp_path, ())}
    assert {"def in_tests", "def in_test", "def in_encodings"} <= everything


def test_over_the_limit_an_evenly_spaced_subset_is_kept(tmp_path):
    all_pairs = demo_sft.extract_pairs(fixture_tree(tmp_path), CORPUS_EXCLUDES)
    assert demo_sft.extract_pairs(tmp_path, CORPUS_EXCLUDES, limit=2) == [all_pairs[0], all_pairs[2]]
    assert demo_sft.extract_pairs(tmp_path, CORPUS_EXCLUDES, limit=len(all_pairs)) == all_pairs


def test_output_is_deterministic(tmp_path):
    root = fixture_tree(tmp_path / "lib")
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    demo_sft.write_jsonl(demo_sft.extract_pairs(root, CORPUS_EXCLUDES), first)
    demo_sft.write_jsonl(demo_sft.extract_pairs(root, CORPUS_EXCLUDES), second)
    assert first.read_bytes() == second.read_bytes()
    assert len(first.read_text().splitlines()) == 4


def test_the_trainer_sft_loader_reads_the_jsonl_and_learns_only_the_bodies(tmp_path):
    root = fixture_tree(tmp_path / "lib")
    pairs = demo_sft.extract_pairs(root, CORPUS_EXCLUDES)
    path = tmp_path / "demo-sft.jsonl"
    demo_sft.write_jsonl(pairs, path)
    tok = train_tokenizer([MODULE, LONG_BODY, SHORT], vocab_size=300)
    tok.save(str(tmp_path / "tokenizer.json"))
    assert read_sft_jsonl(path) == [(p.prompt, p.response) for p in pairs]
    inputs, targets = build_sft_arrays(path, tmp_path / "tokenizer.json", seq_len=128)
    assert inputs.shape == targets.shape == (len(pairs), 128)
    eos = tok.token_to_id("<|endoftext|>")
    for row, pair in zip(targets, pairs, strict=True):
        learned = [int(t) for t in row if t != IGNORE_INDEX]
        assert learned == tok.encode(pair.response, add_special_tokens=False).ids + [eos]
    assert json.loads(path.read_text().splitlines()[1])["response"] == pairs[1].response
