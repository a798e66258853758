#!/usr/bin/env bash
# Install what is needed and run the whole test suite, plus the linters.
#   bash scripts/test.sh                  newest versions the requirements allow (.venv)
#   bash scripts/test.sh --min-versions   the declared floors, pinned (requirements-min.txt, .venv-min)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
if [ "${1:-}" = "--min-versions" ]; then
    shift
    VENV=.venv-min
    PY=${PYTHON:-python3}
    [ -x $VENV/bin/python ] || "$PY" -m venv $VENV
    $VENV/bin/python -m pip install -q --upgrade pip
    $VENV/bin/python -m pip install -q "torch==2.13.0"
    $VENV/bin/python -m pip install -q -r requirements-min.txt
    $VENV/bin/python -m pip install -q --no-deps -e .
    sed 's/\[[^]]*\]//' requirements-min.txt > $VENV/constraints.txt  # constraints take no extras
    $VENV/bin/python -m pip install -q "pytest>=8" "ruff==0.17.6" "residuals==0.3.2" "psutil>=5.9" "playwright>=1.45" \
        -c $VENV/constraints.txt
else
    bash scripts/setup_env.sh
fi
# the browser test drives Debian's chromium through Playwright (playwright cannot download browsers here)
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }) \
            || echo "warning: could not install chromium; the browser test will be skipped" >&2
    else
        echo "warning: chromium missing (sudo apt-get install chromium); the browser test will be skipped" >&2
    fi
fi
$VENV/bin/ruff check .
$VENV/bin/ruff format --check .
exec $VENV/bin/python -m pytest "$@"
