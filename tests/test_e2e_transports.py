"""Weight pushes over each transport against a real tritonserver, plus the push CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from weightbundle import zoo
from triton_util import SECRET, make_repo, running
from weightbundle.client import CommandError, WeightClient

pytestmark = pytest.mark.e2e
MODEL = zoo.mlp(sizes=(16, 64, 64, 8))
ORIG = zoo.initializers(MODEL)
X = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
BIG = zoo.big_mlp(n=512, layers=3)  # 1 MiB per weight: file pushes go straight into the staging blob


def _shm_files(pid: int | None = None) -> set[str]:
    """The shm regions a WeightClient in process ``pid`` (default: this one) can create: the
    client names them ``wbpush-<pid>-<random>``. Other processes' files (test runs in parallel,
    a server, a benchmark) are not ours to count."""
    prefix = f"wbpush-{os.getpid() if pid is None else pid}-"
    return {f for f in os.listdir("/dev/shm") if f.startswith(prefix)}


def _run_cli(cmd: list[str], secret: str) -> tuple[subprocess.CompletedProcess, int]:
    """Run the CLI; also return its pid, the one its shm region names carry."""
    with subprocess.Popen(cmd, env=dict(os.environ, WEIGHTBUNDLE_SECRET=secret), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), proc.pid


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("t")
    allowed = root / "allowed"
    allowed.mkdir()
    outside = root / "outside"
    outside.mkdir()
    repo = str(root / "repo")
    make_repo(repo, "m", MODEL, max_batch_size=4, file_update_dirs=str(allowed))
    make_repo(repo, "m0", MODEL, max_batch_size=0, file_update_dirs=str(allowed))
    make_repo(repo, "big", BIG, max_batch_size=0, file_update_dirs=str(allowed))
    with running(repo) as srv:
        yield srv, allowed, outside


@pytest.fixture(params=["m", "m0"])
def client(env, request):
    srv, _, _ = env
    with WeightClient(srv.http_url, request.param, secret=SECRET) as c:
        c.reset()
        yield c


def rand(name: str, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(ORIG[name].shape).astype(np.float32)


def check_serving(c: WeightClient, weights: dict[str, np.ndarray]) -> int:
    out, v = c.infer({"x": X})
    np.testing.assert_allclose(out["y"], zoo.ort_run(zoo.with_weights(MODEL, weights), {"x": X})["y"], rtol=1e-5, atol=1e-6)
    return v


@pytest.mark.parametrize("via", ["request", "shm"])
def test_tensor_transports_update_and_keep_the_rest(client, via):
    before = client.status()
    new = {"fc1.weight": rand("fc1.weight", 1)}
    shm_before = _shm_files()
    r = client.update(new, via=via)
    assert r.version == before["version"] + 1 and r.via == via and r.bytes == new["fc1.weight"].nbytes
    after = client.status()
    assert {k: v for k, v in after["checksums"].items() if k != "fc1.weight"} == {k: v for k, v in before["checksums"].items() if k != "fc1.weight"}
    assert check_serving(client, new) == r.version
    new2 = {"fc1.weight": rand("fc1.weight", 2)}
    client.update(new2, via=via)  # a second push reuses the client's region
    assert check_serving(client, new2) == r.version + 1
    assert len(_shm_files() - shm_before) == (1 if via == "shm" else 0)
    client.close()  # the region goes with the client
    assert _shm_files() == shm_before


def test_shm_region_is_dropped_when_the_server_refuses(env):
    srv, _, _ = env
    shm_before = _shm_files()
    with WeightClient(srv.http_url, "m", secret="wrong") as c:
        with pytest.raises(CommandError, match="secret"):
            c.update({"fc1.weight": rand("fc1.weight", 1)}, via="shm")
        assert _shm_files() == shm_before
    assert _shm_files() == shm_before


def test_file_transport_with_only(client, env):
    _, allowed, _ = env
    path = allowed / f"w-{client.model}.safetensors"
    full = {n: rand(n, 5) for n in ("fc0.weight", "fc2.bias")}
    save_file(full, str(path))
    before = client.status()["checksums"]
    r = client.push_file(str(path), via="file", only=["fc2.bias"])
    assert r.via == "file" and r.bytes == full["fc2.bias"].nbytes
    after = client.status()["checksums"]
    assert after["fc0.weight"] == before["fc0.weight"] and after["fc2.bias"] != before["fc2.bias"]
    check_serving(client, {"fc2.bias": full["fc2.bias"]})
    r = client.push_file(str(path), via="file")
    check_serving(client, full)


@pytest.mark.parametrize("via", ["file", "shm"])
def test_large_pushes_serve_exactly_and_a_bad_one_changes_nothing(env, via):
    """Once a staging blob is ready, the server preads a file or a client's shm region of plain
    weights straight into it (no update graph); the answers and checksums must be what the
    weights say.  An shm push registers nothing with Triton: the server reads the region."""
    srv, allowed, _ = env
    x = np.random.default_rng(3).standard_normal((2, 512)).astype(np.float32)
    with WeightClient(srv.http_url, "big", secret=SECRET) as c:
        v0 = c.reset()["version"]
        weights: dict[str, np.ndarray] = {}
        for step in range(3):
            new = {n: (np.random.default_rng(10 + step).standard_normal((512, 512)) / 20).astype(np.float32) for n in ("w0", "w2")}
            if via == "file":
                path = allowed / f"big-{step}.safetensors"
                save_file(new, str(path))
                r = c.push_file(str(path), via="file")
            else:
                r = c.update(new, via="shm")
                assert not c._c.get_system_shared_memory_status()  # nothing registered with Triton
            assert r.version == v0 + step + 1
            weights.update(new)
            out, v = c.infer({"x": x})
            want = zoo.ort_run(zoo.with_weights(BIG, weights), {"x": x})["y"]
            assert v == v0 + step + 1
            np.testing.assert_allclose(out["y"], want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
            time.sleep(0.5)  # the next staging blob is prepared in the background
        before = c.status()
        if via == "file":
            path = allowed / "big-bad.safetensors"
            save_file({"w0": np.ones((512, 512), np.float32), "w1": np.ones((512, 512), np.float32)}, str(path))
            raw = path.read_bytes()
            path.write_bytes(raw[: len(raw) - 4096])  # the last tensor's data is cut short
            with pytest.raises(CommandError):
                c.push_file(str(path), via="file")
        else:  # w0 fine, w1 the wrong shape: all or nothing
            with pytest.raises(CommandError, match="shape"):
                c.update({"w0": np.ones((512, 512), np.float32), "w1": np.ones((512, 511), np.float32)}, via="shm")
        after = c.status()
        assert after["version"] == before["version"] and after["checksums"] == before["checksums"]
        out, _ = c.infer({"x": x})
        np.testing.assert_allclose(out["y"], zoo.ort_run(zoo.with_weights(BIG, weights), {"x": x})["y"], rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


@pytest.mark.parametrize("via", ["request", "shm"])
def test_push_file_through_tensor_transports(client, env, via, tmp_path):
    path = tmp_path / "w.safetensors"
    full = {"fc0.weight": rand("fc0.weight", 9), "fc1.bias": rand("fc1.bias", 9)}
    save_file(full, str(path))
    client.push_file(str(path), via=via, only=["fc1.bias"])
    check_serving(client, {"fc1.bias": full["fc1.bias"]})


def _escapes(allowed, outside):
    secret_file = outside / "w.safetensors"
    save_file({"fc2.bias": np.ones(8, np.float32)}, str(secret_file))
    link = allowed / "link.safetensors"
    if not link.exists():
        link.symlink_to(secret_file)
    dirlink = allowed / "sub"
    if not dirlink.exists():
        dirlink.symlink_to(outside, target_is_directory=True)
    return {
        "dotdot": (str(allowed / ".." / "outside" / "w.safetensors"), ".."),
        "absolute_outside": (str(secret_file), "outside the allowed"),
        "symlink_file": (str(link), "outside the allowed"),
        "symlink_dir": (str(dirlink / "w.safetensors"), "outside the allowed"),
        "relative": ("w.safetensors", "absolute"),
        "missing": (str(allowed / "nope.safetensors"), "does not exist"),
    }


@pytest.mark.parametrize("case", ["dotdot", "absolute_outside", "symlink_file", "symlink_dir", "relative", "missing"])
def test_path_escapes_are_rejected_and_nothing_changes(client, env, case):
    _, allowed, outside = env
    path, needle = _escapes(allowed, outside)[case]
    before = client.status()
    with pytest.raises(CommandError, match=needle):
        client._send([client._control("update", source={"file": path})])
    after = client.status()
    assert after["version"] == before["version"] and after["checksums"] == before["checksums"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bad_header", "wrong_shape", "unknown_name"])
def test_corrupt_or_wrong_safetensors_rejected(client, env, damage):
    _, allowed, _ = env
    path = allowed / f"bad-{damage}-{client.model}.safetensors"
    good = {"fc2.bias": np.ones(8, np.float32), "fc0.weight": rand("fc0.weight", 3)}
    save_file(good, str(path))
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) - 100])
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(raw)))
    elif damage == "bad_header":
        path.write_bytes(raw[:8] + b"{" * 10 + raw[18:])
    elif damage == "wrong_shape":
        save_file({"fc2.bias": np.ones(9, np.float32)}, str(path))
    elif damage == "unknown_name":
        save_file({"fc9.bias": np.ones(8, np.float32)}, str(path))
    before = client.status()
    with pytest.raises(CommandError):
        client.push_file(str(path), via="file")
    after = client.status()
    assert after["version"] == before["version"] and after["checksums"] == before["checksums"]
    check_serving(client, {})


def test_push_cli_prints_summary_and_cleans_shm(env, tmp_path):
    srv, _, _ = env
    path = tmp_path / "w.safetensors"
    w = rand("fc1.weight", 4)
    save_file({"fc1.weight": w}, str(path))
    cmd = [sys.executable, "-m", "weightbundle.cli", "push", srv.http_url, "m", str(path), "--via", "shm"]
    p, pid = _run_cli(cmd, SECRET)
    assert p.returncode == 0, p.stderr
    assert "weights version" in p.stdout and "MiB via shm" in p.stdout and "GiB/s" in p.stdout
    assert _shm_files(pid) == set(), "the CLI left its shm region behind"
    p, pid = _run_cli(cmd, "wrong")
    assert p.returncode == 1 and "secret" in p.stderr
    assert _shm_files(pid) == set(), "the CLI left its shm region behind after a refusal"
    with WeightClient(srv.http_url, "m", secret=SECRET) as c:
        check_serving(c, {"fc1.weight": w})
