"""weightbundle.lifecycle without a server: the kernel facts it relies on, and its nets."""

from __future__ import annotations

from typing import Iterator

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from weightbundle import lifecycle
from weightbundle import cli
from weightbundle.tritonserver import process, shm

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only (prctl, /proc)")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


def _wait(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return bool(cond())


def test_a_child_forked_from_a_thread_belongs_to_that_thread_until_it_exits():
    # Why PDEATHSIG is armed only for children of the main thread: the parent of a child
    # is the *thread* that forked it, and that thread may be short-lived.
    started, release = threading.Event(), threading.Event()
    box: list[subprocess.Popen] = []

    def spawn() -> None:
        box.append(subprocess.Popen(["sleep", "30"]))
        started.set()
        release.wait(10)

    t = threading.Thread(target=spawn)
    t.start()
    try:
        assert started.wait(10)
        child = box[0]
        assert not lifecycle.child_of_leader(os.getpid(), child.pid)
        release.set()
        t.join(10)
        assert _wait(lambda: lifecycle.child_of_leader(os.getpid(), child.pid), 5)  # reparented to the main thread
    finally:
        release.set()
        t.join(10)
        for p in box:
            p.kill()
            p.wait(10)


# The child imitates a stuck stub: its main thread blocks in a C call *holding the GIL*
# (ctypes.PyDLL keeps the GIL), so no Python thread can run in it any more.
CHILD = """
import ctypes, sys, time
from weightbundle import lifecycle
w = lifecycle.watch_parent(arm={arm})
print("armed" if w.armed else "not armed", flush=True)
ctypes.PyDLL(None).pause()
"""

PARENT = """
import subprocess, sys, time
c = subprocess.Popen([sys.executable, "-c", {child!r}], stdout=sys.stdout)
print("CHILD", c.pid, flush=True)
time.sleep(60)
"""


@contextlib.contextmanager
def _parent_of(child_code: str) -> Iterator[subprocess.Popen]:
    """A parent process (own process group) that starts ``child_code`` and prints "CHILD <pid>";
    the whole group is killed at the end, whatever the test did."""
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(PARENT.format(child=child_code))], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        yield parent
    finally:
        try:
            os.killpg(parent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        parent.wait(10)


@pytest.mark.parametrize("arm", [True, False])
def test_a_child_holding_the_gil_exits_when_its_parent_is_killed_only_with_pdeathsig(arm):
    child_code = textwrap.dedent(CHILD.format(arm=arm))
    with _parent_of(child_code) as parent:
        first = parent.stdout.readline()
        pid = int(first.split()[1])
        assert parent.stdout.readline().strip() == ("armed" if arm else "not armed")
        parent.kill()
        parent.wait(10)
        exited = _wait(lambda: not _alive(pid), 5)
        # Without PDEATHSIG the watchdog thread never gets the GIL: the child stays, as stubs did.
        assert exited is arm


def test_the_watchdog_alone_ends_a_child_whose_main_thread_is_idle(tmp_path):
    code = textwrap.dedent("""
        import time
        from weightbundle import lifecycle
        lifecycle.watch_parent(arm=False, grace=0.2)
        time.sleep(60)
    """)
    with _parent_of(code) as parent:
        pid = int(parent.stdout.readline().split()[1])
        time.sleep(0.5)
        parent.kill()
        parent.wait(10)
        assert _wait(lambda: not _alive(pid), 5)


def test_sweep_leftovers_spares_used_fresh_and_foreign_regions(tmp_path, monkeypatch):
    folder = tmp_path / "shm"
    folder.mkdir()
    monkeypatch.setattr(shm, "SHM_DIR", str(folder))
    for name in ("triton_python_backend_shm_region_dead", "triton_python_backend_shm_region_used", "not_a_region"):
        (folder / name).write_bytes(b"x")
    time.sleep(0.6)
    (folder / "triton_python_backend_shm_region_fresh").write_bytes(b"x")  # e.g. being created right now
    monkeypatch.setattr(shm, "_shm_used_by", lambda pids, prefixes=(): {"triton_python_backend_shm_region_used"})
    monkeypatch.setattr("weightbundle.store.default_root", lambda: str(tmp_path / "stores"))
    removed = shm.sweep_leftovers(None, min_age=0.3)
    assert removed == [str(folder / "triton_python_backend_shm_region_dead")]
    assert sorted(os.listdir(folder)) == ["not_a_region", "triton_python_backend_shm_region_fresh", "triton_python_backend_shm_region_used"]


def test_config_store_roots(tmp_path):
    for name, text in {
        "a": 'name: "a"\nparameters [ { key: "store_root" value: { string_value: "/srv/wb" } } ]\n',
        "b": 'name: "b"\nparameters {\n  key: "store_root"\n  value {\n    string_value: "/srv/other/"\n  }\n}\n',
        "c": 'name: "c"\nparameters [ { key: "history" value: { string_value: "2" } } ]\n',
        "d": 'name: "d"\nparameters [ { key: "store_root" value: { string_value: "relative" } } ]\n',
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.pbtxt").write_text(text)
    assert shm._config_store_roots(str(tmp_path)) == {"/srv/wb", "/srv/other"}


def test_serve_lifecycle_arguments(capsys, tmp_path):
    import argparse

    args = cli.add_serve_arguments(argparse.ArgumentParser()).parse_args(
        ["repo", "--exit-timeout-secs", "30", "--on-stub-death", "reload", "--model-control-mode", "explicit"]
    )
    assert (args.exit_timeout_secs, args.on_stub_death) == (30, "reload")
    defaults = cli.add_serve_arguments(argparse.ArgumentParser()).parse_args([])
    assert (defaults.exit_timeout_secs, defaults.on_stub_death) == (5, "exit")
    # unload/reload need explicit model control: refused before anything starts.
    assert cli.serve(str(tmp_path), on_stub_death="unload") == 2
    assert "needs --model-control-mode=explicit" in capsys.readouterr().err
    with pytest.raises(ValueError, match="exit_timeout"):
        process.TritonServer(str(tmp_path), exit_timeout=-1)
    assert "--exit-timeout-secs=30" in process.TritonServer(str(tmp_path), exit_timeout=30, backend_dir=str(tmp_path)).command()
