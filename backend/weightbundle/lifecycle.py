"""Make a python-backend stub exit when the tritonserver that launched it dies.

Triton's stub has its own parent check (every 300 ms), but it then locks the
stub's IPC mutexes and re-takes the GIL to tear down, so it hangs for good when
the main thread is blocked in an IPC call that waits for the dead parent while
holding the GIL. Seen with Triton 2.51: the main thread inside
``Metric.increment`` (custom metrics are a round trip to the server) and the
stub's health thread stuck in ``TerminateStubToParentQueueMonitor``.

Two independent nets, started from ``initialize``:

* **PR_SET_PDEATHSIG(SIGKILL)**, which needs no GIL and no cooperation. Linux ties
  it to the parent *thread*, and Triton 2.51 forks every stub from a model-loading
  thread that exits right after the load (seen at ``initialize`` in both model
  control modes; arming there killed every stub once loaded, while the server
  kept saying ready). So it is armed only once this process is a child of the
  server's main thread (the thread group leader, which lives as long as the
  server): the stub is reparented to it when the loading thread exits.
  SIGKILL leaves the stub's shm region behind: the next weightbundle stub that
  starts (and ``weightbundle serve`` at start) removes regions that no live
  process uses, so this holds under a stock tritonserver too.
* **A watchdog thread** for the rest (before arming, or a stub whose forking
  thread lives on): it polls ``getppid()``, gives the stub's own exit path a
  grace period, then unlinks this stub's region and ``os._exit``\\ s. It needs
  the GIL, so it cannot end the hang above on its own.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import sys
import threading
import time

__all__ = ["ParentWatch", "watch_parent"]

PR_SET_PDEATHSIG = 1
_REGION = re.compile(r"^triton_.+_backend_shm_region_")
_WATCH: "ParentWatch | None" = None
_LOCK = threading.Lock()


def _stub_region() -> str | None:
    """This stub's shm region name: argv[2] of triton_python_backend_stub."""
    try:
        with open("/proc/self/cmdline", "rb") as f:
            argv = f.read().decode("utf-8", "replace").split("\0")
    except OSError:
        return None
    return next((a for a in argv[1:4] if _REGION.match(a)), None)


def child_of_leader(parent: int, pid: int | None = None) -> bool:
    """Whether ``pid`` (default: this process) is a child of ``parent``'s main thread."""
    pid = os.getpid() if pid is None else pid
    try:
        with open(f"/proc/{parent}/task/{parent}/children") as f:  # needs CONFIG_PROC_CHILDREN
            return str(pid) in f.read().split()
    except OSError:
        return False


def _prctl_pdeathsig(sig: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class ParentWatch:
    """See the module docstring. One per process; ``watch_parent`` starts it."""

    def __init__(self, parent: int, *, poll: float = 0.25, grace: float = 2.0, arm: bool = True, on_parent_death=None) -> None:
        self.parent = parent
        self.poll = poll
        self.grace = grace
        self.armed = False  # PDEATHSIG set
        self._want_arm = arm and sys.platform.startswith("linux")
        self._region = _stub_region()
        self._on_parent_death = on_parent_death
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="weightbundle-parent-watch", daemon=True)

    def start(self) -> "ParentWatch":
        self._try_arm()  # before the thread: covers the common case at once
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def parent_alive(self) -> bool:
        return os.getppid() == self.parent

    def _try_arm(self) -> None:
        if self.armed or not self._want_arm or not child_of_leader(self.parent):
            return
        # Armed from this thread; the kernel checks every thread of a child when its parent
        # thread exits, so arming from the watchdog thread (which never exits) also works.
        self.armed = _prctl_pdeathsig(signal.SIGKILL)
        if self.armed and not self.parent_alive():  # died before prctl took effect
            self._die()

    def _run(self) -> None:
        # Its own thread: a /proc scan can take a while on a busy host, the watch must not wait.
        threading.Thread(target=self._sweep, name="weightbundle-region-sweep", daemon=True).start()
        started = time.monotonic()
        # Triton forks stubs from a model-loading thread that exits right after the load:
        # poll fast until the stub is reparented to the main thread and armed.
        while not self._stop.wait(self.poll if self.armed or time.monotonic() - started > 10 else min(self.poll, 0.02)):
            if self.parent_alive():
                self._try_arm()
                continue
            # Let Triton's own stub exit (it unlinks the region) before forcing.
            if self._stop.wait(self.grace):
                return
            self._die()

    def _sweep(self) -> None:
        try:
            from .tritonserver.shm import sweep_dead_regions

            sweep_dead_regions()
        except Exception:  # noqa: BLE001 - best effort; the launcher sweeps too
            pass

    def _die(self) -> None:
        if self._on_parent_death is not None:
            try:
                self._on_parent_death()
            except Exception:  # noqa: BLE001 - best effort, we exit next
                pass
        if self._region:
            try:
                os.unlink(os.path.join("/dev/shm", self._region))
            except OSError:
                pass
        os._exit(1)


def watch_parent(**kw) -> ParentWatch | None:
    """Start the parent watch for this stub (idempotent). Call early in ``initialize``."""
    global _WATCH
    with _LOCK:
        if _WATCH is None:
            parent = os.getppid()
            if parent <= 1:
                return None  # already orphaned, or the server is init (a container's PID 1)
            _WATCH = ParentWatch(parent, **kw).start()
        return _WATCH
