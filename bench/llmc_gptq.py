"""llm-compressor's GPTQ W4A16 g128 on an HF model directory: the baseline `bench/compress.py` runs.

Runs in its own venv (scripts/setup_llmcompressor.sh: llmcompressor pins an older transformers than
the main .venv), started by bench/compress.py as `VENV/bin/python -m bench.llmc_gptq` from the repo
root. Inputs are files, no pickle: the HF model directory tokenmill exported (with tokenizer.json), and a safetensors file
with the calibration rows ("calibration", int64 [rows, seq_len], the rows tokenmill's GPTQ uses) and
the eval stream ("eval", int64 [n]). Perplexity is tokenmill's own `perplexity()` (the same windows,
batches and summed cross-entropy) over the HF model in fp32, before and after, so the dense figure
checks that both sides measure alike. Writes a JSON result to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tokenmill.common.eval.perplexity import perplexity

PPL_BATCH = 8  # as services/compress/measure.py


def hf_perplexity(model: Any, tokens: torch.Tensor, seq_len: int) -> float:
    """Perplexity of an HF causal LM with tokenmill's windows and reduction."""
    model.eval()
    return perplexity(
        lambda ids: model(input_ids=ids).logits, tokens.numpy(), seq_len=seq_len, batch_size=PPL_BATCH
    ).perplexity


def calibration_dataset(rows: torch.Tensor) -> Any:
    """The rows as a tokenized `datasets.Dataset` (oneshot then skips its own tokenization)."""
    from datasets import Dataset

    ids = rows.tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})


def run_gptq(model: Any, model_dir: Path, rows: torch.Tensor) -> float:
    """oneshot with the documented W4A16 recipe on exactly `rows`, in order; returns its seconds.
    oneshot insists on a processor whenever a dataset is given, though the rows are token ids."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import PreTrainedTokenizerFast

    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    began = time.perf_counter()
    oneshot(
        model=model,
        processor=PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json")),
        dataset=calibration_dataset(rows),
        recipe=recipe,
        max_seq_length=rows.shape[1],
        num_calibration_samples=rows.shape[0],
        shuffle_calibration_samples=False,
    )
    return time.perf_counter() - began


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="safetensors: calibration, eval")
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import llmcompressor
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    data = load_file(str(args.data))
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    dense = hf_perplexity(model, data["eval"], args.seq_len)
    seconds = run_gptq(model, args.model_dir, data["calibration"])
    quantized = hf_perplexity(model, data["eval"], args.seq_len)
    result = {
        "llmcompressor": llmcompressor.__version__,
        "recipe": 'GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])',
        "calibration_rows": int(data["calibration"].shape[0]),
        "dense_perplexity": dense,
        "perplexity": quantized,
        "time_s": seconds,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
