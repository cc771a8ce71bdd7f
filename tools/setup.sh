#!/usr/bin/env bash
# Set up a fresh clone: a virtualenv in .venv with weightbundle (editable), the test
# tools, tritonclient and the real tritonserver from the nvidia-pytriton wheel, then
# build the example model repository. Safe to run again (fast when nothing changed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[test,bench]"
# --no-deps: only the tritonserver binary, python backend and stubs are needed, not pytriton's
# own Python dependencies (which would also pull numpy 2; Triton 2.51's python backend needs numpy<2).
.venv/bin/python -m pip install -q --no-deps "nvidia-pytriton==0.7.0"
.venv/bin/python tools/make_example.py
