#!/usr/bin/env bash
# Create .venv with everything the app and the tests need, on a fresh machine.
# torch is pinned first to the CPU build that this machine serves from local disk: an unpinned
# torch with none installed would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[app,test]" "torch==2.13.0"
