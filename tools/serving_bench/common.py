"""Shared pieces of the serving benchmark: settings compared, helpers, servers and artifacts, machine facts."""

from __future__ import annotations


import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


import onnxruntime as ort

from weightbundle import zoo
import weightbundle as wb
from weightbundle.modelconfig import make_config
from weightbundle.settings import ServingSettings
from weightbundle.tritonserver import TritonServer


ROOT = Path(__file__).resolve().parents[2]  # the repository
MiB = 1 << 20
SECRET_ENV = "WEIGHTBUNDLE_BENCH_SECRET"

# Backend settings compared ("T" is the default configuration; hybrid only where the backend has it).
MODES: dict[str, dict[str, str]] = {"T": {"prepack": "true"}}
if "hybrid" in {f.name for f in ServingSettings.parameters()}:
    MODES["Tsync"] = {"prepack": "true", "hybrid": "false"}
if "deterministic" in {f.name for f in ServingSettings.parameters()}:
    MODES["Tdet"] = {"prepack": "true", "deterministic": "true"}
MODES["F"] = {"prepack": "false"}
MODE_LABEL = {"T": "prepack=T (default)", "Tsync": "prepack=T hybrid=F", "Tdet": "prepack=T deterministic=T", "F": "prepack=F"}
# P4 only (a stream of partial updates): the default plus the weight P4 updates declared ahead.
P4_MODES = dict(MODES)
if "pin_weights" in {f.name for f in ServingSettings.parameters()}:
    P4_MODES["Tpin"] = {"prepack": "true", "pin_weights": "w0"}
    MODE_LABEL["Tpin"] = "prepack=T pin_weights=w0"


def runtime_options(mode: str) -> "wb.RuntimeOptions":
    return ServingSettings.from_model_config({"parameters": P4_MODES[mode]}).runtime_options(None)


def wait_optimised(b: "wb.Bundle", timeout: float = 120) -> None:
    """With hybrid sessions, wait until the pre-packed session has been swapped in."""
    deadline = time.monotonic() + timeout
    while not getattr(b, "fully_optimised", True) and time.monotonic() < deadline:
        time.sleep(0.01)


def quiesce(pid: int, window: float = 0.05, busy: float = 0.1, timeout: float = 20, calm: float = 0.0) -> float:
    """Wait until the server's process tree uses < ``busy`` of one core over ``window``
    (background session builds, staging-blob allocation), and has for ``calm`` seconds in a
    row: work a model defers until updates pause (a pre-packed build waits up to 2 s to
    settle) starts only after a short quiet window.  Returns the seconds waited."""
    import psutil

    def cpu() -> float:
        try:
            root = psutil.Process(pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return 0.0
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    t0 = time.monotonic()
    last = cpu()
    quiet_since = None
    while time.monotonic() - t0 < timeout:
        time.sleep(window)
        c = cpu()
        if c - last >= busy * window:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic() - window
        if quiet_since is not None and time.monotonic() - quiet_since >= max(calm, window):
            break
        last = c
    return time.monotonic() - t0


TRANSPORTS = ("request", "shm", "shm-staged", "file")
P4_SCALES = (1.0, 0.5, 2.0, 0.25)
_PRIVATE_STORES: list[str] = []  # in-process bundles' stores: checked gone at the end  # layer-0 scale per state: outputs differ by >= 2x between states

PLAIN_MODEL_PY = '''\
"""Plain python-backend model: a baked ORT session, inputs and outputs by the model's names."""
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.sess.get_inputs()]
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.version = np.array([int(args["model_version"])], np.uint64)

    def execute(self, requests):
        out = []
        for r in requests:
            feeds = {n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs}
            ys = self.sess.run(self.outputs, feeds)
            tensors = [pb_utils.Tensor(n, y) for n, y in zip(self.outputs, ys)]
            out.append(pb_utils.InferenceResponse(tensors + [pb_utils.Tensor("WEIGHTS_VERSION", self.version)]))
        return out
'''


def plain_config(name: str, n: int, instances: int) -> str:
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
        f'input [ {{ name: "x" data_type: TYPE_FP32 dims: [ -1, {n} ] }} ]\n'
        f'output [ {{ name: "y" data_type: TYPE_FP32 dims: [ -1, {n} ] }},\n'
        f'         {{ name: "WEIGHTS_VERSION" data_type: TYPE_UINT64 dims: [ 1 ] }} ]\n'
        f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n"
    )


# --------------------------------------------------------------------------- small helpers
def now() -> float:
    return time.perf_counter()


def med(xs) -> float:
    return float(np.median(xs)) if len(xs) else float("nan")


def pct(xs, q) -> float:
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def rotate(seq: list, k: int) -> list:
    k %= max(len(seq), 1)
    return list(seq[k:]) + list(seq[:k])


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fmt(v: Any, spec: str = ".1f", suffix: str = "") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    return f"{v:{spec}}{suffix}"


def mib_label(nbytes: int) -> str:
    m = nbytes / MiB
    return f"{m:.0f} MiB" if m >= 1 else f"{nbytes / 1024:.0f} KiB"


class Resources:
    """Everything the benchmark creates, released by ``close`` (also on Ctrl-C / errors)."""

    def __init__(self) -> None:
        self.servers: list[TritonServer] = []
        self.dirs: list[str] = []
        self.clients: list[Any] = []  # WeightClients whose push regions must go
        self.server_pids: list[int] = []
        self.lock = threading.Lock()

    def tempdir(self, prefix: str, root: str | None = None) -> str:
        d = tempfile.mkdtemp(prefix=prefix, dir=root)
        self.dirs.append(d)
        return d

    def start_server(self, repo: str, env: dict, name: str, **kw: Any) -> TritonServer:
        srv = TritonServer(repo, env=env, log_file=os.path.join(os.path.dirname(os.path.abspath(repo)), f"{name}.log"), **kw)
        with self.lock:
            self.servers.append(srv)
        try:
            srv.start(timeout=300)
        except BaseException:
            print(srv.log_tail(60), file=sys.stderr)
            raise
        with self.lock:
            self.server_pids.append(srv.pid)
        return srv

    def leaks(self) -> list[str]:
        """What of ours is still there after close(): stores, push regions, temp dirs."""
        left = [d for d in self.dirs if os.path.exists(d)] + [p for p in _PRIVATE_STORES if os.path.exists(p)]
        mine = tuple(f"weightbundle-{pid}-" for pid in self.server_pids) + (f"weightbundle-{os.getpid()}-", f"wbbench-{os.getpid()}-", f"wbpush-{os.getpid()}-")
        try:
            left += [os.path.join("/dev/shm", n) for n in os.listdir("/dev/shm") if n.startswith(mine)]
        except FileNotFoundError:
            pass
        return left

    def stop_server(self, srv: TritonServer) -> None:
        srv.stop()
        with self.lock:
            if srv in self.servers:
                self.servers.remove(srv)

    def stop_server_async(self, srv: TritonServer) -> threading.Thread:
        t = threading.Thread(target=self.stop_server, args=(srv,), daemon=True)
        t.start()
        return t

    def close(self) -> None:
        for c in self.clients:
            try:
                c.close()  # removes its push region
            except Exception:  # noqa: BLE001 - the server may be gone already
                pass
        self.clients.clear()
        threads = [threading.Thread(target=s.stop, daemon=True) for s in list(self.servers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.servers.clear()
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.dirs.clear()


# --------------------------------------------------------------------------- artifacts
class Artifact:
    """One model size: ONNX model, its bundle on disk, weight sets A (original) and B (A/2)."""

    def __init__(self, n: int, layers: int, workdir: str):
        self.n, self.layers = n, layers
        self.model = zoo.big_mlp(n, layers, seed=0)
        self.A = zoo.initializers(self.model)
        self.B = {k: v * np.float32(0.5) for k, v in self.A.items()}  # exact (power of 2)
        self.nbytes = sum(a.nbytes for a in self.A.values())
        self.label = mib_label(self.nbytes)
        self.bundle_path = os.path.join(workdir, f"mlp{n}x{layers}.bundle")
        t0 = now()
        wb.save_bundle(self.bundle_path, wb.build_bundle(wb.convert(self.model)))
        self.build_s = now() - t0
        self.onnx = {"A": self.model.SerializeToString(), "B": zoo.with_weights(self.model, self.B).SerializeToString()}

    def weights(self, which: str) -> dict[str, np.ndarray]:
        return self.A if which == "A" else self.B


def add_wb_model(repo: str, name: str, art: Artifact, instances: int, **params: str) -> None:
    d = os.path.join(repo, name)
    os.makedirs(os.path.join(d, "1"), exist_ok=True)
    dst = os.path.join(d, "1", "model.bundle")
    try:
        os.link(art.bundle_path, dst)  # read-only for everyone: one file for every model folder
    except OSError:
        shutil.copyfile(art.bundle_path, dst)
    params = {"allow_updates": "true", "update_secret_env": SECRET_ENV, **params}
    with wb.Bundle.load_from_file(art.bundle_path) as b:
        text = make_config(b, name, 0, instances, parameters=params)
    with open(os.path.join(d, "config.pbtxt"), "w") as f:
        f.write(text)


def write_plain_version(repo: str, name: str, version: int, onnx_bytes: bytes) -> None:
    d = os.path.join(repo, name, str(version))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "model.py"), "w") as f:
        f.write(PLAIN_MODEL_PY)
    with open(os.path.join(d, "model.onnx"), "wb") as f:
        f.write(onnx_bytes)


def add_plain_model(repo: str, name: str, art: Artifact, instances: int) -> None:
    os.makedirs(os.path.join(repo, name), exist_ok=True)
    with open(os.path.join(repo, name, "config.pbtxt"), "w") as f:
        f.write(plain_config(name, art.n, instances))
    write_plain_version(repo, name, 1, art.onnx["A"])


def http_client(url: str):
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(url, connection_timeout=600, network_timeout=600)


def infer_raw(c, model: str, x: np.ndarray, want_version: bool = True) -> tuple[np.ndarray, int | None]:
    import tritonclient.http as httpclient

    i = httpclient.InferInput("x", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    outs = [httpclient.InferRequestedOutput("y")] + ([httpclient.InferRequestedOutput("WEIGHTS_VERSION")] if want_version else [])
    r = c.infer(model, [i], outputs=outs)
    return r.as_numpy("y"), (int(r.as_numpy("WEIGHTS_VERSION").reshape(-1)[0]) if want_version else None)


def wait_version(c, model: str, x: np.ndarray, version: int, timeout: float = 120) -> int:
    """Infer until a response reports ``version``; returns how many probes it took."""
    deadline = time.monotonic() + timeout
    probes = 0
    while True:
        probes += 1
        _, v = infer_raw(c, model, x)
        if v == version:
            return probes
        if time.monotonic() > deadline:
            raise RuntimeError(f"{model}: version {version} not served within {timeout} s (still {v})")


# --------------------------------------------------------------------------- machine facts
def other_load() -> dict:
    """Signs of other work on this machine (the numbers may be noisy when there is some)."""
    import psutil

    me = os.getpid()
    mine = {me} | {p.pid for p in psutil.Process(me).children(recursive=True)}
    busy, tritons = [], 0
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            if p.pid in mine:
                continue
            cmd = " ".join(p.info["cmdline"] or [])[:100]
            if "tritonserver" in (p.info["name"] or "") or "/tritonserver " in cmd + " ":
                tritons += 1
            cpu = p.cpu_percent(None)
            busy.append((p, cmd))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    time.sleep(0.5)
    hot = []
    for p, cmd in busy:
        try:
            cpu = p.cpu_percent(None)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if cpu >= 20:
            hot.append(f"{cpu:.0f}% {cmd}")
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "other_tritonservers": tritons, "busy_processes": hot[:6]}


def machine(triton_version: str | None) -> dict:
    import psutil

    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "cpu_model": cpu_model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "triton_server": triton_version,
        "platform": platform.platform(),
        "weightbundle_commit": _git_rev(),
    }


def _git_rev() -> str:
    import subprocess

    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "backend"], capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + (" + uncommitted changes in backend/" if dirty else "") if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --------------------------------------------------------------------------- P3
def run_parallel(calls: list[Callable[[], None]]) -> None:
    """Run each call on its own thread, wait for all, re-raise the first failure."""
    errors: list[BaseException] = []

    def guard(fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=guard, args=(fn,), daemon=True) for fn in calls]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]


def concurrent_infer(url: str, model: str, x: np.ndarray, threads: int, per_thread: int) -> set[int]:
    seen: set[int] = set()

    def work() -> None:
        c = http_client(url)
        try:
            for _ in range(per_thread):
                seen.add(infer_raw(c, model, x)[1])
        finally:
            c.close()

    run_parallel([work] * threads)
    return seen
