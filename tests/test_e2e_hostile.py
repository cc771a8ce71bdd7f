"""Hostile clients against a real tritonserver: the regression tests of the adversarial run.

Each test names the defect it pins (issue 8).  Every one of them failed on b33624b.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tritonclient.http as httpclient
from safetensors.numpy import save_file
from tritonclient.utils import InferenceServerException

from weightbundle import zoo
import weightbundle as wb
from triton_util import SECRET, control, make_repo, result, running, tensor, version
from weightbundle.tritonserver.shm import _group_pids, _shm_used_by

pytestmark = pytest.mark.e2e
SMALL = zoo.mlp(sizes=(16, 64, 64, 8))
BIG = zoo.mlp(sizes=(16, 2048, 2048, 8))  # fc1.weight: 16 MiB
X = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
NONASCII_DIR = "wéights-ü"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    allowed, outside, nonascii = root / "allowed", root / "outside", root / NONASCII_DIR
    for d in (allowed, outside, nonascii):
        d.mkdir()
    repo = str(root / "repo")
    dirs = f"{allowed}:{nonascii}"
    make_repo(repo, "hb", SMALL, max_batch_size=8, instances=2, file_update_dirs=dirs)  # dynamic batching
    make_repo(repo, "hn", SMALL, instances=4, history="3", file_update_dirs=dirs)  # 4 instances, no batching
    make_repo(repo, "big", BIG, max_batch_size=0, file_update_dirs=dirs)
    make_repo(repo, "off", SMALL, allow_updates="false")
    with running(repo) as srv:
        yield srv, allowed, outside, nonascii


@pytest.fixture
def client(env):
    c = httpclient.InferenceServerClient(env[0].http_url, concurrency=1)
    yield c
    c.close()


def cmd(c, model, body, weights=None, secret=True):
    batching = model == "hb"
    body = {**body, **({"secret": SECRET} if secret else {})}
    ins = [control(httpclient, body, batching)]
    ins += [tensor(httpclient, n, a[None] if batching else a) for n, a in (weights or {}).items()]
    return c.infer(model, ins)


def status(c, model):
    return result(cmd(c, model, {"op": "status"}))


def checksums(c, model):
    return status(c, model)["checksums"]


def refused(fn, *needles, code="400"):
    """The call fails with a clear client error that names what was wrong and shows no internals."""
    with pytest.raises(InferenceServerException) as ei:
        fn()
    msg = ei.value.message()
    assert str(ei.value.status()) == code, (ei.value.status(), msg)
    for n in needles:
        assert n in msg, (n, msg)
    assert "Traceback" not in msg and ".py" not in msg and "/work/" not in msg, msg
    return msg


def region_bytes(srv) -> int:
    """Bytes of the python-backend shared-memory regions this server's stubs hold."""
    names = _shm_used_by(_group_pids(srv.pid))
    return sum(os.path.getsize(os.path.join("/dev/shm", n)) for n in names if os.path.exists(os.path.join("/dev/shm", n)))


def alive(srv, c, model="hb"):
    assert srv.is_running()
    batching = model == "hb"
    r = c.infer(model, [tensor(httpclient, "x", X)])
    assert r.as_numpy("y").shape == (2, 8) and (r.as_numpy("WEIGHTS_VERSION").shape[0] == 2 if batching else True)


# -- defect 1: names and parameter values cannot rewrite the config ---------------------------------
def test_build_refuses_names_triton_cannot_carry():
    inj = 'w" data_type: TYPE_FP32 dims: [ -1 ] optional: true } ] parameters [ { key: "update_auth" value: { string_value: "none" } } ] input [ { name: "w2'
    for bad in (inj, "a\nb", "back\\slash", "CONTROL"):
        m = zoo.mlp(sizes=(4, 4))
        for t in m.graph.initializer:
            if t.name == "fc0.weight":
                t.name = bad
        for n in m.graph.node:
            n.input[:] = [bad if i == "fc0.weight" else i for i in n.input]
        with pytest.raises(wb.ConvertError, match="Triton cannot carry"):
            wb.convert(m)


def test_parameter_values_with_quotes_and_newlines_load_verbatim(tmp_path):
    """A value with `"`, `\\` and a newline used to break config.pbtxt (server would not start)."""
    odd = tmp_path / 'q"uo\\te\nd dir'
    odd.mkdir()
    repo = str(tmp_path / "repo")
    make_repo(repo, "m", SMALL, file_update_dirs=str(odd))
    new = np.full(8, 3.5, np.float32)
    save_file({"fc2.bias": new}, str(odd / "w.safetensors"))
    with running(repo) as srv:
        c = httpclient.InferenceServerClient(srv.http_url)
        r = result(cmd(c, "m", {"op": "update", "source": {"file": str(odd / "w.safetensors")}}))
        assert r["updated"] == ["fc2.bias"]
        st = status(c, "m")
        assert st["updates_enabled"] is True
        # auth stays on: no secret, no update
        refused(lambda: cmd(c, "m", {"op": "reset"}, secret=False), "secret")
        c.close()


def test_backend_refuses_a_config_that_does_not_fit_the_bundle(tmp_path):
    repo = str(tmp_path / "repo")
    make_repo(repo, "loose", SMALL)
    make_repo(repo, "sneaky", SMALL, allow_updates="false")
    # Hand-edits: -1 dims on a weight (Triton would copy any size), weights declared with updates off.
    with open(os.path.join(repo, "loose", "config.pbtxt")) as f:
        text = f.read()
    with open(os.path.join(repo, "loose", "config.pbtxt"), "w") as f:
        f.write(
            text.replace(
                'name: "fc1.weight"\n  data_type: TYPE_FP32\n  dims: 64\n  dims: 64', 'name: "fc1.weight"\n  data_type: TYPE_FP32\n  dims: -1\n  dims: -1'
            )
        )
    with open(os.path.join(repo, "loose", "config.pbtxt")) as f:
        assert "dims: -1\n  dims: -1" in f.read()
    with open(os.path.join(repo, "sneaky", "config.pbtxt"), "a") as f:
        f.write('input { name: "fc0.weight" data_type: TYPE_FP32 dims: [16, 64] optional: true }\n')
    with running(repo, model_control_mode="explicit") as srv:
        c = httpclient.InferenceServerClient(srv.http_url)
        with pytest.raises(InferenceServerException, match="must be exactly"):
            c.load_model("loose")
        with pytest.raises(InferenceServerException, match="updates are off"):
            c.load_model("sneaky")
        c.close()


# -- defect 2: unauthenticated requests cannot grow the server --------------------------------------
def test_oversized_or_unauthenticated_weights_do_not_grow_memory(env, client):
    srv = env[0]
    alive(srv, client, "big")
    before = region_bytes(srv)
    huge = np.ones((4096, 2048), np.float32)  # 32 MiB, twice fc1.weight; 16 of them in all
    for _ in range(8):
        refused(lambda: client.infer("big", [control(httpclient, {"op": "update", "secret": "wrong"}, False), tensor(httpclient, "fc1.weight", huge)]), "shape")
        refused(lambda: client.infer("big", [tensor(httpclient, "fc1.weight", huge)]), "shape")
        refused(lambda: client.infer("off", [control(httpclient, {"op": "update"}, False), tensor(httpclient, "fc1.weight", np.ones((64, 64), np.float32))]))
    grown = region_bytes(srv) - before
    print(f"16 oversized unauthenticated requests: python-backend regions {before / 2**20:.1f} -> {(before + grown) / 2**20:.1f} MiB")
    assert grown < 4 * 2**20, f"python-backend regions grew by {grown / 2**20:.1f} MiB"
    # A right-sized tensor with a wrong secret is copied once (the documented bound), never accumulated.
    right = np.ones((2048, 2048), np.float32)
    for _ in range(3):
        refused(
            lambda: client.infer("big", [control(httpclient, {"op": "update", "secret": "wrong"}, False), tensor(httpclient, "fc1.weight", right)]), "secret"
        )
    grown = region_bytes(srv) - before
    assert grown < right.nbytes + 4 * 2**20, f"regions grew by {grown / 2**20:.1f} MiB for a {right.nbytes / 2**20:.0f} MiB tensor"
    alive(srv, client, "big")


# -- defect 3: nothing a client sends fails another client's request --------------------------------
ATTACKS = [
    b'{"op": "status", "secret": "\\ud800"}',
    b'{"op": "update", "secret": "\\udfff"}',
    b"[" * 30000,
    b'{"op": ' + b"[" * 20000 + b"}",
    b"\xff\xfe not utf-8",
    b'{"op": {"nested": [1, 2]}}',
    b'{"op": "status", "checksums": "yes"}',
]


def test_attacks_get_their_own_clear_errors_and_batch_neighbours_are_served(env):
    srv = env[0]
    url = srv.http_url

    def attack(i: int) -> str:
        c = httpclient.InferenceServerClient(url)
        try:
            raw = ATTACKS[i % len(ATTACKS)]
            ctl = httpclient.InferInput("CONTROL", [1, 1], "BYTES")
            ctl.set_data_from_numpy(np.array([[raw]], dtype=object))
            return refused(lambda: c.infer("hb", [ctl]))
        finally:
            c.close()

    def legit(i: int) -> int:
        c = httpclient.InferenceServerClient(url)
        try:
            if i % 2:
                return int(status(c, "hb")["version"])
            return version(c.infer("hb", [tensor(httpclient, "x", X[:1])]))
        finally:
            c.close()

    with cf.ThreadPoolExecutor(12) as ex:
        bad = [ex.submit(attack, i) for i in range(140)]
        good = [ex.submit(legit, i) for i in range(140)]
        msgs = [f.result() for f in bad]  # each raises if it was not a clean 400
        [f.result() for f in good]  # each raises if a legitimate call failed
    assert any("UTF-8" in m for m in msgs) and any("nests too deeply" in m for m in msgs)
    assert any("true or false" in m for m in msgs)


# -- defects 3 and 4: replies are the truth, with the version their own op created -------------------
def test_concurrent_writers_each_get_their_own_version(env):
    srv = env[0]
    c0 = httpclient.InferenceServerClient(srv.http_url)
    v0 = status(c0, "hn")["version"]
    w = {"fc2.bias": np.zeros(8, np.float32)}

    def writer(k: int) -> list[tuple[int, int]]:
        c = httpclient.InferenceServerClient(srv.http_url)
        got = []
        try:
            for j in range(6):
                op = {"op": "reset"} if (k + j) % 3 == 0 else {"op": "update"}
                r = cmd(c, "hn", op, w if op["op"] == "update" else None)
                got.append((result(r)["version"], version(r)))
        finally:
            c.close()
        return got

    with cf.ThreadPoolExecutor(8) as ex:
        replies = [v for f in [ex.submit(writer, k) for k in range(8)] for v in f.result()]
    assert all(a == b for a, b in replies), "CONTROL_RESULT and WEIGHTS_VERSION disagree"
    versions = sorted(a for a, _ in replies)
    assert versions == list(range(v0 + 1, v0 + 1 + len(replies))), "every applied op, and only those, got a distinct version"
    assert status(c0, "hn")["version"] == v0 + len(replies)

    # Compare-and-swap: a winner's reply is exactly expected_version + 1.
    def cas_writer(k: int) -> list[tuple[int, int]]:
        c = httpclient.InferenceServerClient(srv.http_url)
        out = []
        try:
            for _ in range(6):
                seen = status(c, "hn")["version"]
                try:
                    r = cmd(c, "hn", {"op": "update", "expected_version": seen}, w)
                except InferenceServerException as e:
                    assert "version conflict" in e.message()
                    continue
                out.append((seen, result(r)["version"]))
        finally:
            c.close()
        return out

    with cf.ThreadPoolExecutor(8) as ex:
        wins = [v for f in [ex.submit(cas_writer, k) for k in range(8)] for v in f.result()]
    assert wins and all(got == seen + 1 for seen, got in wins)
    assert len({got for _, got in wins}) == len(wins), "two CAS winners for one version"
    c0.close()


# -- defect 5: reject_nonfinite looks at the value after the cast ------------------------------------
def test_reject_nonfinite_catches_overflow_in_the_cast(env, client):
    _, allowed, _, _ = env
    path = allowed / "f64.safetensors"
    save_file({"fc2.bias": np.full(8, 1e39, np.float64)}, str(path))
    before = checksums(client, "hn")
    refused(lambda: cmd(client, "hn", {"op": "update", "reject_nonfinite": True, "source": {"file": str(path)}}), "NaN or Inf")
    save_file({"fc2.bias": np.full(8, 1e300, np.float64)}, str(path))
    refused(lambda: cmd(client, "hn", {"op": "update", "reject_nonfinite": True, "source": {"file": str(path)}}), "NaN or Inf")
    assert checksums(client, "hn") == before
    r = client.infer("hn", [tensor(httpclient, "x", X)])
    assert np.isfinite(r.as_numpy("y")).all()


# -- defect 6: the file transport opens once, safely ---------------------------------------------------
def _swapper(body: str) -> subprocess.Popen:
    """A bounded loop in another process: tritonclient's HTTP waits can starve a thread of the GIL."""
    script = "import os, shutil, time\nend = time.monotonic() + 60\ni = 0\nwhile time.monotonic() < end:\n" + body + "    i += 1\n"
    return subprocess.Popen([sys.executable, "-c", script])


def test_fifo_swapped_in_after_the_check_is_refused_at_once(env):
    _, allowed, _, _ = env
    good = allowed / "fifo-good.safetensors"
    save_file({"fc2.bias": np.full(8, 0.5, np.float32)}, str(good))
    path = allowed / "fifo-race.safetensors"
    shutil.copyfile(good, path)
    a, b = allowed / ".fifo-a", allowed / ".fifo-b"
    swapper = _swapper(
        f"    shutil.copyfile({str(good)!r}, {str(a)!r}); os.replace({str(a)!r}, {str(path)!r})\n"
        f"    os.mkfifo({str(b)!r}); os.replace({str(b)!r}, {str(path)!r})\n"
    )
    c = httpclient.InferenceServerClient(env[0].http_url, network_timeout=15)
    outcomes = {"ok": 0, "refused": 0}
    try:
        for _ in range(30):
            t0 = time.monotonic()
            try:
                cmd(c, "hn", {"op": "update", "source": {"file": str(path)}})
                outcomes["ok"] += 1
            except InferenceServerException as e:
                assert "not a regular file" in e.message(), e.message()
                outcomes["refused"] += 1
            assert time.monotonic() - t0 < 10, "a push blocked on a FIFO"
    finally:
        swapper.kill()
        swapper.wait()
        c.close()
    assert outcomes["refused"] > 0, outcomes
    alive(env[0], httpclient.InferenceServerClient(env[0].http_url), "hn")


def test_symlink_swapped_during_pushes_never_loads_an_outside_file(env, client):
    _, allowed, outside, _ = env
    good = np.full(8, 1.0, np.float32)
    save_file({"fc2.bias": good}, str(allowed / "good.safetensors"))
    save_file({"fc2.bias": np.full(8, 666.0, np.float32)}, str(outside / "evil.safetensors"))
    link = allowed / "latest.safetensors"
    swapper = _swapper(
        f"    tmp = {str(allowed)!r} + '/.swap-%d' % (i % 2)\n"
        f"    if os.path.islink(tmp): os.unlink(tmp)\n"
        f"    os.symlink('good.safetensors' if i % 2 else {str(outside / 'evil.safetensors')!r}, tmp)\n"
        f"    os.replace(tmp, {str(link)!r})\n"
    )
    outcomes = {"ok": 0, "refused": 0}
    try:
        for _ in range(40):
            try:
                cmd(client, "hn", {"op": "update", "source": {"file": str(link)}})
                outcomes["ok"] += 1
            except InferenceServerException as e:
                assert "outside the allowed" in e.message() or "does not exist" in e.message(), e.message()
                outcomes["refused"] += 1
            y = client.infer("hn", [tensor(httpclient, "x", X)]).as_numpy("y")
            assert np.abs(y).max() < 100, "a weight from outside the allowed directory was served"
    finally:
        swapper.kill()
        swapper.wait()
    assert outcomes["refused"] > 0 and outcomes["ok"] > 0, outcomes  # the race really ran both ways
    if link.is_symlink():
        link.unlink()


def test_checkpoint_truncated_during_a_push_is_a_clear_error_not_a_crash(env, client):
    srv, allowed, _, _ = env
    path = allowed / "big.safetensors"
    w = np.random.default_rng(9).standard_normal((2048, 2048)).astype(np.float32)
    rng = random.Random(4)
    results = []
    for _ in range(12):
        save_file({"fc1.weight": w}, str(path))

        def push() -> None:
            c = httpclient.InferenceServerClient(srv.http_url)
            try:
                cmd(c, "big", {"op": "update", "source": {"file": str(path)}})
                results.append("ok")
            except InferenceServerException as e:
                assert str(e.status()) == "400", e.message()
                results.append(e.message())
            finally:
                c.close()

        t = threading.Thread(target=push)
        t.start()
        time.sleep(rng.uniform(0, 0.03))
        with open(path, "r+b") as f:  # a trainer overwriting its checkpoint in place
            f.truncate(4096)
        t.join(60)
        assert not t.is_alive()
        alive(srv, client, "big")
    assert len(results) == 12


# -- defect 7: OS errors are clear, and a failed write leaves nothing behind ---------------------------
def test_non_ascii_paths_work(env, client):
    _, _, _, nonascii = env
    p = nonascii / "pesos-ñ.safetensors"
    save_file({"fc2.bias": np.full(8, 0.25, np.float32)}, str(p))
    assert result(cmd(client, "hn", {"op": "update", "source": {"file": str(p)}}))["updated"] == ["fc2.bias"]


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=440k", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root): ENOSPC test skipped")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_enospc_is_a_clear_error_and_leaves_no_temp_file(tmp_path, tiny_tmpfs):
    model = zoo.mlp(sizes=(16, 256, 256, 8))  # ~290 KB of weights: one version fits, two do not
    repo = str(tmp_path / "repo")
    make_repo(repo, "m", model, store_root=tiny_tmpfs, staging="false")
    with running(repo) as srv:
        c = httpclient.InferenceServerClient(srv.http_url)
        before = checksums(c, "m")
        full = {n: np.ones_like(a) for n, a in zoo.initializers(model).items()}
        refused(lambda: cmd(c, "m", {"op": "update"}, full), "No space left on device", code="503")
        assert checksums(c, "m") == before
        store = [d for d in os.listdir(tiny_tmpfs) if d.startswith("weightbundle-")][0]
        assert not [f for f in os.listdir(os.path.join(tiny_tmpfs, store)) if f.endswith(".tmp")]
        # The space came back: a small update and a rollback still work.
        v = result(cmd(c, "m", {"op": "update"}, {"fc2.bias": np.zeros(8, np.float32)}))["version"]
        assert result(cmd(c, "m", {"op": "rollback"}))["version"] == v + 1
        assert checksums(c, "m") == before
        c.close()


# -- defect 10: smaller holes ---------------------------------------------------------------------------
def test_booleans_are_strict_and_checksums_need_the_secret(env, client):
    for bad in (1, "true", None, [True]):
        refused(lambda bad=bad: cmd(client, "hn", {"op": "update", "reject_nonfinite": bad}), "true or false")
    st = status(client, "hn")
    assert "checksums" in st
    anon = result(cmd(client, "hn", {"op": "status"}, secret=False))
    assert "checksums" not in anon and anon["version"] == st["version"]
    refused(lambda: cmd(client, "hn", {"op": "status", "checksums": True}, secret=False), "secret")


def test_leftover_commit_folder_is_swept_at_the_first_start(tmp_path):
    repo = str(tmp_path / "repo")
    make_repo(repo, "m", SMALL)
    # The pid in the name is alive (this test process) but nobody holds the folder's lock:
    # its writer died. A pid check kept such folders until a later restart.
    stale = os.path.join(repo, "m", f".commit-{os.getpid()}-deadbeef")
    os.makedirs(stale)
    with open(os.path.join(stale, "model.bundle"), "wb") as f:
        f.write(b"half")
    with running(repo):
        assert not os.path.exists(stale)


# -- the fuzz test -----------------------------------------------------------------------------------
def test_fuzz_control_documents_and_tensors(env):
    from hypothesis import HealthCheck, assume, given, settings
    from hypothesis import strategies as st

    srv = env[0]
    c = httpclient.InferenceServerClient(srv.http_url)
    shapes = {n: a.shape for n, a in zoo.initializers(SMALL).items()}
    names = sorted(shapes) + ["x", "bogus", "CONTROL_RESULT"]
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
        max_leaves=12,
    )
    fields = st.sampled_from(["expected_version", "reject_nonfinite", "checksums", "source", "secret", "only", "file", "zzz"])
    ops = st.one_of(*(st.just(o) for o in ("update", "status", "status", "reset", "rollback", "commit")), st.sampled_from(["", "explode"]) | json_values)
    docs = st.fixed_dictionaries({"op": ops}, optional={"secret": st.sampled_from([SECRET, "wrong", "\ud800", ""]) | json_values}).flatmap(
        lambda d: (st.just({}) | st.dictionaries(fields, json_values, max_size=3)).map(lambda extra: {**extra, **d})
    )
    doc_bytes = docs.map(lambda d: json.dumps(d).encode())
    raw = st.one_of(doc_bytes, doc_bytes, doc_bytes, st.binary(max_size=64))
    dtypes = st.sampled_from([np.float32, np.float64, np.int32, np.float16])
    tensors = st.just({}) | st.dictionaries(st.sampled_from(names), st.tuples(dtypes, st.booleans(), st.integers(0, 3)), max_size=3)
    stats = {"cases": 0, "ok": 0, "clear_errors": 0}
    baseline = {"sums": checksums(c, "hn")}

    @settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(raw=raw, tens=tensors, with_control=st.booleans())
    def case(raw: bytes, tens: dict, with_control: bool) -> None:
        assume(with_control or tens)
        stats["cases"] += 1
        ins = []
        if with_control:
            ctl = httpclient.InferInput("CONTROL", [1], "BYTES")
            ctl.set_data_from_numpy(np.array([raw], dtype=object))
            ins.append(ctl)
        for n, (dt, exact, k) in tens.items():
            shape = shapes.get(n, (2, 16)) if exact else tuple(range(1, k + 2))
            ins.append(tensor(httpclient, n, np.ones(shape, dt)))
        try:
            c.infer("hn", ins)
            stats["ok"] += 1
            baseline["sums"] = checksums(c, "hn")  # a legitimate command may have changed weights
        except InferenceServerException as e:
            assert str(e.status()).startswith("4"), (e.status(), e.message())
            assert "Traceback" not in e.message() and ".py" not in e.message()
            stats["clear_errors"] += 1
            assert checksums(c, "hn") == baseline["sums"], "a refused request changed weights"

    case()
    print(f"fuzz: {stats}")
    assert stats["cases"] >= 150 and stats["ok"] > 0 and stats["clear_errors"] > stats["ok"]
    assert srv.is_running()
    alive(srv, c, "hn")
    c.close()
