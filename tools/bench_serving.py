#!/usr/bin/env python
"""Serving benchmark (issue 5 item 3): weight updates through a real Triton vs a Triton reload.

Not a test: it measures, prints markdown tables, writes ``results.json`` (every raw
sample) and ``update_latency.png`` into ``--out``.  All figures come from ONE run on
one machine; repetitions are interleaved (the order rotates every round) so a noisy
machine shifts a ratio's numerator and denominator alike; reported values are medians.

Model: ``tests/zoo.big_mlp``, L x (n x n) FP32 MatMul+Relu, no bias (n=2048: 16 MiB per
layer), batch-32 input, no Triton batching (max_batch_size 0), ORT default threads.

P1  update latency, 16/64/256 MiB of weights (L = 1/4/16), full updates.  Time from the
    client call until the next inference response (a 1-row probe) reports the new
    version.  Transports: ``request`` (tensors in the HTTP body), ``shm`` (WeightClient:
    region created, filled, registered, unregistered per push), ``shm-staged`` (weights
    already in a registered region: the producer-writes-into-shm case), ``file``
    (safetensors in an allowlisted /tmp dir; the client's file write is reported apart).
    Each for the backend modes in MODES: prepack=true (the default; hybrid where the
    backend has it), prepack=true hybrid=false, prepack=false.  Before every visit the
    server is left to go idle (background session builds, staging allocation).  Beside
    them: Triton's own reload of a plain python-backend model (ORT, baked initializers)
    of the same graph: write a new version folder, explicit ``load_model``, until the new
    version answers; and the memcpy floor, ``np.copyto`` of the same bytes into a
    pre-faulted buffer (median of 3 per visit).
P2  steady-state inference: through Triton, on a server of its own (our backend prepack
    true/false vs the plain python-backend model; p50 of N sequential requests,
    interleaved blocks), and in-process (``Bundle.infer`` vs an ORT session on the
    original model).
P3  memory with 1 and 4 instances: RSS/PSS/anon of the tritonserver process tree, and
    /dev/shm bytes (weight store, python-backend regions), idle and after one full update;
    an "overhead probe" (same backend, tiny weights) separates per-process overhead from
    weight copies.
P4  under load: 8 client threads inferring for ~15 s (2 instances) while an update of one
    layer is pushed via shm every 100 ms (or back to back when an update takes longer), vs
    the same without updates (phases interleaved): p50/p99, failed requests, torn
    responses (output != the reference for the version the response reports; references
    precomputed in-process with ONNX Runtime).

    python tools/bench_serving.py            # full: about 5-6 minutes on 2 cores
    python tools/bench_serving.py --quick    # tiny model, < 60 s: keeps this script from rotting

Cleans up every server, temp repository, shm region and file it made, on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "backend",):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import onnxruntime as ort  # noqa: E402

from weightbundle import zoo  # noqa: E402
import weightbundle as wb  # noqa: E402
from weightbundle.client import WeightClient  # noqa: E402
from weightbundle.modelconfig import make_config  # noqa: E402
from weightbundle.tritonserver import SHM_PATTERN, TritonServer  # noqa: E402

MiB = 1 << 20
SECRET_ENV = "WEIGHTBUNDLE_BENCH_SECRET"
from weightbundle.settings import ServingSettings  # noqa: E402

# Backend settings compared ("T" is the default configuration; hybrid only where the backend has it).
MODES: dict[str, dict[str, str]] = {"T": {"prepack": "true"}}
if "hybrid" in {f.name for f in ServingSettings.parameters()}:
    MODES["Tsync"] = {"prepack": "true", "hybrid": "false"}
MODES["F"] = {"prepack": "false"}
MODE_LABEL = {"T": "prepack=T (default)", "Tsync": "prepack=T hybrid=F", "F": "prepack=F"}


def runtime_options(mode: str) -> "wb.RuntimeOptions":
    kw: dict[str, Any] = {"prepack": MODES[mode]["prepack"] == "true"}
    if "hybrid" in MODES[mode]:
        kw["hybrid"] = MODES[mode]["hybrid"] == "true"
    return wb.RuntimeOptions(**kw)


def wait_optimised(b: "wb.Bundle", timeout: float = 120) -> None:
    """With hybrid sessions, wait until the pre-packed session has been swapped in."""
    deadline = time.monotonic() + timeout
    while not getattr(b, "fully_optimised", True) and time.monotonic() < deadline:
        time.sleep(0.01)


def quiesce(pid: int, window: float = 0.05, busy: float = 0.1, timeout: float = 20) -> float:
    """Wait until the server's process tree uses < ``busy`` of one core over ``window``
    (background session builds, staging-blob allocation).  Returns the seconds waited."""
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
    while time.monotonic() - t0 < timeout:
        time.sleep(window)
        c = cpu()
        if c - last < busy * window:
            break
        last = c
    return time.monotonic() - t0


TRANSPORTS = ("request", "shm", "shm-staged", "file")
P4_SCALES = (1.0, 0.5, 2.0, 0.25)
_PRIVATE_STORES: list[str] = []  # in-process bundles' stores: checked gone at the end  # layer-0 scale per state: outputs differ by >= 2x between states

PLAIN_MODEL_PY = '''\
"""Plain python-backend model: ORT session on an ONNX file with baked initializers."""
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.version = np.array([int(args["model_version"])], np.uint64)

    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "x").as_numpy()
            (y,) = self.sess.run(None, {"x": x})
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", y), pb_utils.Tensor("WEIGHTS_VERSION", self.version)]))
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
        self.regions: list[tuple[Any, str, Any]] = []  # (http client, name, handle)
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
        """What of ours is still there after close(): stores, regions, temp dirs."""
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
        for client, name, handle in self.regions:
            try:
                client.unregister_system_shared_memory(name)
            except Exception:  # noqa: BLE001 - the server may be gone already
                pass
            try:
                import tritonclient.utils.shared_memory as shmu

                shmu.destroy_shared_memory_region(handle)
            except Exception:  # noqa: BLE001
                pass
        self.regions.clear()
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


# --------------------------------------------------------------------------- memory (P3)
def _allocated(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def _tree_bytes(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        total += sum(_allocated(os.path.join(dirpath, f)) for f in files)
    return total


def _rollup(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for ln in f:
                k, _, rest = ln.partition(":")
                if k in ("Pss_Anon", "Pss_File", "Pss_Shmem"):
                    out[k] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def tree_memory(pid: int) -> dict:
    """tritonserver + its stubs: RSS, PSS (psutil), PSS split anon/file/shmem, and /dev/shm use.

    footprint = anon + file PSS of the tree + this server's /dev/shm bytes counted once
    (tmpfs pages that processes map show up in Pss_Shmem and in /dev/shm; this counts them once).
    """
    import psutil

    root = psutil.Process(pid)
    procs = [root] + root.children(recursive=True)
    tot = {"processes": 0, "rss": 0, "pss": 0, "uss": 0, "pss_anon": 0, "pss_file": 0, "pss_shmem": 0}
    regions: set[str] = set()
    for p in procs:
        try:
            m = p.memory_full_info()
            cmd = p.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        tot["processes"] += 1
        tot["rss"] += m.rss
        tot["pss"] += m.pss
        tot["uss"] += m.uss
        r = _rollup(p.pid)
        tot["pss_anon"] += r.get("Pss_Anon", 0)
        tot["pss_file"] += r.get("Pss_File", 0)
        tot["pss_shmem"] += r.get("Pss_Shmem", 0)
        regions |= {a.lstrip("/") for a in cmd if SHM_PATTERN.match(a.lstrip("/"))}
        try:
            with open(f"/proc/{p.pid}/maps") as f:
                for ln in f:
                    i = ln.find("/dev/shm/")
                    if i >= 0:
                        name = ln[i + 9 :].split()[0]
                        if SHM_PATTERN.match(name):
                            regions.add(name)
        except OSError:
            pass
    stores = [d for d in os.listdir("/dev/shm") if d.startswith(f"weightbundle-{pid}-")]
    tot["shm_store"] = sum(_tree_bytes(os.path.join("/dev/shm", d)) for d in stores)
    tot["shm_regions"] = sum(_allocated(os.path.join("/dev/shm", r)) for r in regions)
    tot["shm_region_count"] = len(regions)
    tot["footprint"] = tot["pss_anon"] + tot["pss_file"] + tot["shm_store"] + tot["shm_regions"]
    return tot


# --------------------------------------------------------------------------- P2 in-process
def p2_inprocess(art: Artifact, x: np.ndarray, n_req: int, block: int) -> dict:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    baked = ort.InferenceSession(art.onnx["A"], so, providers=["CPUExecutionProvider"])
    bundles = {f"Bundle {MODE_LABEL[m]}": wb.Bundle.load_from_file(art.bundle_path, runtime_options(m)) for m in ("T", "F")}
    _PRIVATE_STORES.extend(b.store.path for b in bundles.values())
    try:
        for b in bundles.values():
            b.init()
            b.infer({"x": x})
            wait_optimised(b)
        fns: dict[str, Callable[[], Any]] = {"ORT baked": lambda: baked.run(None, {"x": x})}
        for k, b in bundles.items():
            fns[k] = lambda b=b: b.infer({"x": x})
        ref = baked.run(None, {"x": x})[0]
        for b in bundles.values():  # same answers, or the comparison means nothing
            np.testing.assert_allclose(b.infer({"x": x})[0]["y"], ref, rtol=1e-4, atol=1e-5)
        lat: dict[str, list[float]] = {k: [] for k in fns}
        names = list(fns)
        for k in names:
            for _ in range(3):
                fns[k]()
        for bi in range(max(1, n_req // block)):
            for k in rotate(names, bi):
                f = fns[k]
                for _ in range(block):
                    t0 = now()
                    f()
                    lat[k].append(now() - t0)
        return {"samples_s": lat, "p50_ms": {k: med(v) * 1e3 for k, v in lat.items()}}
    finally:
        for b in bundles.values():
            b.unload()


# --------------------------------------------------------------------------- P1 + P2 (Triton)
class P1Server:
    """One server with, per size: a wb model per prepack mode + a plain baked model for reloads."""

    def __init__(self, res: Resources, arts: list[Artifact], env: dict, secret: str):
        self.res, self.arts, self.secret = res, arts, secret
        self.work = res.tempdir("wb-bench-p1-")
        self.repo = os.path.join(self.work, "repo")
        self.allowed = os.path.join(self.work, "allowed")  # /tmp: page cache (a fresh tmpfs file pays first-touch page faults)
        os.makedirs(self.repo)
        os.makedirs(self.allowed)
        names = []
        for a in arts:
            for m in MODES:
                add_wb_model(self.repo, f"wb{a.layers}{m}", a, 1, file_update_dirs=self.allowed, **MODES[m])
                names.append(f"wb{a.layers}{m}")
            add_plain_model(self.repo, f"plain{a.layers}", a, 1)
            names.append(f"plain{a.layers}")
        log(f"P1 server: loading {len(names)} models")
        t0 = now()
        self.srv = res.start_server(self.repo, env, "p1", model_control_mode="explicit", load_models=names)
        self.start_s = now() - t0
        self.c = http_client(self.srv.http_url)
        self.wc = {n: WeightClient(self.srv.http_url, n, secret=secret) for n in names if n.startswith("wb")}
        self.plain_version = {a.layers: 1 for a in arts}
        self.turn: dict[tuple[int, str], int] = {}
        self.staged: dict[int, tuple[str, list]] = {}

    def next_set(self, layers: int, mode: str) -> str:
        k = self.turn.get((layers, mode), 0)
        self.turn[(layers, mode)] = k + 1
        return "B" if k % 2 == 0 else "A"  # models start at A: every push changes every value

    def stage_shm(self, art: Artifact) -> None:
        """A registered region already holding the weights (a producer that writes straight into shm)."""
        import tritonclient.utils.shared_memory as shmu

        name = f"wbbench-{os.getpid()}-{art.layers}"
        offsets, size = {}, 0
        for k, a in art.A.items():
            offsets[k] = size
            size = (size + a.nbytes + 63) // 64 * 64
        handle = shmu.create_shared_memory_region(name, "/" + name, size)
        self.res.regions.append((self.c, name, handle))
        for k, a in art.B.items():
            np.copyto(shmu.get_contents_as_numpy(handle, a.dtype, [a.size], offsets[k]), a.reshape(-1))
        self.c.register_system_shared_memory(name, "/" + name, size)
        self.staged[art.layers] = (name, [(k, list(a.shape), offsets[k], a.nbytes) for k, a in art.A.items()])

    def push_staged(self, layers: int, model: str) -> int:
        import tritonclient.http as httpclient

        name, rows = self.staged[layers]
        ctl = np.array([json.dumps({"op": "update", "secret": self.secret}).encode()], dtype=object)
        i = httpclient.InferInput("CONTROL", [1], "BYTES")
        i.set_data_from_numpy(ctl)
        inputs = [i]
        for k, shape, off, nbytes in rows:
            t = httpclient.InferInput(k, shape, "FP32")
            t.set_shared_memory(name, nbytes, off)
            inputs.append(t)
        r = self.c.infer(model, inputs, outputs=[httpclient.InferRequestedOutput("CONTROL_RESULT")])
        return int(json.loads(r.as_numpy("CONTROL_RESULT").reshape(-1)[0])["version"])

    def measure(self, art: Artifact, method: str, probe: np.ndarray, floor_buf: tuple[np.ndarray, np.ndarray]) -> dict:
        L = art.layers
        if method == "memcpy":
            src, dst = floor_buf
            ts = []
            for _ in range(3):  # one copy is ~10 ms: take the middle of three per visit
                t0 = now()
                np.copyto(dst, src)
                ts.append(now() - t0)
            return {"total": med(ts)}
        if method == "reload":
            v = self.plain_version[L] + 1
            name = f"plain{L}"
            t0 = now()
            write_plain_version(self.repo, name, v, art.onnx["B" if v % 2 == 0 else "A"])
            t_write = now() - t0
            t0 = now()
            self.c.load_model(name)
            t_ack = now() - t0
            probes = wait_version(self.c, name, probe, v)
            total = now() - t0
            self.plain_version[L] = v
            for old in os.listdir(os.path.join(self.repo, name)):  # the old version is unloaded now
                if old.isdigit() and int(old) < v:
                    shutil.rmtree(os.path.join(self.repo, name, old), ignore_errors=True)
            return {"total": total, "ack": t_ack, "client_write": t_write, "probes": probes}
        via, mode = method.split(":")
        model = f"wb{L}{mode}"
        wc = self.wc[model]
        out: dict[str, float] = {}
        if via == "shm-staged":
            t0 = now()
            v = self.push_staged(L, model)
        elif via == "file":
            from safetensors.numpy import save_file

            path = os.path.join(self.allowed, f"w{L}{mode}.safetensors")
            t0 = now()
            save_file(art.weights(self.next_set(L, mode)), path)
            out["client_write"] = now() - t0
            t0 = now()
            v = wc.push_file(path, via="file").version
        else:
            weights = art.weights(self.next_set(L, mode))
            t0 = now()
            v = wc.update(weights, via=via).version
        out["ack"] = now() - t0
        out["probes"] = wait_version(self.c, model, probe, v)
        out["total"] = now() - t0
        return out

    def p1(self, reps: int) -> dict:
        methods = ["memcpy", "reload"] + [f"{t}:{m}" for m in MODES for t in TRANSPORTS]
        for a in self.arts:
            self.stage_shm(a)
        raw: dict[str, dict[str, list[dict]]] = {a.label: {m: [] for m in methods} for a in self.arts}
        probe = {a.layers: np.random.default_rng(7).standard_normal((1, a.n)).astype(np.float32) for a in self.arts}
        # Warm every path once at the smallest size (connections, first-call costs), and each
        # model's update graph session with one push.
        for m in methods:
            self.measure(self.arts[0], m, probe[self.arts[0].layers], self._floor(self.arts[0]))
        for a in self.arts[1:]:
            for mode in MODES:
                self.measure(a, f"shm-staged:{mode}", probe[a.layers], None)
        for r in range(reps):
            for si, a in enumerate(self.arts):
                t0 = now()
                buf = self._floor(a)
                for m in rotate(methods, r + si):
                    quiesce(self.srv.pid)  # the previous push's background work (session build, staging) is done
                    raw[a.label][m].append(self.measure(a, m, probe[a.layers], buf))
                log(f"P1 round {r + 1}/{reps} {a.label}: {now() - t0:.1f} s")
                del buf
        summary = {}
        for a in self.arts:
            s = {}
            for m in methods:
                rows = raw[a.label][m]
                s[m] = {k: med([row[k] for row in rows]) * (1 if k == "probes" else 1e3) for k in rows[0] if k != "probes"}
                s[m]["probes_max"] = max(row.get("probes", 1) for row in rows)
            summary[a.label] = s
        return {"methods": methods, "raw_s": raw, "median_ms": summary, "bytes": {a.label: a.nbytes for a in self.arts}}

    def _floor(self, a: Artifact) -> tuple[np.ndarray, np.ndarray]:
        src = np.ones(a.nbytes // 4, np.float32)
        dst = np.empty_like(src)
        dst.fill(0.0)  # pre-faulted: writing touches every page (np.zeros could hand out lazy zero pages)
        return src, dst

    def stop_async(self) -> threading.Thread:
        """Release client-side things now; the server's shutdown (seconds) runs in a thread."""
        self._release_clients()
        return self.res.stop_server_async(self.srv)

    def _release_clients(self) -> None:
        for wc in self.wc.values():
            wc.close()
        for client, name, handle in list(self.res.regions):
            if client is self.c:
                import tritonclient.utils.shared_memory as shmu

                try:
                    client.unregister_system_shared_memory(name)
                finally:
                    shmu.destroy_shared_memory_region(handle)
                self.res.regions.remove((client, name, handle))
        self.c.close()


def p2_triton(res: Resources, art: Artifact, env: dict, x: np.ndarray, n_req: int, block: int) -> tuple[dict, TritonServer]:
    """A server of its own (4 models, 1 instance each): p50 of sequential requests, interleaved blocks."""
    import tritonclient.http as httpclient

    work = res.tempdir("wb-bench-p2-")
    repo = os.path.join(work, "repo")
    os.makedirs(repo)
    variants = {"wbT": MODES["T"], "wbF": MODES["F"]}
    for name, params in variants.items():
        add_wb_model(repo, name, art, 1, **params)
    add_plain_model(repo, "plain", art, 1)
    names = list(variants) + ["plain"]
    srv = res.start_server(repo, env, "p2")
    c = http_client(srv.http_url)
    try:
        inp = httpclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        outs = [httpclient.InferRequestedOutput("y")]
        ref = None
        for n in names:  # warm, and check every model gives the same answer
            for _ in range(5):
                y = c.infer(n, [inp], outputs=outs).as_numpy("y")
            ref = y if ref is None else ref
            np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
        quiesce(srv.pid)  # background (pre-packed) session builds are done
        lat: dict[str, list[float]] = {n: [] for n in names}
        for bi in range(max(1, n_req // block)):
            for n in rotate(names, bi):
                for _ in range(block):
                    t0 = now()
                    c.infer(n, [inp], outputs=outs)
                    lat[n].append(now() - t0)
        return ({"samples_s": lat, "p50_ms": {n: med(v) * 1e3 for n, v in lat.items()}, "p90_ms": {n: pct(v, 90) * 1e3 for n, v in lat.items()}}, srv)
    finally:
        c.close()


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


def p3(
    res: Resources,
    art: Artifact,
    env: dict,
    secret: str,
    x: np.ndarray,
    instance_counts: tuple[int, ...],
    parallel: bool,
    pending: threading.Thread | None = None,
    tiny: Artifact | None = None,
) -> dict:
    """One server per config.  Sequential (full mode): each server is measured alone, its
    shutdown overlapping the next start.  ``parallel`` (--quick): all at once, for speed;
    shared-library pages are then split between more processes, so PSS is a bit lower.
    ``tiny``: the same backend with tiny weights (prepack=F), x1 and x4, measures the
    per-instance process overhead, so weight copies per instance can be told apart from it."""
    kinds = ("wb prepack=T", "wb prepack=F", "plain baked") + (("overhead probe",) if tiny is not None else ())
    configs = [(kind, k) for kind in kinds for k in instance_counts]
    out: dict[str, dict] = {}

    def make(kind: str, k: int) -> str:
        repo = res.tempdir("wb-bench-p3-")
        r = os.path.join(repo, "repo")
        os.makedirs(r)
        if kind == "overhead probe":
            add_wb_model(r, "m", tiny, k, prepack="false")
        elif kind.startswith("wb"):
            add_wb_model(r, "m", art, k, **MODES["T" if kind.endswith("T") else "F"])
        else:
            add_plain_model(r, "m", art, k)
        return r

    def measure(kind: str, k: int, srv: TritonServer) -> None:
        if kind == "overhead probe":
            xt = np.ones((x.shape[0], tiny.n), np.float32)
            concurrent_infer(srv.http_url, "m", xt, threads=2 * k, per_thread=3)
            quiesce(srv.pid)
            time.sleep(0.3)
            out[f"{kind} x{k}"] = {"idle": tree_memory(srv.pid)}
            log(f"P3 {kind} x{k}: footprint {out[f'{kind} x{k}']['idle']['footprint'] / MiB:.0f} MiB")
            return
        concurrent_infer(srv.http_url, "m", x, threads=2 * k, per_thread=3)
        quiesce(srv.pid)
        time.sleep(0.3)
        row = {"idle": tree_memory(srv.pid)}
        if kind.startswith("wb"):
            with WeightClient(srv.http_url, "m", secret=secret) as wc:
                v = wc.update(art.B, via="shm").version
            seen = concurrent_infer(srv.http_url, "m", x, threads=2 * k, per_thread=3)
            quiesce(srv.pid)
            time.sleep(0.3)
            row["after_update"] = tree_memory(srv.pid)
            row["after_update"]["versions_seen"] = sorted(seen)
            if seen != {v}:
                raise RuntimeError(f"P3 {kind} x{k}: after update {v} the instances answered with versions {sorted(seen)}")
        out[f"{kind} x{k}"] = row
        log(f"P3 {kind} x{k}: footprint {row['idle']['footprint'] / MiB:.0f} MiB")

    stops: list[threading.Thread] = []
    try:
        if parallel:
            servers: dict[tuple[str, int], TritonServer] = {}

            def start(kind: str, k: int) -> None:
                servers[(kind, k)] = res.start_server(make(kind, k), env, f"p3-{kind[-1]}{k}")

            run_parallel([lambda c=c: start(*c) for c in configs])
            if pending is not None:
                pending.join()
            for kind, k in configs:
                measure(kind, k, servers[(kind, k)])
            stops = [res.stop_server_async(srv) for srv in servers.values()]
        else:
            for kind, k in configs:
                srv = res.start_server(make(kind, k), env, "p3")
                if pending is not None:  # the previous server's shutdown overlapped this start
                    pending.join()
                measure(kind, k, srv)
                pending = res.stop_server_async(srv)
    finally:
        for t in stops + ([pending] if pending is not None else []):
            t.join()
    return out


def p3_summary(p3r: dict, instance_counts: tuple[int, ...], wbytes: int) -> dict:
    """Weight copies resident, from footprints minus the overhead probe's (same backend, tiny weights):

    - per extra instance (x1 -> x4, idle): (growth - probe's growth) / weights;
    - resident at x4, idle: (footprint - probe's footprint) / weights, split into store (/dev/shm),
      file PSS (the bundle file's page cache: initial weights), anon (private copies) and regions;
    - after one update (x4): growth split into store, python-backend regions, anon.
    """
    lo, hi = instance_counts[0], instance_counts[-1]
    W = wbytes / MiB
    per: dict[str, dict] = {}
    for kind in ("wb prepack=T", "wb prepack=F", "plain baked", "overhead probe"):
        if f"{kind} x{hi}" not in p3r:
            continue
        a, b = p3r[f"{kind} x{lo}"]["idle"], p3r[f"{kind} x{hi}"]["idle"]
        per[kind] = {"footprint_mib": (b["footprint"] - a["footprint"]) / (hi - lo) / MiB, "anon_mib": (b["pss_anon"] - a["pss_anon"]) / (hi - lo) / MiB}
    probe = per.get("overhead probe")
    pb = p3r.get(f"overhead probe x{hi}", {}).get("idle")
    for kind, d in per.items():
        if kind == "overhead probe" or not probe:
            d["weight_copies_est"] = None
            continue
        d["weight_copies_est"] = (d["footprint_mib"] - probe["footprint_mib"]) / W
        i = p3r[f"{kind} x{hi}"]["idle"]
        d[f"resident_x{hi}"] = {
            "total_copies": (i["footprint"] - pb["footprint"]) / wbytes,
            "store_copies": (i["shm_store"] - pb["shm_store"]) / wbytes,
            "file_copies": (i["pss_file"] - pb["pss_file"]) / wbytes,
            "anon_copies": (i["pss_anon"] - pb["pss_anon"]) / wbytes,
            "regions_copies": (i["shm_regions"] - pb["shm_regions"]) / wbytes,
        }
    for kind in ("wb prepack=T", "wb prepack=F"):
        for k in (lo, hi):
            row = p3r[f"{kind} x{k}"]
            if "after_update" in row:
                i, u = row["idle"], row["after_update"]
                per[kind][f"update_growth_x{k}"] = {
                    "total_copies": (u["footprint"] - i["footprint"]) / wbytes,
                    "store_copies": (u["shm_store"] - i["shm_store"]) / wbytes,
                    "regions_copies": (u["shm_regions"] - i["shm_regions"]) / wbytes,
                    "anon_copies": (u["pss_anon"] - i["pss_anon"]) / wbytes,
                }
    return per


# --------------------------------------------------------------------------- P4
def p4_refs(art: Artifact, x: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Reference output per layer-0 scale state, per prepack mode, computed in-process with ORT."""
    refs = {}
    base = art.A["w0"]
    for m in MODES:
        with wb.Bundle.load_from_file(art.bundle_path, runtime_options(m)) as b:
            _PRIVATE_STORES.append(b.store.path)
            b.init()
            rs = []
            for s in P4_SCALES:
                b.update({"w0": base * np.float32(s)})
                rs.append(b.infer({"x": x})[0]["y"])
            refs[m] = rs
    # cross-check against plain ORT on the edited model, so the references are not self-referential
    y = zoo.ort_run(zoo.with_weights(art.model, {"w0": base * np.float32(P4_SCALES[2])}), {"x": x})["y"]
    np.testing.assert_allclose(refs["T"][2], y, rtol=1e-4, atol=1e-5)
    return refs


class P4Model:
    """State of one model under P4: which layer-0 scale each version number carries."""

    def __init__(self, url: str, model: str, secret: str, art: Artifact):
        self.url, self.model, self.secret = url, model, secret
        with WeightClient(url, model, secret=secret) as wc:
            self.version = wc.status(checksums=False)["version"]
        self.state_of = {self.version: 0}
        self.state = 0
        self.w0 = [art.A["w0"] * np.float32(s) for s in P4_SCALES]


def p4_phase(m: P4Model, x: np.ndarray, refs: list[np.ndarray], seconds: float, clients: int, period: float | None) -> dict:
    stop = threading.Event()
    lock = threading.Lock()
    lat: list[float] = []
    failed: list[str] = []
    torn: list[str] = []
    exact = [0]
    unknown = [0]
    upd_lat: list[float] = []
    upd_fail: list[str] = []
    scale = max(float(np.abs(r).max()) for r in refs)

    def reader() -> None:
        wc = WeightClient(m.url, m.model)
        mine, bad, ex, unk, fails = [], [], 0, 0, []
        try:
            while not stop.is_set():
                t0 = now()
                try:
                    out, v = wc.infer({"x": x})
                except Exception as e:  # noqa: BLE001 - every failure counts, with its reason
                    fails.append(repr(e)[:200])
                    continue
                mine.append(now() - t0)
                k = m.state_of.get(v)
                if k is None:
                    unk += 1
                    continue
                y = out["y"]
                if np.array_equal(y, refs[k]):
                    ex += 1
                elif not np.max(np.abs(y - refs[k])) <= 1e-4 * scale:
                    others = [j for j, r in enumerate(refs) if np.max(np.abs(y - r)) <= 1e-4 * scale]
                    bad.append(f"version {v} (state {k}) answered like state(s) {others}")
        finally:
            wc.close()
            with lock:
                lat.extend(mine)
                torn.extend(bad)
                failed.extend(fails)
                exact[0] += ex
                unknown[0] += unk

    def updater() -> None:
        wc = WeightClient(m.url, m.model, secret=m.secret)
        nxt = now()
        try:
            while not stop.is_set():
                delay = nxt - now()
                if delay > 0 and stop.wait(delay):
                    break
                k = (m.state + 1) % len(P4_SCALES)
                m.state_of[m.version + 1] = k  # before sending: a reader may see it before the ack
                t0 = now()
                try:
                    r = wc.update({"w0": m.w0[k]}, via="shm", expected_version=m.version)
                except Exception as e:  # noqa: BLE001
                    upd_fail.append(repr(e)[:200])
                else:
                    upd_lat.append(now() - t0)
                    m.version, m.state = r.version, k
                nxt = max(nxt + period, now())
        finally:
            wc.close()

    threads = [threading.Thread(target=reader, daemon=True) for _ in range(clients)]
    if period is not None:
        threads.append(threading.Thread(target=updater, daemon=True))
    t_start = now()
    for t in threads:
        t.start()
    try:
        stop.wait(seconds)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    wall = now() - t_start
    return {
        "lat_s": lat,
        "failed": failed,
        "torn": torn,
        "exact": exact[0],
        "unknown": unknown[0],
        "updates": len(upd_lat),
        "update_failed": upd_fail,
        "update_lat_s": upd_lat,
        "wall_s": wall,
    }


def p4(res: Resources, art: Artifact, env: dict, secret: str, x: np.ndarray, seconds: float, clients: int, period: float, instances: int) -> dict:
    refs = p4_refs(art, x)
    repo = res.tempdir("wb-bench-p4-")
    r = os.path.join(repo, "repo")
    os.makedirs(r)
    for m in MODES:
        add_wb_model(r, f"m{m}", art, instances, **MODES[m])
    srv = res.start_server(r, env, "p4")
    try:
        state = {m: P4Model(srv.http_url, f"m{m}", secret, art) for m in MODES}
        for m in MODES:
            concurrent_infer(srv.http_url, f"m{m}", x, threads=clients, per_thread=2)
        phases = [(m, upd) for m in MODES for upd in (False, True)]
        acc: dict[str, list[dict]] = {f"{m}:{'updates' if u else 'no updates'}": [] for m, u in phases}
        halves = 2
        for h in range(halves):
            for m, upd in rotate(phases, h):
                quiesce(srv.pid)
                ph = p4_phase(state[m], x, refs[m], seconds / halves, clients, period if upd else None)
                acc[f"{m}:{'updates' if upd else 'no updates'}"].append(ph)
                log(
                    f"P4 {MODE_LABEL[m]} {'updates' if upd else 'no updates'}: {len(ph['lat_s'])} responses, "
                    f"{ph['updates']} updates, {len(ph['failed'])} failed, {len(ph['torn'])} torn"
                )
                time.sleep(0.3)
        out = {}
        for key, parts in acc.items():
            lat = [v for p in parts for v in p["lat_s"]]
            upd = [v for p in parts for v in p["update_lat_s"]]
            wall = sum(p["wall_s"] for p in parts)
            out[key] = {
                "responses": len(lat),
                "throughput_rps": len(lat) / wall if wall else float("nan"),
                "p50_ms": pct(lat, 50) * 1e3,
                "p99_ms": pct(lat, 99) * 1e3,
                "max_ms": max(lat) * 1e3 if lat else float("nan"),
                "failed": sum(len(p["failed"]) for p in parts),
                "failed_examples": [e for p in parts for e in p["failed"]][:5],
                "torn": sum(len(p["torn"]) for p in parts),
                "torn_examples": [e for p in parts for e in p["torn"]][:5],
                "bitwise_equal": sum(p["exact"] for p in parts),
                "unknown_version": sum(p["unknown"] for p in parts),
                "updates": len(upd),
                "updates_per_s": len(upd) / wall if wall else 0.0,
                "update_failed": sum(len(p["update_failed"]) for p in parts),
                "update_failed_examples": [e for p in parts for e in p["update_failed"]][:5],
                "update_ack_p50_ms": pct(upd, 50) * 1e3,
                "update_ack_p99_ms": pct(upd, 99) * 1e3,
                "seconds": wall,
                "lat_s": lat,
            }
        return out
    finally:
        res.stop_server(srv)


# --------------------------------------------------------------------------- report
def check(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def markdown(R: dict) -> str:
    L: list[str] = []
    cfg, mach = R["config"], R["machine"]
    L.append(f"command: `{R['command']}` (cwd {R['cwd']})")
    L.append(
        f"machine: {mach['cpus']} CPUs ({mach['physical_cores']} physical, {mach['cpu_model']}), {mach['memory_gib']} GiB, "
        f"Triton server {mach['triton_server']}, onnxruntime {mach['onnxruntime']}, numpy {mach['numpy']}, "
        f"python {mach['python']}, {mach['platform']}; weightbundle at commit {mach.get('weightbundle_commit')}"
    )
    ld0, ld1 = R["load_before"], R["load_after"]
    L.append(
        f"other load: loadavg {ld0['loadavg']} before, {ld1['loadavg']} after; other tritonservers running: "
        f"{ld0['other_tritonservers']} before, {ld1['other_tritonservers']} after"
        + (f"; busy: {'; '.join(ld0['busy_processes'])}" if ld0["busy_processes"] else "")
    )
    L.append(
        f"model: big_mlp n={cfg['n']}, batch {cfg['batch']}, max_batch_size 0, ORT default threads; "
        f"{cfg['p1_reps']} P1 rounds; total {R['total_s']:.0f} s" + ("; **--quick: tiny sizes, figures are not meaningful**" if cfg["quick"] else "")
    )
    L.append("")
    # P1
    p1 = R["p1"]
    L.append("### P1: update latency, ms until the first response carries the new version (median)")
    L.append("")
    sizes = list(p1["median_ms"])

    L.append("| method | " + " | ".join(sizes) + " | vs memcpy floor (" + "/".join(sizes) + ") | Triton reload / this (" + "/".join(sizes) + ") |")
    L.append("|---|" + "---:|" * (len(sizes) + 2))
    names = {"memcpy": "memcpy floor (np.copyto, in-process)", "reload": "Triton reload (new version folder + load_model)"}
    for m in p1["methods"]:
        cells = [fmt(p1["median_ms"][s][m]["total"], ".1f") for s in sizes]
        vs_floor = "/".join(f"{p1['median_ms'][s][m]['total'] / p1['median_ms'][s]['memcpy']['total']:.1f}" for s in sizes)
        vs_reload = "/".join(f"{p1['median_ms'][s]['reload']['total'] / p1['median_ms'][s][m]['total']:.1f}" for s in sizes)
        label = names.get(m) or f"{m.split(':')[0]}, {MODE_LABEL[m.split(':')[1]]}"
        L.append(f"| {label} | " + " | ".join(cells) + f" | {vs_floor if m != 'memcpy' else '1'} | " + ("" if m in ("memcpy", "reload") else vs_reload) + " |")
    L.append("")
    L.append(
        "Parts (median ms, " + "/".join(sizes) + "): *ack* = the update call (or load_model) returning; "
        "*write* = the client writing the safetensors file (file) or the version folder (reload), not included above."
    )
    L.append("")
    L.append("| method | ack | write | probes to see the new version (max) |")
    L.append("|---|---:|---:|---:|")
    for m in p1["methods"]:
        if m == "memcpy":
            continue
        d = [p1["median_ms"][s][m] for s in sizes]
        ack = "/".join(fmt(x.get("ack"), ".0f") for x in d)
        wr = "/".join(fmt(x["client_write"], ".0f") for x in d) if "client_write" in d[0] else ""
        label = names.get(m) or f"{m.split(':')[0]}, {MODE_LABEL[m.split(':')[1]]}"
        L.append(f"| {label} | {ack} | {wr} | {max(x['probes_max'] for x in d)} |")
    L.append("")
    # P2
    L.append("### P2: steady-state inference (p50 ms, batch %d)" % cfg["batch"])
    L.append("")
    L.append("| where | variant | p50 ms | vs baked |")
    L.append("|---|---|---:|---:|")
    t = R["p2_triton"]["p50_ms"]
    base = next(v for k, v in t.items() if k.startswith("plain"))
    for k, v in t.items():
        label = {"wbT": f"weightbundle {MODE_LABEL['T']}", "wbF": f"weightbundle {MODE_LABEL['F']}"}.get(k, "plain python backend, ORT baked")
        L.append(f"| Triton | {label} | {v:.2f} | {v / base:.2f}x |")
    ip = R["p2_inprocess"]["p50_ms"]
    for k, v in ip.items():
        L.append(f"| in-process | {k} | {v:.2f} | {v / ip['ORT baked']:.2f}x |")
    L.append("")
    # P3
    L.append(f"### P3: memory of the tritonserver process tree ({R['p3_model']} of weights)")
    L.append("")
    L.append("| config | state | procs | RSS MiB | PSS MiB | anon MiB | /dev/shm store MiB | /dev/shm regions MiB (n) | footprint MiB |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for cname, row in R["p3"].items():
        for state, m in row.items():
            L.append(
                f"| {cname} | {state.replace('_', ' ')} | {m['processes']} | {m['rss'] / MiB:.0f} | {m['pss'] / MiB:.0f} | "
                f"{m['pss_anon'] / MiB:.0f} | {m['shm_store'] / MiB:.0f} | {m['shm_regions'] / MiB:.0f} ({m['shm_region_count']}) | "
                f"{m['footprint'] / MiB:.0f} |"
            )
    L.append("")
    ps = R["p3_summary"]
    lo, hi = cfg["p3_instances"][0], cfg["p3_instances"][-1]
    L.append(
        "footprint = anon + file PSS of the tree + this server's /dev/shm bytes, each tmpfs page counted once. "
        '"overhead probe" is the weightbundle backend with tiny weights (128x128, prepack=F): per-process overhead.'
    )
    L.append("")
    L.append(
        f"| config | per extra instance (x{lo} -> x{hi}): footprint MiB | anon MiB | weight copies per extra instance | "
        f"resident at x{hi}, idle, in weight copies = store + file + anon + regions | "
        f"after 1 update (x{hi}): growth = store + regions + anon |"
    )
    L.append("|---|---:|---:|---:|---|---|")
    for kind, d in ps.items():
        g = d.get(f"update_growth_x{hi}")
        gs = f"{g['total_copies']:.2f} = {g['store_copies']:.2f} + {g['regions_copies']:.2f} + {g['anon_copies']:.2f}" if g else ""
        r = d.get(f"resident_x{hi}")
        rs = f"{r['total_copies']:.2f} = {r['store_copies']:.2f} + {r['file_copies']:.2f} + {r['anon_copies']:.2f} + {r['regions_copies']:.2f}" if r else ""
        L.append(f"| {kind} | {d['footprint_mib']:.0f} | {d['anon_mib']:.0f} | {fmt(d['weight_copies_est'], '.2f')} | {rs} | {gs} |")
    if cfg["quick"]:
        L.append("")
        L.append("With --quick the weights are tiny: these figures are per-process overhead only.")
    L.append("")
    # P4
    L.append(
        f"### P4: {cfg['p4_clients']} clients, {cfg['p4_instances']} instances, {R['p4_model']} model, "
        f"update of one layer every {cfg['p4_period'] * 1e3:.0f} ms via shm ({cfg['p4_seconds']:.0f} s per condition, 2 interleaved halves)"
    )
    L.append("")
    L.append("| prepack | updates | responses | req/s | p50 ms | p99 ms | p99 vs no-update | failed | torn | updates applied (/s) | update ack p50/p99 ms |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in MODES:
        b = R["p4"][f"{m}:no updates"]
        for cond in ("no updates", "updates"):
            d = R["p4"][f"{m}:{cond}"]
            L.append(
                f"| {MODE_LABEL[m]} | {cond} | {d['responses']} | {d['throughput_rps']:.0f} | {d['p50_ms']:.1f} | {d['p99_ms']:.1f} | "
                f"{d['p99_ms'] / b['p99_ms']:.2f}x | {d['failed']} | {d['torn']} | "
                + (
                    f"{d['updates']} ({d['updates_per_s']:.1f}/s, {d['update_failed']} failed) | "
                    f"{fmt(d['update_ack_p50_ms'], '.0f')}/{fmt(d['update_ack_p99_ms'], '.0f')} |"
                    if cond == "updates"
                    else " | |"
                )
            )
    unverified = {k: d["unknown_version"] for k, d in R["p4"].items() if d["unknown_version"]}
    if unverified:
        L.append(f"responses with a version the updater never announced (not verifiable): {unverified}")
    L.append("")
    # targets
    L.append("### Targets (issue 5)")
    L.append("")
    L.append("| target | figure | met |")
    L.append("|---|---|---|")
    for row in R["targets"]:
        L.append(f"| {row['target']} | {row['figure']} | {check(row['met'])} |")
    return "\n".join(L) + "\n"


def targets(R: dict) -> list[dict]:
    out = []
    p1 = R["p1"]["median_ms"]
    mid = list(p1)[min(1, len(p1) - 1)]
    floor, reload = p1[mid]["memcpy"]["total"], p1[mid]["reload"]["total"]
    for m in R["p1"]["methods"]:
        if ":" not in m:
            continue
        tot = p1[mid][m]["total"]
        lab = f"{m.split(':')[0]}, {MODE_LABEL[m.split(':')[1]]}"
        out.append(
            {
                "target": f"{mid} update ({lab}) within 3x memcpy floor",
                "figure": f"{tot:.1f} ms = {tot / floor:.1f}x of {floor:.1f} ms",
                "met": tot <= 3 * floor,
            }
        )
        out.append(
            {
                "target": f"{mid} update ({lab}) >= 20x faster than Triton reload",
                "figure": f"{reload:.0f} / {tot:.1f} ms = {reload / tot:.1f}x",
                "met": reload / tot >= 20,
            }
        )
    t = R["p2_triton"]["p50_ms"]
    base = next(v for k, v in t.items() if k.startswith("plain"))
    for k, v in t.items():
        if k.startswith("wb"):
            out.append(
                {"target": f"Triton inference {k} within 1.05x of plain baked", "figure": f"{v:.2f} / {base:.2f} ms = {v / base:.2f}x", "met": v / base <= 1.05}
            )
    ip = R["p2_inprocess"]["p50_ms"]
    for k, v in ip.items():
        if k != "ORT baked":
            out.append({"target": f"in-process {k} within 1.05x of ORT baked", "figure": f"{v / ip['ORT baked']:.2f}x", "met": v / ip["ORT baked"] <= 1.05})
    hi = R["config"]["p3_instances"][-1]
    for k, d in R["p3_summary"].items():
        if not k.startswith("wb"):
            continue
        c = d["weight_copies_est"]
        r = d.get(f"resident_x{hi}")
        fig = f"{fmt(c, '.2f')} weight copies per extra instance"
        if r:
            fig += (
                f"; {r['total_copies']:.2f} copies resident at x{hi} (store {r['store_copies']:.2f}, bundle file page cache "
                f"{r['file_copies']:.2f}, anon {r['anon_copies']:.2f}, regions {r['regions_copies']:.2f})"
            )
        out.append(
            {
                "target": f"{k}: weights resident once with {hi} instances, plus at most one staging copy",
                "figure": fig,
                "met": None if c is None or r is None else bool(c < 0.5 and r["total_copies"] <= 2.1),
            }
        )
        g = d.get(f"update_growth_x{hi}")
        if g:
            extra = g["total_copies"] - g["store_copies"]
            out.append(
                {
                    "target": f"{k}: after an update (x{hi}), growth beyond the retained previous version <= 1 copy",
                    "figure": f"+{g['total_copies']:.2f} copies: store +{g['store_copies']:.2f} (history=1 keeps the previous "
                    f"version), backend regions +{g['regions_copies']:.2f}, anon +{g['anon_copies']:.2f}",
                    "met": None if R["config"]["quick"] else bool(extra <= 1.05),
                }
            )
    for m in MODES:
        b, u = R["p4"][f"{m}:no updates"], R["p4"][f"{m}:updates"]
        out.append(
            {
                "target": f"under load ({MODE_LABEL[m]}): 0 failed, 0 torn",
                "figure": f"{u['failed']} failed, {u['torn']} torn of {u['responses']}",
                "met": u["failed"] == 0 and u["torn"] == 0,
            }
        )
        out.append(
            {
                "target": f"under load ({MODE_LABEL[m]}): p99 within 2x of no-update p99",
                "figure": f"{u['p99_ms']:.0f} / {b['p99_ms']:.0f} ms = {u['p99_ms'] / b['p99_ms']:.2f}x",
                "met": u["p99_ms"] <= 2 * b["p99_ms"],
            }
        )
    return out


def plot(R: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: skipping the plot (pip install matplotlib)", stacklevel=2)
        return None
    p1 = R["p1"]
    sizes = list(p1["median_ms"])
    xs = [p1["bytes"][s] / MiB for s in sizes]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"memcpy": ("k", ":", "o"), "reload": ("tab:red", "-", "s")}
    colors = {"request": "tab:blue", "shm": "tab:green", "shm-staged": "tab:olive", "file": "tab:purple"}
    for m in p1["methods"]:
        ys = [p1["median_ms"][s][m]["total"] for s in sizes]
        if ":" in m:
            t, mode = m.split(":")
            ax.plot(xs, ys, color=colors[t], linestyle={"T": "-", "Tsync": "-.", "F": "--"}.get(mode, ":"), marker="o", label=f"{t}, {MODE_LABEL[mode]}")
        else:
            c, ls, mk = styles[m]
            ax.plot(xs, ys, color=c, linestyle=ls, marker=mk, label={"memcpy": "memcpy floor", "reload": "Triton reload"}[m])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels(sizes)
    ax.set_xlabel("weights pushed (full update)")
    ax.set_ylabel("ms until served (median)")
    ax.set_title(f"weightbundle update latency vs Triton reload ({R['machine']['cpus']} CPUs, Triton {R['machine']['triton_server']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def strip_samples(obj: Any) -> Any:
    """results.json keeps raw samples, rounded (seconds, 6 digits)."""
    if isinstance(obj, dict):
        return {k: strip_samples(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strip_samples(v) for v in obj]
    if isinstance(obj, float):
        return round(obj, 6) if np.isfinite(obj) else None
    if isinstance(obj, (np.floating, np.integer)):
        return strip_samples(obj.item())
    return obj


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few repetitions (< 60 s): for CI")
    ap.add_argument("--out", default=None, help="output folder (default tools/out; tools/out/quick with --quick)")
    ap.add_argument("--n", type=int, default=None, help="layer width (default 2048; 128 with --quick)")
    ap.add_argument("--layers", default=None, help="P1 layer counts, comma-separated (default 1,4,16 = 16/64/256 MiB; 1,4 with --quick)")
    ap.add_argument("--reps", type=int, default=None, help="P1 rounds (default 5; 2 with --quick)")
    ap.add_argument("--p4-seconds", type=float, default=None, help="P4 seconds per condition (default 15; 1 with --quick)")
    args = ap.parse_args(argv)

    q = args.quick
    cfg = {
        "quick": q,
        "n": args.n or (128 if q else 2048),
        "layers": [int(v) for v in (args.layers or ("1,4" if q else "1,4,16")).split(",")],
        "batch": 8 if q else 32,
        "p1_reps": args.reps or (2 if q else 5),
        "p2_requests": 40 if q else 300,
        "p2_block": 10 if q else 25,
        "p3_instances": (1, 4),
        "p4_seconds": args.p4_seconds or (1.0 if q else 15.0),
        "p4_clients": 8,
        "p4_period": 0.1,
        "p4_instances": 2,
    }
    mid_layers = 4 if 4 in cfg["layers"] else cfg["layers"][0]
    out_dir = Path(args.out or (ROOT / "tools" / "out" / ("quick" if q else ""))).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    print(f"command: {command}", flush=True)

    def on_term(signum, frame):  # SIGTERM cleans up like Ctrl-C
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() else None
    res = Resources()
    t_all = now()
    R: dict[str, Any] = {"command": command, "cwd": os.getcwd(), "config": cfg}
    try:
        R["load_before"] = other_load()
        work = res.tempdir("wb-bench-")
        secret = secrets.token_hex(16)
        env = dict(os.environ, **{SECRET_ENV: secret})
        log(f"building models {cfg['layers']} x ({cfg['n']}x{cfg['n']})")
        arts = [Artifact(cfg["n"], Lr, work) for Lr in cfg["layers"]]
        mid = next(a for a in arts if a.layers == mid_layers)
        x = np.random.default_rng(1).standard_normal((cfg["batch"], cfg["n"])).astype(np.float32)

        os.sync()  # ~1 GB just written: let writeback finish before anything is timed

        log("P2 in-process")
        R["p2_inprocess"] = p2_inprocess(mid, x, cfg["p2_requests"], cfg["p2_block"])
        log("P2 through Triton")
        R["p2_triton"], s2 = p2_triton(res, mid, env, x, cfg["p2_requests"], cfg["p2_block"])
        mc = http_client(s2.http_url)
        R["machine"] = machine(mc.get_server_metadata().get("version"))
        mc.close()
        s2_stop = res.stop_server_async(s2)

        s1 = P1Server(res, arts, env, secret)
        try:
            s2_stop.join()
            R["p1_server_start_s"] = s1.start_s
            log("P1 update latency")
            R["p1"] = s1.p1(cfg["p1_reps"])
        finally:
            s1_stop = s1.stop_async()

        log("P3 memory")
        R["p3_model"] = mid.label
        R["p3_weight_bytes"] = mid.nbytes
        tiny = None if q else Artifact(128, 4, work)
        R["p3"] = p3(res, mid, env, secret, x, cfg["p3_instances"], parallel=q, pending=s1_stop, tiny=tiny)
        R["p3_summary"] = p3_summary(R["p3"], cfg["p3_instances"], mid.nbytes)

        log("P4 under load")
        R["p4_model"] = mid.label
        R["p4"] = p4(res, mid, env, secret, x, cfg["p4_seconds"], cfg["p4_clients"], cfg["p4_period"], cfg["p4_instances"])
        R["load_after"] = other_load()
        R["total_s"] = now() - t_all
        R["targets"] = targets(R)
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
        res.close()
        return 130
    except BaseException:
        for s in list(res.servers):
            print(f"--- tail of {s.log_path}:\n{s.log_tail(30)}", file=sys.stderr)
        raise
    finally:
        res.close()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)

    R["leaks"] = res.leaks()
    md = markdown(R)
    md += (
        "\nleak check: nothing left (servers, temp repositories, stores, shm regions, files)\n"
        if not R["leaks"]
        else f"\n**leak check: left behind: {R['leaks']}**\n"
    )
    print(md)
    (out_dir / "results.md").write_text(md)
    with open(out_dir / "results.json", "w") as f:
        json.dump(strip_samples(R), f, indent=1)
    png = plot(R, str(out_dir / "update_latency.png"))
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}" + (f", {png}" if png else " (no plot: matplotlib missing)"))
    return 1 if R["leaks"] else 0


if __name__ == "__main__":
    sys.exit(main())
