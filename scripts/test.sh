#!/usr/bin/env bash
# Set up everything the tests need (venv, dev extras, promtool/prometheus, docker-compose, hadolint), then run them.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="dev,eval,ray" bash scripts/setup.sh
PYTHON=.venv/bin/python bash scripts/ci_deps.sh
.venv/bin/ruff check tfb_core app tests benchmarks scripts
exec .venv/bin/python -m pytest "$@"
