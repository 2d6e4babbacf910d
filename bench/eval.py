"""Evaluation throughput: `tokenmill eval`'s engine vs lm-evaluation-harness driving HF transformers.

Same run, same model (a Llama built and saved by `transformers`), same task file (the shipped
`python_next_line`, 200 four-way multiple-choice questions), same batch size. Both must report the
same accuracy; the figure is tokens scored per second, counted the way lm-eval does the work (every
context + continuation request), so the two rates share a denominator.

    python -m bench.eval            # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from bench._report import target, write_report
from tokenmill.common.eval.harness import encode_pairs, evaluate_task
from tokenmill.common.eval.lm import LocalLM
from tokenmill.common.eval.tasks import SUITES, load_task
from tokenmill.common.ingest.tokenizer import EOS, eos_id, train_tokenizer
from tokenmill.common.ingest.tokenizer import vocab_size as vocab_size_of
from tokenmill.common.model.hf_layout import model_config_from_hf, read_hf_dir

TASK = SUITES / "python" / "next_line.yaml"


def build_hf_model(out: Path, vocab_size: int, hidden: int, layers: int) -> None:
    """The ingest service's tokenizer trained on standard-library source and a random Llama, both
    saved by HF."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:200]
    tok = train_tokenizer((f.read_text(errors="replace") for f in files), vocab_size)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(out)
    eos = eos_id(tok)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size_of(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=1024,
        eos_token_id=eos,
        bos_token_id=eos,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)


def run_tokenmill(model_dir: Path, batch_size: int) -> tuple[dict[str, float], float, int]:
    tensors, hf, files = read_hf_dir(model_dir)
    lm = LocalLM.from_checkpoint(
        tensors, model_config_from_hf(hf), files["tokenizer.json"], batch_size=batch_size
    )
    task = load_task(TASK)
    work = sum(
        len(c) + len(x)
        for inst in task.instances()
        for c, x in encode_pairs(lm, inst.context, inst.continuations)
    )
    start = time.perf_counter()
    result = evaluate_task(task, lm)
    return result.metrics, time.perf_counter() - start, work


def run_lm_eval(model_dir: Path, batch_size: int) -> tuple[dict[str, float], float]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(model_dir), batch_size=batch_size, dtype="float32", device="cpu")
    manager = TaskManager(include_path=str(TASK.parent))
    with contextlib.chdir(TASK.parent):  # the task's data_files are relative to its folder
        start = time.perf_counter()
        out = simple_evaluate(
            model=lm, tasks=["python_next_line"], task_manager=manager, batch_size=batch_size
        )
        seconds = time.perf_counter() - start
    scores = out["results"]["python_next_line"]
    return {"acc": scores["acc,none"], "acc_norm": scores["acc_norm,none"]}, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_hf_model(model_dir, args.vocab_size, args.hidden, args.layers)
        ours, ours_s, work = run_tokenmill(model_dir, args.batch_size)
        theirs, theirs_s = run_lm_eval(model_dir, args.batch_size)
    agree = all(abs(ours[k] - theirs[k]) < 1e-9 for k in ("acc", "acc_norm"))
    figures = {
        "tokens_scored": work,
        "tokenmill_seconds": round(ours_s, 2),
        "tokenmill_tokens_per_s": round(work / ours_s, 1),
        "tokenmill_acc": ours["acc"],
        "tokenmill_acc_norm": ours["acc_norm"],
        "accuracy_equal": agree,
    }
    baseline = {
        "lm_eval_hf_seconds": round(theirs_s, 2),
        "lm_eval_hf_tokens_per_s": round(work / theirs_s, 1),
        "lm_eval_hf_acc": theirs["acc"],
        "lm_eval_hf_acc_norm": theirs["acc_norm"],
    }
    speedup = theirs_s / ours_s
    write_report(
        "eval",
        figures,
        baseline,
        {"throughput_vs_lm_eval_hf": round(speedup, 2)},
        {"throughput_vs_lm_eval_hf": target(speedup, 3.0), "accuracy_equal": target(float(agree), 1.0)},
        extra={"settings": vars(args)},
    )
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
