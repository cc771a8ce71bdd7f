#!/usr/bin/env bash
# One command: set up, serve the example model on a real tritonserver, update its weights live.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python tools/demo.py "$@"
