#!/usr/bin/env bash
# One command (PYTHON and VENV as in tools/setup.sh): set up, then run the whole test suite (unit + real-tritonserver end-to-end
# + the benchmark in quick mode). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec "${VENV:-.venv}/bin/python" -m pytest "$@"
