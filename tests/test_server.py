"""The launcher (weightbundle.tritonserver, weightbundle serve) against the real tritonserver from the nvidia-pytriton wheel.

The server-starting tests use a tiny *stock* python-backend model ("double": OUTPUT0 =
INPUT0 * 2), so they depend only on server.py, not on the weightbundle backend.
Every wait is bounded and every server is stopped by a finalizer, even on failure.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from weightbundle import cli
from weightbundle.errors import TritonServerError
from weightbundle.tritonserver import process, shm, wheel

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

try:
    wheel.triton_paths()
    _TRITON_MISSING = None
except TritonServerError as e:  # pragma: no cover - depends on the environment
    _TRITON_MISSING = str(e)

needs_triton = pytest.mark.skipif(_TRITON_MISSING is not None, reason=f"tritonserver unavailable: {_TRITON_MISSING}")

START_TIMEOUT = 60

DOUBLE_CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 0
input [{{ name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] }}]
output [{{ name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] }}]
instance_group [{{ count: 1, kind: KIND_CPU }}]
"""

DOUBLE_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out = pb_utils.Tensor("OUTPUT0", (x * 2).astype(np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
"""

BROKEN_MODEL = """
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("deliberately broken model: initialize refuses")

    def execute(self, requests):
        return []
"""


def _write_model(repo, name: str, model_py: str) -> None:
    d = repo / name / "1"
    d.mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(DOUBLE_CONFIG.format(name=name))
    (d / "model.py").write_text(textwrap.dedent(model_py))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    r = tmp_path_factory.mktemp("repo")
    _write_model(r, "double", DOUBLE_MODEL)
    return r


@pytest.fixture(scope="module")
def broken_repo(tmp_path_factory):
    r = tmp_path_factory.mktemp("broken_repo")
    _write_model(r, "double", DOUBLE_MODEL)
    _write_model(r, "broken", BROKEN_MODEL)
    return r


@pytest.fixture(scope="module")
def backend_dir(tmp_path_factory):
    # One prepared backend dir shared by the module's servers (saves the copying).
    return wheel.prepare_backend_dir(str(tmp_path_factory.mktemp("backends")))


@pytest.fixture
def make_server(backend_dir, tmp_path):
    """Factory for TritonServer handles that are always stopped; prints their logs at teardown
    (pytest shows that output only for failing tests)."""
    servers = []

    def make(repository, **kw) -> process.TritonServer:
        kw.setdefault("backend_dir", backend_dir)
        kw.setdefault("log_file", str(tmp_path / f"tritonserver-{len(servers)}.log"))  # not littering /tmp
        srv = process.TritonServer(str(repository), **kw)
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        try:
            srv.stop(timeout=15)
        finally:
            print(f"---- {srv!r} log {srv.log_path}\n{srv.log_tail(60)}")


# ---------------------------------------------------------------------------- helpers


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :][:1] != b"Z"  # a zombie has exited already


def _children(pid: int):
    """Direct children of pid (the python_backend stubs of a tritonserver)."""
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rfind(b")") + 2 :].split()[1]) == pid:
                kids.append(int(d))
    return kids


def _mapped_regions(pids):
    """Python-backend shm regions mapped by the given processes (independent of server.py)."""
    names = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    if "/dev/shm/triton_" in line and "_backend_shm_region_" in line:
                        names.add(line[line.index("/dev/shm/") + len("/dev/shm/") :].split()[0])
        except OSError:
            pass
    return names


def _port_free(port: int) -> bool:
    # SO_REUSEADDR like a server would use: TIME_WAIT leftovers do not count, a listener does.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(1)
            return True
        except OSError:
            return False


def _wait_for(pred, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def _infer_http(url: str, x: np.ndarray, model: str = "double") -> np.ndarray:
    client = httpclient.InferenceServerClient(url, network_timeout=30, connection_timeout=10)
    try:
        inp = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer(model, [inp], outputs=[httpclient.InferRequestedOutput("OUTPUT0")]).as_numpy("OUTPUT0")
    finally:
        client.close()


def _infer_grpc(url: str, x: np.ndarray, model: str = "double") -> np.ndarray:
    client = grpcclient.InferenceServerClient(url)
    try:
        inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        res = client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("OUTPUT0")], client_timeout=30)
        return res.as_numpy("OUTPUT0")
    finally:
        client.close()


def _assert_gone(srv: process.TritonServer, pid: int, stub_pids, regions, ports) -> None:
    assert not _pid_alive(pid), f"tritonserver {pid} still alive"
    assert not [p for p in stub_pids if _pid_alive(p)], "python_backend stubs still alive"
    assert _wait_for(lambda: all(_port_free(p) for p in ports), 5), f"ports {ports} still taken"
    left = [r for r in regions if os.path.exists(os.path.join("/dev/shm", r))]
    assert not left, f"shm regions left behind: {left}"


# ---------------------------------------------------------------------------- no server needed


@needs_triton
def test_triton_paths_point_at_real_files():
    p = wheel.triton_paths()
    for f in (p.tritonserver, p.python_backend_lib, p.python_backend_utils, p.python_backend_stub):
        assert os.path.isfile(f), f
    assert os.access(p.tritonserver, os.X_OK)
    assert p.python_backend_stub.endswith(f"{sys.version_info.major}.{sys.version_info.minor}/triton_python_backend_stub")
    assert os.path.isdir(p.libs_dir)


def test_triton_paths_missing_wheel_gives_install_hint(monkeypatch):
    monkeypatch.setattr(wheel, "_site_dirs", lambda: [])
    with pytest.raises(TritonServerError, match="pip install --no-deps nvidia-pytriton==0.7.0"):
        wheel.triton_paths()


@needs_triton
def test_triton_paths_no_stub_for_this_python(monkeypatch):
    monkeypatch.setattr(wheel, "_python_version", lambda: "3.99")
    with pytest.raises(TritonServerError, match=r"no python_backend stub for Python 3\.99.*pip install"):
        wheel.triton_paths()


@needs_triton
def test_prepare_backend_dir_is_idempotent(tmp_path):
    import weightbundle

    dest = tmp_path / "be"
    assert wheel.prepare_backend_dir(str(dest)) == str(dest)
    stub = dest / "python" / "triton_python_backend_stub"
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        assert (dest / "python" / name).is_file()
    assert os.access(stub, os.X_OK)
    mtime = stub.stat().st_mtime_ns
    wheel.prepare_backend_dir(str(dest))
    assert stub.stat().st_mtime_ns == mtime  # unchanged files are not rewritten
    pkg_model = os.path.join(os.path.dirname(weightbundle.__file__), "triton", "model.py")
    assert (dest / "weightbundle" / "model.py").is_file() == os.path.isfile(pkg_model)


@needs_triton
def test_server_env_orders_paths():
    import sysconfig

    env = wheel.server_env({"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/x", "KEEP": "1"})
    ld = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert ld[:3] == [wheel.triton_paths().libs_dir, sysconfig.get_config_var("LIBDIR"), "/opt/x"]
    assert env["PATH"].split(os.pathsep) == [os.path.dirname(sys.executable), "/usr/bin"]
    assert env["KEEP"] == "1"
    assert "LD_LIBRARY_PATH" in wheel.server_env({})


def test_free_port_is_bindable():
    port = process.free_port()
    assert 0 < port < 65536 and _port_free(port)


def test_bad_arguments_rejected():
    with pytest.raises(ValueError):
        process.TritonServer("r", model_control_mode="sometimes")
    with pytest.raises(ValueError):
        process.TritonServer("r", backend_config=["shm-default-byte-size"])
    with pytest.raises(ValueError):
        process.TritonServer("r", load_models=["m"])  # needs explicit mode


def test_serve_arguments():
    import argparse

    args = cli.add_serve_arguments(argparse.ArgumentParser()).parse_args(
        [
            "repo",
            "--http-port",
            "1",
            "--load-model",
            "a",
            "--load-model",
            "b",
            "--model-control-mode",
            "explicit",
            "--backend-config",
            "python,shm-default-byte-size=1",
        ]
    )
    assert (args.repository, args.http_port, args.grpc_port, args.metrics_port) == ("repo", 1, 8001, 8002)
    assert args.load_model == ["a", "b"] and args.backend_config == ["python,shm-default-byte-size=1"]
    assert cli.add_serve_arguments(argparse.ArgumentParser()).parse_args([]).repository == "model_repository"


# ---------------------------------------------------------------------------- real server


@pytest.mark.e2e
@needs_triton
def test_start_infer_stop(make_server, repo):
    srv = make_server(repo)
    t0 = time.monotonic()
    srv.start(timeout=START_TIMEOUT)
    print(f"start took {time.monotonic() - t0:.2f} s")
    pid, stubs = srv.pid, _children(srv.pid)
    assert stubs, "no python_backend stub process"
    regions = _mapped_regions([pid] + stubs)
    assert regions, "the stub should have a shm region"
    ports = [srv.http_port, srv.grpc_port, srv.metrics_port]
    assert len(set(ports)) == 3 and srv.http_url == f"127.0.0.1:{srv.http_port}"

    client = httpclient.InferenceServerClient(srv.http_url)
    try:
        assert client.is_server_ready() and client.is_model_ready("double")
    finally:
        client.close()
    x = np.arange(-3, 5, dtype=np.float32)
    np.testing.assert_array_equal(_infer_http(srv.http_url, x), x * 2)
    np.testing.assert_array_equal(_infer_grpc(srv.grpc_url, x), x * 2)
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(srv.metrics_url, timeout=10) as resp:
        assert b"nv_inference_request_success" in resp.read()

    t0 = time.monotonic()
    assert srv.stop() == 0
    print(f"stop took {time.monotonic() - t0:.2f} s")
    assert srv.returncode == 0 and not srv.is_running()
    _assert_gone(srv, pid, stubs, regions, ports)
    assert srv.stop() == 0  # idempotent


@pytest.mark.e2e
@needs_triton
def test_context_manager_and_own_backend_dir(repo, tmp_path):
    # backend_dir=None: a temporary one is prepared and removed again.
    with process.TritonServer(str(repo), log_file=str(tmp_path / "triton.log")) as srv:
        bdir = srv.backend_dir
        assert os.path.isfile(os.path.join(bdir, "python", "triton_python_backend_stub"))
        np.testing.assert_array_equal(_infer_http(srv.http_url, np.ones(3, np.float32)), np.full(3, 2, np.float32))
        pid = srv.pid
    assert not _pid_alive(pid) and not os.path.exists(bdir)


@pytest.mark.e2e
@needs_triton
def test_kill_then_cleanup(make_server, repo):
    srv = make_server(repo).start(timeout=START_TIMEOUT)
    pid, stubs = srv.pid, _children(srv.pid)
    regions = _mapped_regions([pid] + stubs)
    ports = [srv.http_port, srv.grpc_port, srv.metrics_port]
    srv.kill()
    assert srv.returncode == -signal.SIGKILL
    t0 = time.monotonic()
    srv.stop()  # the cleanup path: waits for the orphaned stubs, removes our leftovers
    print(f"cleanup after SIGKILL took {time.monotonic() - t0:.2f} s")
    _assert_gone(srv, pid, stubs, regions, ports)
    assert not shm._group_pids(pid)


@pytest.mark.e2e
@needs_triton
def test_whole_group_sigkilled_leftovers_removed_others_kept(make_server, repo):
    # SIGKILL of server *and* stubs (e.g. the OOM killer): nobody unlinks the regions,
    # so stop() must. A region created meanwhile by someone else must survive.
    srv = make_server(repo).start(timeout=START_TIMEOUT)
    pid, stubs = srv.pid, _children(srv.pid)
    regions = _mapped_regions([pid] + stubs)
    foreign = os.path.join("/dev/shm", f"triton_python_backend_shm_region_not-ours-{os.getpid()}-{time.time_ns()}")
    try:
        with open(foreign, "wb") as f:
            f.write(b"x")
        os.killpg(pid, signal.SIGKILL)
        assert _wait_for(lambda: not any(_pid_alive(p) for p in [pid] + stubs), 10)
        assert all(os.path.exists(os.path.join("/dev/shm", r)) for r in regions), "expected leftovers"
        srv.stop()
        _assert_gone(srv, pid, stubs, regions, [srv.http_port, srv.grpc_port, srv.metrics_port])
        assert os.path.exists(foreign), "removed a region this server did not create"
    finally:
        if os.path.exists(foreign):
            os.unlink(foreign)


@pytest.mark.e2e
@needs_triton
def test_broken_model_load_error_server_stays_up(make_server, broken_repo):
    srv = make_server(broken_repo, model_control_mode="explicit", load_models=["double"]).start(timeout=START_TIMEOUT)
    for client in (httpclient.InferenceServerClient(srv.http_url), grpcclient.InferenceServerClient(srv.grpc_url)):
        try:
            with pytest.raises(InferenceServerException, match="deliberately broken model: initialize refuses"):
                client.load_model("broken")
            # Live, but with strict readiness (Triton's default) /v2/health/ready turns
            # false while a model is in a failed state, so check liveness only.
            assert client.is_server_live()
            assert not client.is_model_ready("broken")
            assert client.is_model_ready("double")
        finally:
            client.close()
    x = np.array([1.5, -2.0], np.float32)
    np.testing.assert_array_equal(_infer_grpc(srv.grpc_url, x), x * 2)
    assert srv.stop() == 0


@pytest.mark.e2e
@needs_triton
def test_start_failure_reports_log_and_leaves_nothing(make_server, broken_repo):
    # Mode "none" loads everything; a failing model makes tritonserver exit at startup.
    srv = make_server(broken_repo)
    with pytest.raises(TritonServerError, match="deliberately broken model") as err:
        srv.start(timeout=START_TIMEOUT)
    assert "exited with status" in str(err.value) and "errors:" in str(err.value)
    assert srv.pid is not None and not _pid_alive(srv.pid) and not shm._group_pids(srv.pid)


@pytest.mark.e2e
@needs_triton
def test_busy_port_is_an_error(make_server, repo):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        srv = make_server(repo, http_port=s.getsockname()[1])
        with pytest.raises(TritonServerError, match="exited with status"):
            srv.start(timeout=START_TIMEOUT)
    assert not _pid_alive(srv.pid)


@pytest.mark.e2e
@needs_triton
def test_auto_port_taken_meanwhile_is_retried(make_server, repo, monkeypatch):
    real = process._free_ports
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        busy = s.getsockname()[1]
        calls = []

        def first_pick_is_busy(n):
            calls.append(n)
            ports = real(n)
            return [busy] + ports[1:] if len(calls) == 1 else ports

        monkeypatch.setattr(process, "_free_ports", first_pick_is_busy)
        srv = make_server(repo).start(timeout=START_TIMEOUT)
        assert len(calls) == 2 and srv.http_port != busy
        np.testing.assert_array_equal(_infer_http(srv.http_url, np.ones(2, np.float32)), np.full(2, 2, np.float32))
    assert srv.stop() == 0


PYTHON_BASED_BACKEND = """
import os
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        # A python-based backend's version folder holds only the artifact.
        with open(os.path.join(args["model_repository"], args["model_version"], "factor.txt")) as f:
            self.factor = np.float32(f.read())
        assert __name__ == "model", __name__  # the stub imports <backend-dir>/<name>/model.py as "model"

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy() * self.factor)]) for r in requests]
"""


@pytest.mark.e2e
@needs_triton
def test_python_based_backend_and_its_shm_cleanup(make_server, tmp_path):
    be = wheel.prepare_backend_dir(str(tmp_path / "be"))
    os.makedirs(os.path.join(be, "doubler"))
    with open(os.path.join(be, "doubler", "model.py"), "w") as f:
        f.write(PYTHON_BASED_BACKEND)
    repo = tmp_path / "repo"
    (repo / "tripled" / "1").mkdir(parents=True)
    (repo / "tripled" / "config.pbtxt").write_text(DOUBLE_CONFIG.format(name="tripled").replace('backend: "python"', 'backend: "doubler"'))
    (repo / "tripled" / "1" / "factor.txt").write_text("3")

    srv = make_server(repo, backend_dir=be).start(timeout=START_TIMEOUT)
    x = np.array([1.0, -2.0], np.float32)
    np.testing.assert_array_equal(_infer_http(srv.http_url, x, "tripled"), x * 3)
    pid, stubs = srv.pid, _children(srv.pid)
    regions = _mapped_regions([pid] + stubs)
    # Not "triton_python_backend_shm_region_": the backend's name replaces "python".
    assert regions and all(r.startswith("triton_doubler_backend_shm_region_") for r in regions), regions
    srv.kill()
    srv.stop()
    _assert_gone(srv, pid, stubs, regions, [srv.http_port, srv.grpc_port, srv.metrics_port])


def _run_python(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _read_until(proc: subprocess.Popen, marker: str, timeout: float) -> str:
    """Lines of proc's stdout up to the one containing marker (bounded by a watchdog kill)."""
    import threading

    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if marker in line:
                return "".join(seen)
    finally:
        timer.cancel()
    raise AssertionError(f"{marker!r} not seen in {timeout} s:\n{''.join(seen)}")


@pytest.mark.e2e
@needs_triton
@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_safety_net_when_owner_dies(repo, how, tmp_path):
    # "exit": the handle is never stopped, atexit must stop it. "sigkill": no Python
    # cleanup at all, the parent-death signal must make tritonserver shut down.
    proc = _run_python(f"""
        import sys, time
        from weightbundle.tritonserver import TritonServer
        # Own log and backend dir under tmp_path: a SIGKILLed owner cannot remove temp ones.
        srv = TritonServer({str(repo)!r}, log_file={str(tmp_path / "triton.log")!r},
                           backend_dir={str(tmp_path / "be")!r}).start(timeout={START_TIMEOUT})
        print("PID", srv.pid, flush=True)
        if {how!r} == "sigkill":
            time.sleep(120)
    """)
    try:
        out = _read_until(proc, "PID", START_TIMEOUT + 10)
        pid = int(out.split("PID")[1].split()[0])
        stubs = _children(pid)
        if how == "sigkill":
            proc.kill()
        proc.wait(30)
        assert _wait_for(lambda: not _pid_alive(pid), 30), "tritonserver outlived its owner"
        assert _wait_for(lambda: not any(_pid_alive(p) for p in stubs), 15), "stubs outlived tritonserver"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if "pid" in locals() and _pid_alive(pid):
            os.killpg(pid, signal.SIGKILL)


@pytest.mark.e2e
@needs_triton
def test_serve_foreground_sigint(repo, tmp_path):
    http, grpc, metrics = (process.free_port() for _ in range(3))
    proc = _run_python(f"""
        import sys
        from weightbundle.cli import serve
        sys.exit(serve({str(repo)!r}, http_port={http}, grpc_port={grpc}, metrics_port={metrics},
                       log_file={str(tmp_path / "triton.log")!r}))
    """)
    try:
        out = _read_until(proc, "Press Ctrl-C", START_TIMEOUT + 10)
        assert f"http://127.0.0.1:{http}" in out and f"127.0.0.1:{grpc}" in out
        assert f"http://127.0.0.1:{metrics}/metrics" in out and "log" in out
        pid = int(out.split("(pid ")[1].split(")")[0])
        x = np.array([3.0], np.float32)
        np.testing.assert_array_equal(_infer_http(f"127.0.0.1:{http}", x), x * 2)
        regions = _mapped_regions([pid] + _children(pid))
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=40)
        assert proc.returncode == 0, out + rest
        assert "tritonserver stopped" in rest
        assert not _pid_alive(pid)
        assert not [r for r in regions if os.path.exists(os.path.join("/dev/shm", r))]
        assert _wait_for(lambda: all(_port_free(p) for p in (http, grpc, metrics)), 5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
