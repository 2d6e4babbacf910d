"""lm-evaluation-harness, unmodified, against tokenmill's OpenAI endpoint agrees with tokenmill's own
evaluation engine on the same task file: per-choice log-likelihoods and the accuracies.

lm-eval's `local-completions` sends token-id prompts with `echo=true, logprobs=1, max_tokens=1` and reads
the prompt's token logprobs back (its loglikelihood request); tokenmill's engine scores in-process.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from tests.fixtures.grpc import TEST_TOKEN
from tests.fixtures.hf_chat import HfChat
from tests.test_openai_client import served  # noqa: F401 - the HF model behind a router and HTTP front
from tokenmill.common.eval.harness import evaluate_task
from tokenmill.common.eval.lm import LocalLM
from tokenmill.common.eval.tasks import load_task
from tokenmill.common.model.hf_layout import model_config_from_hf, read_hf_dir

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow

DOCS = [
    {"q": "The quick brown fox", "choices": ["jumps", "sleeps", "runs away"], "gold": 0},
    {"q": "Naïve café owners", "choices": ["enjoy", "dislike"], "gold": 1},
    {"q": "def add(a, b):", "choices": ["return a + b", "pass", "yield"], "gold": 0},
    {"q": "Once upon a time there", "choices": ["was", "were", "is"], "gold": 2},
    {"q": "hello", "choices": ["world", "there", "again", "hi"], "gold": 3},
]


def _task(folder: Path) -> Path:
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    task = {
        "task": "tiny_mc",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "docs.jsonl"}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "q",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }
    path = folder / "tiny_mc.yaml"
    path.write_text(json.dumps(task))
    return path


def test_lm_eval_local_completions_agrees_with_tokenmill_eval(
    served,  # noqa: F811 - the fixture imported above
    hf_chat: HfChat,
    tmp_path: Path,
) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    _, front = served
    path = _task(tmp_path)
    harness_lm = LocalCompletionsAPI(
        base_url=f"http://127.0.0.1:{front.port}/v1/completions",
        model="chat",
        tokenizer_backend="huggingface",
        tokenizer=str(hf_chat.path),
        header={"Authorization": f"Bearer {TEST_TOKEN}"},
        max_length=64,
        max_retries=1,
    )
    with contextlib.chdir(tmp_path):
        out = simple_evaluate(
            model=harness_lm,
            tasks=["tiny_mc"],
            task_manager=TaskManager(include_path=str(tmp_path)),
            log_samples=True,
        )
    assert out is not None
    theirs = out["results"]["tiny_mc"]
    their_lls = {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in out["samples"]["tiny_mc"]}

    tensors, hf, files = read_hf_dir(hf_chat.path)
    ours = LocalLM.from_checkpoint(tensors, model_config_from_hf(hf), files["tokenizer.json"])
    result = evaluate_task(load_task(path), ours)

    assert result.metrics["acc"] == pytest.approx(theirs["acc,none"])
    assert result.metrics["acc_norm"] == pytest.approx(theirs["acc_norm,none"])
    for doc_id, sample in enumerate(result.samples):
        assert sample["loglikelihoods"] == pytest.approx(their_lls[doc_id], abs=1e-3)
