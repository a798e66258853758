#!/usr/bin/env bash
# Install what is needed and start the app (no network, Hub token or GPU needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False
exec .venv/bin/python app.py
