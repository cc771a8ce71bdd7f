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


def _stale_venv(d) -> str:
    """A virtualenv that another interpreter made (its python answers the probe as 3.9.0)."""
    venv = os.path.join(d, "venv")
    os.makedirs(os.path.join(venv, "bin"))
    open(os.path.join(venv, "pyvenv.cfg"), "w").write("home = /elsewhere\n")
    with open(os.path.join(venv, "bin", "python"), "w") as f:
        f.write("#!/bin/sh\necho 3.9.0 /elsewhere\n")
    os.chmod(os.path.join(venv, "bin", "python"), 0o755)
    return venv


def test_a_venv_made_by_another_python_is_recreated(tmp_path):
    venv = _stale_venv(str(tmp_path))
    # No package index: setup stops at its first pip install, right after the venv step.
    offline = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_CONFIG_FILE": os.devnull, "PIP_EXTRA_INDEX_URL": ""}
    p, _ = _run({"PYTHON": sys.executable, "VENV": venv, **offline}, tmp_path)
    assert f"{venv} was made by another Python (3.9.0 /elsewhere); recreating it with {sys.executable}" in p.stderr, p.stderr
    out = subprocess.run(
        [os.path.join(venv, "bin", "python"), "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert os.path.samefile(out, venv)  # a real venv of this interpreter now
    assert p.returncode != 0  # (the offline pip install then fails, as arranged)


def test_a_folder_that_is_not_a_venv_is_left_alone(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    p, _ = _run({"PYTHON": sys.executable, "VENV": str(d)}, tmp_path)
    assert p.returncode == 2 and "is not a virtualenv" in p.stderr
    assert (d / "keep.txt").read_text() == "mine"
