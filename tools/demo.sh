#!/usr/bin/env bash
# One command (PYTHON and VENV as in tools/setup.sh): set up, serve the example model on a real tritonserver, update its weights live.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec "${VENV:-.venv}/bin/python" tools/demo.py "$@"
