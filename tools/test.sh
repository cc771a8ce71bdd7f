#!/usr/bin/env bash
# One command (PYTHON and VENV as in tools/setup.sh): set up, then run the whole test suite (unit + real-tritonserver end-to-end
# + the benchmark in quick mode), after ruff and mypy. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
VENV_BIN="${VENV:-.venv}/bin"
# Lint, format and types first (configured in pyproject.toml): a few seconds, and a failure says where.
"$VENV_BIN/ruff" check backend tools tests
"$VENV_BIN/ruff" format --check backend tools tests
"$VENV_BIN/mypy"
exec "$VENV_BIN/python" -m pytest "$@"
