#!/usr/bin/env bash
# Install what is needed and run the whole test suite, plus the linters.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# the browser test drives Debian's chromium through Playwright (playwright cannot download browsers here)
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }) \
            || echo "warning: could not install chromium; the browser test will be skipped" >&2
    else
        echo "warning: chromium missing (sudo apt-get install chromium); the browser test will be skipped" >&2
    fi
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
