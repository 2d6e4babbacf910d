#!/usr/bin/env bash
# A separate virtual environment for `python -m bench.compress`'s llm-compressor baseline.
#
# Why separate: llmcompressor 0.14.0.1 pins transformers<=5.17 and huggingface_hub 1.x, which would
# downgrade the main .venv (transformers 5.24) that the HF reference tests use. Why torch is pinned:
# any llmcompressor requirement that admits another torch makes pip fetch a multi-GB CUDA build; the
# dry run below fails loudly instead if the resolver ever picks anything but the CPU torch 2.13.0.
#
# Usage: scripts/setup_llmcompressor.sh [VENV_DIR]   (default .cache/venv-llmc, git-ignored)
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${1:-.cache/venv-llmc}"
PY="${PYTHON:-python3.11}"
REQS=(llmcompressor==0.14.0.1 torch==2.13.0)

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY" -m venv "$VENV"
fi
plan=$("$VENV/bin/pip" install --dry-run "${REQS[@]}" 2>&1 | grep '^Would install' || true)
torches=$(grep -oE '(^| )torch-[^ ]+|nvidia-cu[^ ]+' <<<"$plan" | tr -d ' ' | grep -vx 'torch-2.13.0+cpu' || true)
if [[ -n "$torches" ]]; then
    echo "refusing to install: pip would bring $torches instead of the CPU torch 2.13.0 wheel" >&2
    exit 1
fi
"$VENV/bin/pip" install -q "${REQS[@]}"
"$VENV/bin/python" -c "import llmcompressor, torch, transformers; print('llmcompressor', llmcompressor.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
