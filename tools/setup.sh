#!/usr/bin/env bash
# Set up a fresh clone: a virtualenv ($VENV, default .venv) with weightbundle (editable), the
# test tools, tritonclient and the real tritonserver from the nvidia-pytriton wheel, then
# build the example model repository. Safe to run again (fast when nothing changed).
#
# The interpreter: $PYTHON if set, else python3 if it is supported, else the newest supported
# one found on PATH or in pyenv (tools/pythons.sh). It says which, and stops at once when
# there is none. A venv made by another interpreter is recreated, never reused.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/pythons.sh
VENV=${VENV:-.venv}
supported=$(echo "$SUPPORTED_PYTHONS" | sed 's/ /, /g')

if [ -n "${PYTHON:-}" ]; then
  if ! python_supported "$PYTHON"; then
    v=$(python_version "$PYTHON") || v="not a runnable Python"
    alt=$(find_python || true)
    echo "setup: PYTHON=$PYTHON is $v; weightbundle supports Python $supported." >&2
    echo "setup: ${alt:+use e.g. PYTHON=$alt (Python $(python_version "$alt")), or }see the README for why other versions do not work." >&2
    exit 2
  fi
  PY=$PYTHON
elif ! PY=$(find_python); then
  echo "setup: no supported Python found. weightbundle supports Python $supported." >&2
  echo "setup: found: $(describe_pythons)." >&2
  echo "setup: install one (e.g. 'pyenv install 3.12' or your distribution's python3.12 and python3.12-venv), or set PYTHON=/path/to/it." >&2
  exit 2
fi
PYV=$(python_version "$PY")
if [ -z "${PYTHON:-}" ] && [ "$(readlink -f "$(command -v python3 2>/dev/null || echo none)" 2>/dev/null)" != "$(readlink -f "$(command -v "$PY")")" ]; then
  if v3=$(python_version python3); then
    echo "setup: python3 is $v3, which weightbundle does not support; using $PY (Python $PYV)." >&2
  else
    echo "setup: no python3 on PATH; using $PY (Python $PYV)." >&2
  fi
else
  echo "setup: using $PY (Python $PYV) for $VENV" >&2
fi

# Reuse the venv only if the same interpreter made it (same version and base installation).
ident='import os, sys; print("%d.%d.%d" % sys.version_info[:3], os.path.realpath(sys.base_prefix))'
want=$("$PY" -c "$ident")
if [ -e "$VENV" ]; then
  have=$("$VENV/bin/python" -c "$ident" 2>/dev/null || echo "broken")
  if [ "$have" != "$want" ]; then
    if [ ! -f "$VENV/pyvenv.cfg" ]; then
      echo "setup: $VENV exists but is not a virtualenv; move it away or set VENV to another folder." >&2
      exit 2
    fi
    echo "setup: $VENV was made by another Python ($have); recreating it with $PY." >&2
    rm -rf "$VENV"
  fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PY" -m venv "$VENV"; then
    echo "setup: '$PY -m venv $VENV' failed (if it names ensurepip: on Debian/Ubuntu install python${PYV%.*}-venv)." >&2
    exit 2
  fi
fi
# The package is installed editable, so only a change of pyproject.toml (or of this step) needs pip.
PYTRITON="nvidia-pytriton==0.7.0"
stamp="$want $PYTRITON $(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$VENV/.weightbundle-setup" 2>/dev/null)" != "$stamp" ]; then
  rm -f "$VENV/.weightbundle-setup"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e ".[test,bench]"
  # --no-deps: only the tritonserver binary, python backend and stubs are needed, not pytriton's
  # own Python dependencies (which would also pull numpy 2; Triton 2.51's python backend needs numpy<2).
  "$VENV/bin/python" -m pip install -q --no-deps "$PYTRITON"
  echo "$stamp" > "$VENV/.weightbundle-setup"
fi
"$VENV/bin/python" tools/make_example.py
