"""The evaluation engine: perplexity, lm-eval-format tasks, pass@k, and the code sandbox."""

from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.fixtures.inference import TinyCheckpoint
from tokenmill.common.errors import InvalidArgument
from tokenmill.common.eval import metrics
from tokenmill.common.eval.harness import encode_pair, evaluate_task
from tokenmill.common.eval.lm import GenerationOptions, LocalLM
from tokenmill.common.eval.perplexity import perplexity
from tokenmill.common.eval.sandbox import MEMORY, PASSED, REFUSED, TIMEOUT, SandboxLimits, run_python
from tokenmill.common.eval.tasks import load_suite, load_task
from tokenmill.common.inference.config import EngineConfig
from tokenmill.common.inference.llm_engine import build_engine
from tokenmill.common.inference.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def lm(tiny_ckpt: TinyCheckpoint) -> LocalLM:
    engine = build_engine(
        tiny_ckpt.tensors,
        tiny_ckpt.config_dict,
        EngineConfig(num_blocks=64, block_size=16),
        Tokenizer.from_json(tiny_ckpt.tokenizer_json),
    )
    return LocalLM(tiny_ckpt.model, engine, batch_size=3)


@torch.no_grad()
def _reference_ll(model, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    logp = F.log_softmax(model(ids)[0].float(), -1)
    return sum(float(logp[len(context) + i - 1, t]) for i, t in enumerate(continuation))


def _write_task(tmp_path: Path, docs: list[dict], **cfg) -> Path:
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    body = {"task": "t", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "docs.jsonl"}}}
    body.update(cfg)
    path = tmp_path / "task.yaml"
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


# --------------------------------------------------------------------------------- perplexity
def test_perplexity_equals_a_plain_loop_over_the_same_tokens(tiny_ckpt: TinyCheckpoint) -> None:
    model = tiny_ckpt.model
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, 203)
    got = perplexity(model, tokens, seq_len=50, batch_size=2, decode=tiny_ckpt.hf_tokenizer.decode)
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, 50):
            window = torch.tensor(tokens[start : start + 51])[None]
            logp = F.log_softmax(model(window[:, :-1])[0].float(), -1)
            for i, t in enumerate(window[0, 1:].tolist()):
                nll -= float(logp[i, t])
                count += 1
    assert got.tokens == count == len(tokens) - 1
    assert got.nll_sum == pytest.approx(nll, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert got.bits_per_byte is not None and got.bits_per_byte > 0


def test_perplexity_refuses_a_split_too_small_to_score(tiny_ckpt: TinyCheckpoint) -> None:
    with pytest.raises(InvalidArgument, match="at least 2 tokens"):
        perplexity(tiny_ckpt.model, np.array([3]), seq_len=8)


# ------------------------------------------------------------------------------ loglikelihood
def test_encode_pair_moves_trailing_spaces_to_the_continuation(lm: LocalLM) -> None:
    ctx, cont = encode_pair(lm, "The quick brown ", "fox")
    assert ctx == lm.encode("The quick brown")
    assert ctx + cont == lm.encode("The quick brown fox")
    assert encode_pair(lm, "", "fox") == ([lm.prefix_token_id], lm.encode("fox"))


def test_batched_loglikelihoods_equal_one_forward_each(lm: LocalLM, tiny_ckpt: TinyCheckpoint) -> None:
    pairs = [
        encode_pair(lm, c, x)
        for c, x in [("The quick", " brown fox"), ("def add(a, b):", "\n"), ("Once", " upon a")]
    ]
    for (ll, greedy), (ctx, cont) in zip(lm.loglikelihood(pairs), pairs, strict=True):
        assert ll == pytest.approx(_reference_ll(tiny_ckpt.model, ctx, cont), abs=1e-4)
        assert isinstance(greedy, bool)


def test_shared_and_cut_contexts_score_as_one_pair_at_a_time(lm: LocalLM, tiny_ckpt: TinyCheckpoint) -> None:
    """Continuations of one context share a tree-masked sequence; a context over the model's length is
    cut from the left per pair, as lm-eval cuts it."""
    short = lm.encode("The quick brown")
    long = (lm.encode("Once upon a time there was a small model. ") * 40)[:300]  # > max_seq_len 256
    conts = [lm.encode(" fox"), lm.encode(" dog jumps over"), lm.encode(" a")]
    pairs = [(ctx, c) for ctx in (short, long) for c in conts]
    for (ll, _), (ctx, cont) in zip(lm.loglikelihood(pairs), pairs, strict=True):
        whole = (ctx + cont)[-(lm.max_length + 1) :]
        ref = _reference_ll(tiny_ckpt.model, whole[: len(whole) - len(cont)], cont)
        assert ll == pytest.approx(ref, abs=1e-4)


def test_multiple_choice_accuracy_equals_the_hand_computed_answer(
    lm: LocalLM,
    tiny_ckpt: TinyCheckpoint,
    tmp_path: Path,
) -> None:
    docs = [
        {"q": "The quick brown", "choices": ["fox", "dog", "cat jumps"]},
        {"q": "Once upon a", "choices": ["time", "model", "small fast"]},
        {"q": "def add(a, b):", "choices": ["return", "pass"]},
    ]
    expected_acc, expected_norm = [], []
    for i, doc in enumerate(docs):
        lls = [_reference_ll(tiny_ckpt.model, *encode_pair(lm, doc["q"], " " + c)) for c in doc["choices"]]
        best = int(np.argmax(lls))
        doc["gold"] = best if i != 1 else (best + 1) % len(doc["choices"])  # one doc the model gets wrong
        expected_acc.append(float(best == doc["gold"]))
        norm = [ll / len(c) for ll, c in zip(lls, doc["choices"], strict=True)]
        expected_norm.append(float(int(np.argmax(norm)) == doc["gold"]))
    path = _write_task(
        tmp_path,
        docs,
        output_type="multiple_choice",
        doc_to_text="{{q}}",
        doc_to_choice="choices",
        doc_to_target="gold",
        metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}],
    )
    result = evaluate_task(load_task(path), lm)
    assert result.metrics["acc"] == pytest.approx(np.mean(expected_acc)) == pytest.approx(2 / 3)
    assert result.metrics["acc_norm"] == pytest.approx(np.mean(expected_norm))


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"output_type": "ranking"}, "output_type"),
        ({"output_type": "multiple_choice", "doc_to_text": "q", "doc_to_target": "gold"}, "doc_to_choice"),
        ({"doc_to_text": "{{missing}}", "doc_to_target": "a"}, "template"),
        ({"doc_to_text": "q", "doc_to_target": "a", "num_fewshot": 5}, "zero-shot"),
        ({"doc_to_text": "q", "doc_to_target": "a", "metric_list": [{"metric": "acc"}]}, "does not apply"),
        ({"doc_to_text": "q", "doc_to_target": "a", "dataset_path": "hellaswag"}, "dataset_path"),
    ],
)
def test_bad_task_files_are_refused_before_any_model_work(tmp_path: Path, cfg: dict, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        load_task(_write_task(tmp_path, [{"q": "x", "a": "y", "gold": 0}], **cfg))


def test_a_task_without_documents_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="no documents"):
        load_task(_write_task(tmp_path, [], doc_to_text="q", doc_to_target="a"))


# ---------------------------------------------------------------------------------- pass@k
@pytest.mark.parametrize(("n", "c", "k"), [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 5, 2), (4, 4, 4)])
def test_pass_at_k_equals_its_combinatorial_definition(n: int, c: int, k: int) -> None:
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(combinations(outcomes, k))
    assert metrics.pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_generation_is_cut_at_stop_strings(lm: LocalLM) -> None:
    [[text]] = lm.generate([lm.encode("The quick")], GenerationOptions(max_tokens=12, until=(" ",)))
    assert " " not in text


def test_code_task_scores_pass_at_1_with_the_sandbox(lm: LocalLM, tmp_path: Path) -> None:
    docs = [
        {"prompt": "def add(a, b):\n", "test": "assert add(2, 3) == 5"},
        {"prompt": "x = 1\n", "test": "assert x == 1"},
    ]
    path = _write_task(
        tmp_path,
        docs,
        doc_to_text="prompt",
        doc_to_target="test",
        metric_list=[{"metric": "pass_at_k", "k": [1]}],
        generation_kwargs={"until": ["\n"], "max_gen_toks": 8},
    )
    result = evaluate_task(load_task(path), lm)
    # The random model's completion is on one line: the second doc passes whatever it writes unless
    # the line is a syntax error; the first passes only if it wrote `return a + b`.
    assert set(result.metrics) == {"pass@1"}
    per_doc = [s["passed"][0] for s in result.samples]
    assert result.metrics["pass@1"] == pytest.approx(np.mean(per_doc))


# --------------------------------------------------------------------------------- sandbox
def test_sandbox_runs_ordinary_code_and_writes_inside_its_directory() -> None:
    result = run_python("open('out.txt', 'w').write('hi')\nprint(open('out.txt').read())")
    assert result.status == PASSED and result.stdout == "hi\n"


@pytest.mark.parametrize(
    "source",
    [
        "import socket\nsocket.create_connection(('93.184.216.34', 80), timeout=2)",
        "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)",
        "open('/tmp/tokenmill-sandbox-escape.txt', 'w').write('x')",
        "import os\nos.remove('/etc/hostname')",
        "import shutil\nshutil.rmtree('/tmp')",
        "import subprocess\nsubprocess.run(['ls'])",
        "import os\nos.system('true')",
        "import ctypes\nctypes.CDLL(None)",
    ],
)
def test_sandbox_refuses_network_writes_outside_and_processes(source: str) -> None:
    result = run_python(source)
    assert result.status == REFUSED, result
    assert not Path("/tmp/tokenmill-sandbox-escape.txt").exists()


def test_sandbox_stops_runaway_time_and_memory() -> None:
    assert run_python("while True:\n    pass", SandboxLimits(timeout_s=1.5)).status == TIMEOUT
    assert run_python("x = bytearray(4 << 30)", SandboxLimits(memory_bytes=256 << 20)).status == MEMORY


def test_sandbox_failing_asserts_are_failures_not_errors_of_ours() -> None:
    result = run_python("assert 1 + 1 == 3")
    assert result.status == "failed" and "AssertionError" in result.stderr


# ------------------------------------------------------------------------------ shipped suite
def test_the_shipped_python_suite_loads_and_scores(lm: LocalLM) -> None:
    tasks = {t.name: t for t in load_suite("python")}
    assert set(tasks) == {"python_next_line", "python_functions"}
    next_line = evaluate_task(tasks["python_next_line"], lm, limit=8)
    assert set(next_line.metrics) == {"acc", "acc_norm"} and next_line.documents == 8
    functions = evaluate_task(tasks["python_functions"], lm, limit=2)
    assert 0.0 <= functions.metrics["pass@1"] <= 1.0


def test_an_unknown_suite_names_the_shipped_ones() -> None:
    with pytest.raises(InvalidArgument, match="python"):
        load_suite("no-such-suite")


def test_scoring_a_sliding_window_model_keeps_its_window(tiny_ckpt: TinyCheckpoint) -> None:
    """The tree mask is narrowed to each layer's window: scores equal the model's own windowed forward."""
    from tests.fixtures.inference import random_model, tiny_config

    model = random_model(tiny_config(tiny_ckpt.config.vocab_size, model_type="mistral", sliding_window=8))
    lm = LocalLM.from_checkpoint(model.state_dict(), model.config.to_dict(), tiny_ckpt.tokenizer_json)
    ctx = lm.encode("Once upon a time there was a small language model that wanted to be fast.")
    pairs = [(ctx, lm.encode(c)) for c in (" The quick brown fox", " def add(a, b):")]
    for (ll, _), (c, cont) in zip(lm.loglikelihood(pairs), pairs, strict=True):
        assert len(c) + len(cont) > 3 * 8
        assert ll == pytest.approx(_reference_ll(model, c, cont), abs=1e-4)
