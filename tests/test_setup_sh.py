"""tools/setup.sh picks a supported interpreter in its first seconds, or refuses clearly (issue 13).

Fake interpreters (shell scripts answering the version probe) stand in for unsupported
Pythons; an unusable VENV stops setup right after its choice, so nothing is installed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = os.path.join(ROOT, "tools", "setup.sh")
MINOR = "%d.%d" % sys.version_info[:2]  # the suite runs on a supported Python


def _fake_python(d, version: str) -> str:
    """An executable that answers every ``-c`` probe with ``version`` and nothing else."""
    path = os.path.join(d, "python3")
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\necho {version}\n")
    os.chmod(path, 0o755)
    return path


def _run(env_extra: dict, tmp_path) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VENV")}
    env.update(env_extra)
    env.setdefault("VENV", "/proc/no-such-dir/venv")  # venv creation fails at once: nothing installed
    t0 = time.monotonic()
    p = subprocess.run(["bash", SETUP], env=env, capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    return p, time.monotonic() - t0


def test_unsupported_PYTHON_is_refused_at_once_naming_what_works(tmp_path):
    fake = _fake_python(str(tmp_path), "3.13.0")
    p, took = _run({"PYTHON": fake}, tmp_path)
    assert p.returncode == 2, p.stderr
    assert f"PYTHON={fake} is 3.13.0; weightbundle supports Python 3.10, 3.11, 3.12" in p.stderr
    assert "use e.g. PYTHON=" in p.stderr  # this machine has a supported one: it is named
    assert took < 15


def test_PYTHON_that_does_not_run_is_refused(tmp_path):
    p, _ = _run({"PYTHON": str(tmp_path / "nope")}, tmp_path)
    assert p.returncode == 2 and "is not a runnable Python" in p.stderr


def test_unsupported_python3_is_passed_over_for_a_supported_one(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    _fake_python(str(fake_bin), "3.13.0")
    os.symlink(sys.executable, fake_bin / f"python{MINOR}")  # a supported one on PATH
    p, took = _run({"PATH": f"{fake_bin}:{os.environ['PATH']}"}, tmp_path)
    assert "python3 is 3.13.0, which weightbundle does not support; using " in p.stderr, p.stderr
    chosen = p.stderr.split("; using ", 1)[1].split(" (Python ", 1)[1]
    assert chosen[:5].rstrip(".") in ("3.10", "3.11", "3.12"), p.stderr  # the newest supported one found
    # then it stops only because the VENV given here cannot be created
    assert p.returncode == 2 and "venv" in p.stderr and "failed" in p.stderr
    assert took < 30


def test_supported_pythons_agree_in_setup_pyproject_and_readme():
    """One list: tools/pythons.sh (setup, CI), pyproject's requires-python, the README's first paragraph."""
    import re

    text = open(os.path.join(ROOT, "tools", "pythons.sh")).read()
    setup = re.search(r'^SUPPORTED_PYTHONS="([^"]+)"', text, re.M).group(1).split()
    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    lo, hi = re.search(r'requires-python = ">=3\.(\d+),<3\.(\d+)"', pyproject).groups()
    assert setup == [f"3.{m}" for m in range(int(lo), int(hi))]
    readme = open(os.path.join(ROOT, "README.md")).read()
    first = readme.split("Both commands work on a fresh clone.", 1)[1].split("\n\n", 1)[0]
    named = re.search(r"\*\*Python ([0-9., or]+)\*\*", first).group(1)
    assert re.findall(r"3\.\d+", named) == setup
