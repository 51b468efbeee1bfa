#!/usr/bin/env bash
# Create .venv and install tfb-serve into it, on a fresh machine. Idempotent.
#   EXTRAS: pip extras to install (default "eval"; the tests use "dev,eval,ray,docs").
# Every version is pinned by requirements.lock (generated from pyproject.toml by scripts/lock.sh),
# the same constraints the image installs with. torch is the locked version; where a CPU build of
# it is on disk (pip's find-links) pip takes that one, else PyPI's (the CUDA build on Linux). On a
# GPU host pick the wheel index, e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu130".
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-eval}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# shellcheck disable=SC2086  # TORCH_SPEC is a word list (requirement + pip options)
.venv/bin/python -m pip install -q -c requirements.lock ${TORCH_SPEC:-torch}
.venv/bin/python -m pip install -q -c requirements.lock -e ".[${EXTRAS}]"
