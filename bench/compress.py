"""CPU benchmark: what each compression method costs in perplexity and buys in bytes, on a model
tokenmill trained on the demo corpus (the standard library's modules, code preset) in this process.

One run: ingest the demo's corpus (--docs 0: all of it), train test-1m for --steps (the demo's 2,400;
fewer leave a model whose blocks barely matter, where every method's Δppl is noise) with the
trainer engine, then for each method compress with `compress_model` (the service's engine) on the
same calibration rows (train split), and measure with the service's own measurements
(services/compress/measure.py): perplexity on the val split over the dequantized weights, greedy
decode tokens/s of the inference engine on the stored format.

Distillation row: the trained model as teacher, a quarter-size student (test-1m with half the width)
distilled from it for --distill-steps (trainer mode "distill", T=1, pure KL) vs the same student
trained from scratch on the same data for the same steps, same seed: both held-out perplexities.
The teacher trains for --steps, more than the student gets, so it knows more than the student can
learn alone in that time (the setting where distillation pays).

Against the field, same run: the trained model exported to the HF layout and quantized by
llm-compressor's GPTQ W4A16 g128 recipe on the same calibration rows, its perplexity on the same eval
windows by the same function (bench/llmc_gptq.py, in the venv scripts/setup_llmcompressor.sh makes,
since llmcompressor pins an older transformers than .venv). Without that venv the row says so.

    scripts/setup_llmcompressor.sh   # once: .cache/venv-llmc
    python -m bench.compress [--steps 2400] [--docs 0] [--distill-steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from bench._report import target, write_report
from tokenmill.common.compress import MethodSpec, compress_model
from tokenmill.common.data.dataset import TOKENIZER, read_manifest
from tokenmill.common.ingest.pipeline import run_ingest
from tokenmill.common.ingest.spec import IngestSpec
from tokenmill.common.model.hf_layout import hf_config_from_manifest, write_hf_dir
from tokenmill.common.platform.demo import CORPUS_EXCLUDES
from tokenmill.common.trainer.checkpoint_io import read_full
from tokenmill.common.trainer.config import TrainConfig
from tokenmill.common.trainer.local_io import LocalCheckpointIO
from tokenmill.common.trainer.parallel import free_port
from tokenmill.common.trainer.worker import train
from tokenmill.services.compress.measure import decode_tokens_per_second, eval_perplexity
from tokenmill.services.compress.model_job import eval_stream, token_batches

REPO = Path(__file__).resolve().parent.parent
LLMC_PYTHON = REPO / ".cache" / "venv-llmc" / "bin" / "python"
LLMC_TIMEOUT_S = 1800
SAME_PPL_RTOL = 1e-4  # dense perplexity of both sides: proof that they measure alike
SEQ_LEN = 128
CALIBRATION_ROWS = 64
EVAL_TOKENS = 128 * SEQ_LEN
METHODS: dict[str, list[MethodSpec]] = {
    "int8": [MethodSpec("int8")],
    "int4-rtn-g128": [MethodSpec("int4-rtn", group_size=128)],
    "int4-gptq-g128": [MethodSpec("int4-gptq", group_size=128)],
    "int4-awq-g128": [MethodSpec("int4-awq", group_size=128)],
    "magnitude-50%": [MethodSpec("prune-magnitude", sparsity=0.5)],
    "wanda-50%": [MethodSpec("prune-wanda", sparsity=0.5)],
    "sparsegpt-50%": [MethodSpec("prune-sparsegpt", sparsity=0.5)],
    "wanda-2:4+int8": [MethodSpec("prune-wanda", pattern="2:4"), MethodSpec("int8")],
    "svd-r0.5": [MethodSpec("svd", rank_fraction=0.5)],
}
DISTILL_STUDENT = {"hidden_size": 64, "intermediate_size": 192, "num_heads": 2, "num_kv_heads": 2}
DISTILL_TEMPERATURE = 1.0
DISTILL_BATCH = 4


def build_dataset(data_dir: Path, docs: int) -> Path:
    spec = IngestSpec(
        name="stdlib", sources=[sysconfig.get_paths()["stdlib"]], preset="code", vocab_size=4096,
        max_documents=docs, val_fraction=0.05, skip_near_dedup=True, pii=False,
        exclude_globs=list(CORPUS_EXCLUDES),  # the demo's corpus: the library modules
    )  # fmt: skip
    run_ingest(spec, data_dir)
    return data_dir / "datasets" / "stdlib"


def _train(cfg: TrainConfig, root: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Run the trainer engine in this process; the final weights and their checkpoint ref."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    io = LocalCheckpointIO(root)
    result = train(cfg, io)
    assert result["status"] == "completed", result
    tensors = read_full(io, result["checkpoint"])
    tensors = {k: v for k, v in tensors.items() if not k.startswith(("optim.", "optimizer.", "rng.", "step"))}
    return tensors, result["checkpoint"]


def train_model(dataset: Path, root: Path, steps: int) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    vocab = int(read_manifest(dataset)["vocab_size"])
    cfg = TrainConfig(
        dataset_path=str(dataset), model_preset="test-1m", model_overrides={"vocab_size": vocab},
        steps=steps, micro_batch_size=8, seq_len=SEQ_LEN, lr=3e-3, warmup_steps=20, device="cpu",
        output_name="bench-model",
    )  # fmt: skip
    tensors, ref = _train(cfg, root)
    return tensors, cfg.model_config().to_dict(), ref


def train_student(
    dataset: Path, root: Path, steps: int, teacher: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, Any], float]:
    """The student distilled from `teacher` (mode distill), or from scratch when `teacher` is "";
    everything else equal (data order, seed, schedule). Weights, config and training seconds."""
    vocab = int(read_manifest(dataset)["vocab_size"])
    mode = "distill" if teacher else "pretrain"
    cfg = TrainConfig(
        mode=mode, dataset_path=str(dataset), model_preset="test-1m",
        model_overrides={**DISTILL_STUDENT, "vocab_size": vocab}, teacher_checkpoint=teacher,
        distill_temperature=DISTILL_TEMPERATURE, distill_alpha=0.0, steps=steps,
        micro_batch_size=DISTILL_BATCH, seq_len=SEQ_LEN, lr=3e-3, warmup_steps=min(20, steps // 5),
        device="cpu", seed=1, output_name=f"student-{mode}",
    )  # fmt: skip
    began = time.monotonic()
    tensors, _ = _train(cfg, root)
    return tensors, cfg.model_config().to_dict(), time.monotonic() - began


def measure(tensors: dict[str, torch.Tensor], config: dict[str, Any], stream) -> dict[str, float]:
    ppl = eval_perplexity(tensors, config, stream, SEQ_LEN)
    return {"perplexity": ppl.perplexity, "tokens_per_s": decode_tokens_per_second(tensors, config)}


def llmcompressor_row(
    python: Path, work: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], dataset: Path,
    calibration: list[torch.Tensor], stream: Any, dense_ppl: float,
) -> dict[str, Any]:  # fmt: skip
    """llm-compressor's GPTQ W4A16 g128 on the same model, calibration rows and eval windows (in its
    own venv, bench/llmc_gptq.py), or why it could not run. Fails if its dense perplexity differs
    from tokenmill's: then the two sides would not be measuring the same thing."""
    if not python.is_file():
        print(f"llm-compressor comparison skipped: no {python} (run scripts/setup_llmcompressor.sh)")
        return {"skipped": f"no llm-compressor venv at {python}; run scripts/setup_llmcompressor.sh"}
    tokenizer = {TOKENIZER: (dataset / TOKENIZER).read_bytes()}
    model_dir = write_hf_dir(work / "hf", tensors, hf_config_from_manifest(config, {}), tokenizer)
    save_file(
        {"calibration": torch.cat(calibration).contiguous(), "eval": torch.from_numpy(stream).contiguous()},
        str(work / "llmc-data.safetensors"),
    )
    out = work / "llmc-result.json"
    cmd = [str(python), "-m", "bench.llmc_gptq", "--model-dir", str(model_dir)]
    cmd += ["--data", str(work / "llmc-data.safetensors"), "--seq-len", str(SEQ_LEN), "--out", str(out)]
    began = time.monotonic()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=LLMC_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"bench.llmc_gptq failed ({done.returncode}):\n{done.stderr[-4000:]}")
    row = {**json.loads(out.read_text()), "process_s": time.monotonic() - began}
    print(
        f"dense perplexity: tokenmill {dense_ppl:.6f}, llm-compressor process {row['dense_perplexity']:.6f}"
    )
    if abs(row["dense_perplexity"] / dense_ppl - 1) > SAME_PPL_RTOL:
        raise RuntimeError(
            "the two perplexity measurements disagree on the dense model; the comparison is void"
        )
    row["dppl_pct"] = 100 * (row["perplexity"] / dense_ppl - 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2400, help="the demo's training steps")
    ap.add_argument("--docs", type=int, default=0, help="documents ingested (0: all, as the demo)")
    ap.add_argument("--distill-steps", type=int, default=60, help="student steps, distilled and scratch")
    ap.add_argument("--llmc-python", type=Path, default=LLMC_PYTHON, help="python of the llm-compressor venv")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as tmp:
        began = time.monotonic()
        dataset = build_dataset(Path(tmp), args.docs)
        tensors, config, teacher = train_model(dataset, Path(tmp) / "store", args.steps)
        prep_s = time.monotonic() - began
        calibration = token_batches(dataset, split="train", rows=CALIBRATION_ROWS, seq_len=SEQ_LEN)
        stream = eval_stream(dataset, split="val", max_tokens=EVAL_TOKENS + 1)
        model_config = _model_config(config)
        dense = measure(tensors, config, stream)
        rows: dict[str, dict[str, Any]] = {
            "dense": {**dense, "bytes": _bytes(tensors), "ratio": 1.0, "time_s": 0.0}
        }
        for name, steps in METHODS.items():
            t0 = time.monotonic()
            result = compress_model(tensors, steps, calibration, config=model_config)
            seconds = time.monotonic() - t0
            got = measure(result.tensors, {**config, **result.manifest_meta}, stream)
            rows[name] = {**got, "bytes": result.bytes_after, "ratio": result.ratio, "time_s": seconds}
        for name, ref in (("distill-student", teacher), ("scratch-student", "")):
            student, student_config, seconds = train_student(
                dataset, Path(tmp) / "store", args.distill_steps, ref
            )
            got = measure(student, student_config, stream)
            bytes_after = _bytes(student)
            rows[name] = {
                **got,
                "bytes": bytes_after,
                "ratio": rows["dense"]["bytes"] / bytes_after,
                "time_s": seconds,
            }
        for row in rows.values():
            row["dppl_pct"] = 100 * (row["perplexity"] / dense["perplexity"] - 1)
        _print_table(rows)
        llmc = llmcompressor_row(
            args.llmc_python, Path(tmp), tensors, config, dataset, calibration, stream, dense["perplexity"]
        )
        _print_llmc(llmc)
    write_report(
        "compress",
        {f"{name} {k}": v for name, row in rows.items() for k, v in row.items()},
        {"llm-compressor gptq w4a16 g128": llmc},
        _ratios(rows["int4-gptq-g128"], llmc),
        _targets(rows, llmc),
        {
            "setup": {
                "steps": args.steps,
                "docs": args.docs,
                "seq_len": SEQ_LEN,
                "calibration_rows": CALIBRATION_ROWS,
                "distill_steps": args.distill_steps,
                "distill_student": DISTILL_STUDENT,
                "distill_temperature": DISTILL_TEMPERATURE,
                "distill_batch": DISTILL_BATCH,
                "eval_tokens": EVAL_TOKENS,
                "prep_seconds": prep_s,
            }
        },  # fmt: skip
    )


def _ratios(gptq: dict[str, Any], llmc: dict[str, Any]) -> dict[str, float]:
    if "skipped" in llmc:
        return {}
    return {
        "gptq perplexity / llm-compressor's": gptq["perplexity"] / llmc["perplexity"],
        "llm-compressor time / gptq time": llmc["time_s"] / gptq["time_s"],
    }


def _targets(rows: dict[str, dict[str, Any]], llmc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    gptq = rows["int4-gptq-g128"]
    targets = {
        "int8 dppl % < 0.5": target(rows["int8"]["dppl_pct"], 0.5, higher_is_better=False),
        "gptq dppl % < rtn dppl %": target(gptq["dppl_pct"], rows["int4-rtn-g128"]["dppl_pct"], False),
        "wanda dppl % < magnitude dppl %": target(rows["wanda-50%"]["dppl_pct"], rows["magnitude-50%"]["dppl_pct"], False),
        "distilled student ppl < scratch student ppl": target(
            rows["distill-student"]["perplexity"], rows["scratch-student"]["perplexity"], False
        ),
    }  # fmt: skip
    if "skipped" not in llmc:
        targets["gptq perplexity <= 1.01 x llm-compressor's"] = target(
            gptq["perplexity"], 1.01 * llmc["perplexity"], higher_is_better=False
        )
        targets["gptq time s < llm-compressor's"] = target(
            gptq["time_s"], llmc["time_s"], higher_is_better=False
        )
    return targets


def _print_llmc(llmc: dict[str, Any]) -> None:
    if "skipped" in llmc:
        return
    print(
        f"{'llmc-gptq-g128':16}{'':>12}{'':>8}{llmc['perplexity']:>10.3f}{llmc['dppl_pct']:>9.2f}"
        f"{'':>9}{llmc['time_s']:>8.2f}   (llm-compressor {llmc['llmcompressor']}, time = oneshot)"
    )


def _model_config(config: dict[str, Any]):
    from tokenmill.common.inference.config import model_config_from_dict

    return model_config_from_dict(config)


def _bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _print_table(rows: dict[str, dict[str, Any]]) -> None:
    print(f"{'method':16}{'bytes':>12}{'ratio':>8}{'ppl':>10}{'Δppl %':>9}{'tok/s':>9}{'time s':>8}")
    for name, r in rows.items():
        print(
            f"{name:16}{r['bytes']:>12,}{r['ratio']:>8.2f}{r['perplexity']:>10.3f}{r['dppl_pct']:>9.2f}"
            f"{r['tokens_per_s']:>9.1f}{r['time_s']:>8.2f}"
        )


if __name__ == "__main__":
    main()
