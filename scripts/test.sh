#!/usr/bin/env bash
# Set up everything the tests need (venv, dev extras, the docs site's mkdocs, promtool/prometheus, docker-compose, hadolint), then run them.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="dev,eval,ray,docs" bash scripts/setup.sh
PYTHON=.venv/bin/python bash scripts/ci_deps.sh
.venv/bin/ruff check tfb_core app tests benchmarks scripts docs
exec .venv/bin/python -m pytest "$@"
