"""``TritonServer``: one tritonserver process on 127.0.0.1, from start to a clean stop.

The programmatic handle for tests, benchmarks and ``weightbundle serve``: free ports,
readiness, the python-backend stubs it runs (and which of them died), explicit model
control, shutdown that unloads first, and cleanup of whatever a crash left.
"""

from __future__ import annotations

import atexit
import ctypes
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Set
from ..errors import TritonServerError
from .shm import SHM_DIR, _config_store_roots, _group_pids, _is_region, _proc_pids, _shm_regions, _shm_used_by, sweep_leftovers
from .wheel import _supports_flag, prepare_backend_dir, server_env, triton_paths

HOST = "127.0.0.1"


MODEL_CONTROL_MODES = ("none", "explicit", "poll")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    return _free_ports(1)[0]


def _free_ports(n: int) -> List[int]:
    # Keep all sockets open until every port is chosen, so the n ports are distinct.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pdeathsig_preexec():
    """A preexec_fn that makes the child get SIGTERM when the spawning thread dies.

    This is the last safety net against orphaned servers when the Python process is
    killed (no atexit). Linux ties it to the *thread* that forked, so it is only used
    when starting from the main thread.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved in the parent: no loading after fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


@dataclass(frozen=True)
class StubInfo:
    """One python-backend stub process of a server (from its command line while it ran)."""

    pid: int
    model: str  # "?" when the stub was never seen alive
    version: str
    instance: str  # Triton's instance name, e.g. "mymodel_0_0"


_STUB_COMM = "triton_python_b"  # /proc/PID/comm of triton_python_backend_stub (15 chars)


STUB_DEATH_POLICIES = ("exit", "unload", "reload", "ignore")


def _stat(pid: int) -> Optional[List[str]]:
    """[comm, state, ppid, ...] from /proc/PID/stat, None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    i, j = raw.find("("), raw.rfind(")")
    return [raw[i + 1 : j]] + raw[j + 2 :].split()


def _children_of(pid: int) -> List[int]:
    """Child pids of every thread of ``pid`` (all of /proc when the kernel lacks the children file)."""
    kids: List[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(c) for c in f.read().split()]
    except FileNotFoundError:
        if os.path.isdir(f"/proc/{pid}"):
            return _proc_pids()  # no CONFIG_PROC_CHILDREN: callers filter by ppid
    except OSError:
        pass
    return kids


def _stub_info(pid: int) -> Optional[StubInfo]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode("utf-8", "replace").split("\0")
    except OSError:
        return None
    # argv: stub <repo>/<model>/<version>/model.py <region> <shm size> <growth> <server pid> <lib dir> <ipc> <instance> ...
    if len(argv) < 9 or not argv[0].endswith("triton_python_backend_stub"):
        return None
    version_dir = os.path.dirname(argv[1])
    return StubInfo(pid, os.path.basename(os.path.dirname(version_dir)), os.path.basename(version_dir), argv[8])


_LIVE: "weakref.WeakSet[TritonServer]" = weakref.WeakSet()
_ENV_DIRS_LOCK = threading.Lock()
_ENV_CLAIMS: "Dict[str, Optional[TritonServer]]" = {}  # python-backend temp dir -> the server that made it


def _python_env_dirs() -> Set[str]:
    """The python backend's per-load temp dirs (a fixed /tmp template in its pb_env.cc)."""
    return set(glob.glob("/tmp/python_env_??????"))


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        try:
            server.stop(timeout=10)
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


class TritonServer:
    """One tritonserver process bound to 127.0.0.1; a context manager.

    >>> with TritonServer("model_repository") as srv:            # doctest: +SKIP
    ...     client = tritonclient.http.InferenceServerClient(srv.http_url)
    """

    def __init__(
        self,
        model_repository: str,
        *,
        http_port: Optional[int] = None,
        grpc_port: Optional[int] = None,
        metrics_port: Optional[int] = None,
        model_control_mode: str = "none",
        load_models: Sequence[str] = (),
        backend_dir: Optional[str] = None,
        backend_config: Sequence[str] = (),
        allow_metrics: bool = True,
        log_file: Optional[str] = None,
        log_verbose: int = 0,
        extra_args: Sequence[str] = (),
        env: Optional[Mapping[str, str]] = None,
        sweep: bool = True,
        exit_timeout: int = 5,
    ) -> None:
        if model_control_mode not in MODEL_CONTROL_MODES:
            raise ValueError(f"model_control_mode must be one of {MODEL_CONTROL_MODES}, got {model_control_mode!r}")
        if load_models and model_control_mode != "explicit":
            raise ValueError("load_models requires model_control_mode='explicit'")
        for item in backend_config:
            backend, _, setting = item.partition(",")
            if not backend or "=" not in setting:
                raise ValueError(f"backend_config entries look like 'python,key=value', got {item!r}")
        self.model_repository = os.path.abspath(model_repository)
        self._fixed_ports = (http_port, grpc_port, metrics_port)
        self.http_port, self.grpc_port, self.metrics_port = self._fixed_ports
        self.model_control_mode = model_control_mode
        self.load_models = list(load_models)
        self.backend_dir = os.path.abspath(backend_dir) if backend_dir else None
        self.backend_config = list(backend_config)
        # A custom python-backend region prefix must be recognised by the shm cleanup too.
        self._shm_prefixes = [c.split("=", 1)[1] for c in self.backend_config if c.split("=", 1)[0].split(",", 1)[1].strip() == "shm-region-prefix-name"]
        self.allow_metrics = allow_metrics
        self.log_verbose = int(log_verbose)
        self.extra_args = list(extra_args)
        self.env = dict(env) if env is not None else None
        self.log_path: Optional[str] = os.path.abspath(log_file) if log_file else None
        self._own_backend_dir = False
        self._own_log = False  # a temp log we made: removed after a clean stop, kept after a failure
        self._proc: Optional[subprocess.Popen] = None
        self._shm_before: Set[str] = set()
        self._shm_owned: Set[str] = set()  # regions seen mapped by our processes
        self._env_dirs_before: Set[str] = set()  # Triton's /tmp/python_env_* dirs before our spawn
        self._starting = False  # spawned, its models not yet loaded: see _claim_env_dirs
        self._cleaned = True  # no process whose leftovers need cleaning
        self._lock = threading.RLock()
        if int(exit_timeout) < 0:
            raise ValueError(f"exit_timeout must be >= 0, got {exit_timeout!r}")
        # Triton's --exit-timeout-secs. Its HTTP front end spends it waiting for *every* open
        # connection, idle keep-alive ones included, before unloading models; see stop().
        self.exit_timeout = int(exit_timeout)
        self.sweep = sweep  # start() first removes leftovers of dead servers (sweep_leftovers)
        self._stub_cache: Dict[int, StubInfo] = {}  # what each stub was while it ran
        self._zombie_since: Dict[int, float] = {}
        self.swept: List[str] = []

    # ---- addresses

    @property
    def http_url(self) -> str:
        """'127.0.0.1:PORT', the form tritonclient.http expects."""
        return f"{HOST}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """'127.0.0.1:PORT', the form tritonclient.grpc expects."""
        return f"{HOST}:{self.grpc_port}"

    @property
    def metrics_url(self) -> Optional[str]:
        """Prometheus endpoint, or None with allow_metrics=False."""
        return f"http://{HOST}:{self.metrics_port}/metrics" if self.allow_metrics else None

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> Optional[int]:
        """None while running (or never started); the exit status once it has exited."""
        return self._proc.poll() if self._proc else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ---- lifecycle

    def command(self) -> List[str]:
        """The tritonserver command line for the current ports and settings."""
        args = [
            triton_paths().tritonserver,
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self.backend_dir}",
            f"--http-address={HOST}",
            f"--grpc-address={HOST}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--allow-metrics={'true' if self.allow_metrics else 'false'}",
            f"--model-control-mode={self.model_control_mode}",
            # Auto-complete makes startup ~5x slower and hides missing/bad config.pbtxt.
            "--disable-auto-complete-config",
            f"--exit-timeout-secs={self.exit_timeout}",
            f"--log-verbose={self.log_verbose}",
        ]
        if self.allow_metrics:
            args += [f"--metrics-port={self.metrics_port}"]
            if _supports_flag("--metrics-address"):
                args.append(f"--metrics-address={HOST}")
        args += [f"--load-model={m}" for m in self.load_models]
        args += [f"--backend-config={c}" for c in self.backend_config]
        return args + self.extra_args

    def start(self, timeout: float = 60) -> "TritonServer":
        """Spawn tritonserver and wait until /v2/health/ready answers 200.

        Raises TritonServerError (with the end of the log) if the process exits or
        is not ready within ``timeout`` seconds; nothing is left running then.
        """
        with self._lock:
            if self.is_running():
                raise TritonServerError(f"tritonserver already running (pid {self.pid})")
            if not os.path.isdir(self.model_repository):
                raise TritonServerError(f"model repository {self.model_repository} does not exist")
            try:
                if self.backend_dir is None:
                    self.backend_dir = tempfile.mkdtemp(prefix="weightbundle-backends-")
                    self._own_backend_dir = True
                prepare_backend_dir(self.backend_dir)
                if self.log_path is None:
                    fd, self.log_path = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
                    self._own_log = True
                    os.close(fd)
                deadline = time.monotonic() + timeout
                if self.sweep:
                    # Regions and stores of servers that were SIGKILLed with their launcher.
                    self.swept = sweep_leftovers(self.model_repository, prefixes=self._shm_prefixes)
                # Auto-picked ports can be taken by someone else before Triton binds them: retry.
                for attempt in range(3):
                    self._spawn()
                    try:
                        self._wait_ready(deadline)
                        # Attribute the startup models' regions now, in case the whole
                        # process group is later killed from outside (OOM killer).
                        self._note_owned_shm()
                        self._claim_env_dirs()
                        self.stubs()  # remember each stub's model while it runs, for dead_stubs()
                        return self
                    except TritonServerError:
                        assert self._proc is not None
                        if attempt < 2 and self._proc.poll() is not None and self._auto_port_was_taken():
                            self._cleanup_after_exit()
                            continue
                        raise
                raise AssertionError("unreachable")
            except BaseException:
                self.stop()
                raise

    def _auto_port_was_taken(self) -> bool:
        # Triton logs e.g. "failed to start HTTP service: ... Socket '127.0.0.1:N' already in use".
        m = re.search(r"Socket '[^']*:(\d+)' already in use", self.log_tail(40))
        if not m:
            return False
        port = int(m.group(1))
        return any(fixed is None and port == used for fixed, used in zip(self._fixed_ports, (self.http_port, self.grpc_port, self.metrics_port)))

    def _spawn(self) -> None:
        free = iter(_free_ports(3))
        self.http_port, self.grpc_port, self.metrics_port = (p if p is not None else next(free) for p in self._fixed_ports)
        env = server_env(self.env if self.env is not None else os.environ)
        self._shm_before = _shm_regions(self._shm_prefixes)
        with _ENV_DIRS_LOCK:
            self._env_dirs_before, self._starting = _python_env_dirs(), True
        self._cleaned = False
        assert self.log_path is not None and self.backend_dir is not None
        with open(self.log_path, "ab") as log:  # the child keeps its own fd
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # The stub's sys.path starts with '' (the cwd): use a directory with nothing
                # importable in it rather than whatever directory the caller runs in.
                cwd=os.path.join(self.backend_dir, "python"),
                start_new_session=True,  # own process group: killpg reaches the stubs, Ctrl-C in a terminal does not
                preexec_fn=_pdeathsig_preexec(),
            )
        _LIVE.add(self)

    def _wait_ready(self, deadline: float) -> None:
        # Triton opens the metrics port a few ms after HTTP; wait for both so a caller
        # can scrape metrics as soon as start() returns.
        urls = [f"http://{HOST}:{self.http_port}/v2/health/ready"] + ([self.metrics_url] if self.metrics_url else [])
        # No proxies: an http_proxy in the environment would otherwise capture 127.0.0.1.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for url in urls:
            while True:
                assert self._proc is not None
                if self._proc.poll() is not None:
                    raise TritonServerError(f"tritonserver exited with status {self._proc.returncode} before it was ready; {self._failure_report()}")
                try:
                    with opener.open(url, timeout=1) as resp:
                        if resp.status == 200:
                            break
                except (urllib.error.URLError, OSError, ValueError):
                    pass  # not listening yet, or 400 while models load
                if time.monotonic() >= deadline:
                    raise TritonServerError(f"tritonserver not ready at {url} within the timeout; {self._failure_report()}")
                time.sleep(0.05)

    def stop(self, timeout: float = 15) -> Optional[int]:
        """Shut down gracefully (SIGTERM), SIGKILL the process group if that takes
        longer than ``timeout`` (at least the exit timeout + 10 s), then make sure no
        shm region or weight store of ours is left.

        With explicit model control, every model is unloaded first, so the backends'
        ``finalize`` runs even when idle client connections use up Triton's exit timeout.
        Returns the server's exit status (None if it was never started). Idempotent."""
        with self._lock:
            proc = self._proc
            if proc is not None:
                if proc.poll() is None:
                    self._note_owned_shm()
                    if self.model_control_mode == "explicit":
                        self.unload_all(timeout=float(timeout))
                    try:
                        proc.send_signal(signal.SIGTERM)  # the server itself stops its stubs
                        proc.wait(max(float(timeout), self.exit_timeout + 10.0))
                    except subprocess.TimeoutExpired:
                        self._killpg()
                        proc.wait(5)
                if not self._cleaned:
                    self._cleanup_after_exit()
            if self._own_backend_dir and self.backend_dir:
                shutil.rmtree(self.backend_dir, ignore_errors=True)
                self.backend_dir, self._own_backend_dir = None, False
            if self._own_log and proc is not None and proc.returncode == 0 and self.log_path:
                try:
                    os.unlink(self.log_path)
                except FileNotFoundError:
                    pass
            _LIVE.discard(self)
            return proc.returncode if proc is not None else None

    # ---- stub health

    def stubs(self) -> Dict[int, StubInfo]:
        """The server's stub processes (live or dead but not yet reaped), by pid."""
        out: Dict[int, StubInfo] = {}
        if self._proc is None:
            return out
        server = self._proc.pid
        for pid in _children_of(server):
            st = _stat(pid)
            if not st or len(st) < 3 or int(st[2]) != server or not st[0].startswith(_STUB_COMM):
                continue
            if pid not in self._stub_cache and st[1] != "Z":
                info = _stub_info(pid)
                if info is not None:
                    self._stub_cache[pid] = info
            out[pid] = self._stub_cache.get(pid, StubInfo(pid, "?", "?", "?"))
        return out

    def dead_stubs(self, grace: float = 0.0) -> List[StubInfo]:
        """Stubs that died while their model is still loaded.

        Triton 2.51's python backend neither restarts a dead stub nor marks its model
        unready: every request routed to that instance fails with "Stub process ... is
        not healthy" while /v2/health/ready and /v2/models/NAME/ready stay 200. The
        backend reaps a stub only when its instance is unloaded, so a stub that stays a
        zombie is dead for good (a normal unload reaps it at once); with ``grace`` > 0,
        only stubs seen as zombies by calls at least ``grace`` seconds apart count.
        """
        now = time.monotonic()
        zombies = {pid: info for pid, info in self.stubs().items() if (_stat(pid) or ["", ""])[1] == "Z"}
        self._zombie_since = {pid: self._zombie_since.get(pid, now) for pid in zombies}
        return [info for pid, info in zombies.items() if now - self._zombie_since[pid] >= grace]

    def healthy(self) -> bool:
        """Running, /v2/health/ready answers 200, and no stub has died (see dead_stubs)."""
        if not self.is_running() or self.dead_stubs():
            return False
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://{self.http_url}/v2/health/ready", timeout=5) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def load_model(self, name: str, timeout: float = 120) -> None:
        """Load (or reload) a model over HTTP; explicit model control only."""
        self._post(f"/v2/repository/models/{urllib.parse.quote(name, safe='')}/load", b"{}", time.monotonic() + timeout)
        self._claim_env_dirs()  # the first python model loaded makes the backend's temp dir

    def unload_model(self, name: str, timeout: float = 60) -> bool:
        """Unload a model over HTTP and wait until it is no longer loaded; explicit mode only."""
        deadline = time.monotonic() + timeout
        self._post(f"/v2/repository/models/{urllib.parse.quote(name, safe='')}/unload", b"{}", deadline)
        while time.monotonic() < deadline:
            if not [m for m in self._repository_index() if m.get("name") == name and m.get("state") in ("READY", "LOADING", "UNLOADING")]:
                return True
            time.sleep(0.1)
        return False

    def unload_all(self, timeout: float = 30) -> bool:
        """Unload every loaded model over HTTP and wait until none is left loaded.

        Explicit model control only (Triton refuses unload in the other modes). Triton
        2.51 spends its exit timeout first on open HTTP connections, idle keep-alive
        ones included, and then exits with status 1 without finalizing models that are
        still loaded; unloading before SIGTERM avoids that. True if all were unloaded.
        """
        if not self.is_running() or self.model_control_mode != "explicit":
            return False
        deadline = time.monotonic() + timeout
        try:
            for m in self._repository_index():
                if m.get("state") == "READY":
                    name = urllib.parse.quote(str(m["name"]), safe="")
                    self._post(f"/v2/repository/models/{name}/unload", b"{}", deadline)
            while time.monotonic() < deadline:
                if not [m for m in self._repository_index() if m.get("state") in ("READY", "LOADING", "UNLOADING")]:
                    return True
                time.sleep(0.1)
        except (OSError, ValueError, urllib.error.URLError):
            pass  # SIGTERM follows regardless
        return False

    def _post(self, path: str, body: bytes, deadline: float) -> bytes:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        req = urllib.request.Request(f"http://{self.http_url}{path}", data=body, method="POST", headers={"Content-Type": "application/json"})
        with opener.open(req, timeout=max(1.0, deadline - time.monotonic())) as resp:
            return resp.read()

    def _repository_index(self) -> List[dict]:
        return json.loads(self._post("/v2/repository/index", b"{}", time.monotonic() + 10) or b"[]")

    def kill(self) -> None:
        """SIGKILL the server process only, with no cleanup: simulates a crash.
        The stubs are left to notice on their own; ``stop()`` later does the cleanup."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._note_owned_shm()
                self._proc.kill()
                self._proc.wait(5)

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Wait for the server to exit on its own; returns its status, None on timeout."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def _killpg(self) -> None:
        try:
            assert self._proc is not None
            os.killpg(self._proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _note_owned_shm(self) -> None:
        # Attribute regions while our processes still exist: those they map or hold
        # open, and those named on a stub's command line (argv[2]). Other tritonservers
        # on this machine may create regions meanwhile; a diff of /dev/shm would take theirs.
        if self._proc is None:
            return
        pids = _group_pids(self._proc.pid)
        self._shm_owned |= _shm_used_by(pids, self._shm_prefixes)
        for pid in pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().decode("utf-8", "replace").split("\0")
            except OSError:
                continue
            self._shm_owned |= {a for a in argv if _is_region(a, self._shm_prefixes)}

    def _cleanup_after_exit(self, grace: float = 10) -> None:
        """After the server has exited: wait for its stubs, then remove our leftover shm."""
        assert self._proc is not None
        pgid = self._proc.pid
        self._note_owned_shm()  # stubs of a server that died by itself may still be alive
        # Stubs notice a dead parent and exit (unlinking their region) by themselves.
        deadline = time.monotonic() + grace
        while _group_pids(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _group_pids(pgid):
            self._killpg()
            deadline = time.monotonic() + 5
            while _group_pids(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
        # Only regions that are ours (attributed above), new since start, and that no
        # live process uses any more.
        leftover = (self._shm_owned & _shm_regions(self._shm_prefixes)) - self._shm_before
        for name in leftover - _shm_used_by(_proc_pids(), self._shm_prefixes):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except FileNotFoundError:
                pass
        # Weight stores of a server that died without unloading its models (SIGKILL, or a
        # stub killed mid-shutdown): only stores whose owning server pid is dead are removed.
        from ..store import default_root, sweep_stale

        # Custom store_root folders too: a server that exits before finalize (exit timeout) leaves them.
        for root in sorted({default_root()} | _config_store_roots(self.model_repository)):
            sweep_stale(root)
        if self._starting:  # it exited before its models were loaded (a failed start)
            self._claim_env_dirs()
        self._remove_python_env_dir()  # gone already after a clean exit
        self._cleaned = True
        self._shm_owned.clear()

    def _claim_env_dirs(self) -> None:
        # The python backend makes one empty /tmp/python_env_XXXXXX when it loads and removes it
        # in its destructor, which a server that crashed, was killed or hit its exit timeout
        # never runs: a test suite left ~one per such server. Ours is the one dir that is new
        # since our spawn once our models are loaded and that no server of this process
        # claimed. Where that is ambiguous (several new, or another of our servers is
        # starting), nobody's: a leftover dir costs an inode, a wrong one breaks a live server.
        with _ENV_DIRS_LOCK:
            now = _python_env_dirs()
            for gone in set(_ENV_CLAIMS) - now:  # servers that exited cleanly removed theirs
                del _ENV_CLAIMS[gone]
            if self not in _ENV_CLAIMS.values():
                new = now - self._env_dirs_before - set(_ENV_CLAIMS)
                sure = len(new) == 1 and not any(o._starting for o in list(_LIVE) if o is not self)
                for d in new:
                    _ENV_CLAIMS[d] = self if sure else None
            self._starting = False

    def _remove_python_env_dir(self) -> None:
        # Only an empty one: a dir misattributed to us (another process's server started at
        # the same moment) keeps whatever environment it extracted.
        with _ENV_DIRS_LOCK:
            for d in [d for d, owner in _ENV_CLAIMS.items() if owner is self]:
                del _ENV_CLAIMS[d]
                try:
                    os.rmdir(d)
                except OSError:
                    pass  # not empty, or already gone

    def _failure_report(self) -> str:
        # Triton's own tables and shutdown chatter fill the tail; put the error lines
        # (E-level log lines, UNAVAILABLE model states, "error: ...") first.
        errors = [
            ln
            for ln in self.log_tail(2000).splitlines()
            if (re.match(r"E\d{4} ", ln) or "UNAVAILABLE:" in ln or ln.startswith("error:")) and "CudaDriverHelper" not in ln
        ]  # harmless without a GPU
        summary = "errors:\n" + "\n".join(errors[-20:]) + "\n" if errors else ""
        return f"log {self.log_path}\n{summary}last lines:\n{self.log_tail(40)}"

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log ('' if there is none)."""
        if not self.log_path:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 256 * 1024))
                data = f.read()
        except OSError:
            return ""
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    def __enter__(self) -> "TritonServer":
        if not self.is_running():
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self) -> None:
        # Safety net for a handle dropped without stop(); atexit covers interpreter exit.
        try:
            if self._proc is not None and self._proc.poll() is None:
                self.stop(timeout=10)
        except Exception:  # noqa: BLE001 - never raise from __del__
            pass

    def __repr__(self) -> str:
        state = "running" if self.is_running() else f"exited({self.returncode})" if self._proc else "not started"
        return f"<TritonServer {state} http={self.http_url} grpc={self.grpc_url} repo={self.model_repository}>"
