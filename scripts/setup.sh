#!/usr/bin/env bash
# Create .venv and install tfb-serve into it, on a fresh machine. Idempotent.
#   EXTRAS: pip extras to install (default "eval"; the tests use "dev,eval,ray").
# torch is pinned to the CPU build on disk here (an unpinned torch pulls a multi-GB CUDA build);
# on a GPU host set TORCH_SPEC, e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124".
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-eval}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
.venv/bin/python -m pip install -q -e ".[${EXTRAS}]"
