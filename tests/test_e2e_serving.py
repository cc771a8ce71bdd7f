"""End to end on a real tritonserver: serving, updates, errors, batching, versions.

One server per module (start-up costs ~1 s); every test leaves the weights as it
found them or checks versions relative to what it saw first.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from weightbundle import zoo
import weightbundle as wb
from triton_util import SECRET, control, make_repo, result, running, tensor, version

pytestmark = pytest.mark.e2e
MODEL = zoo.mlp()
ORIG = zoo.initializers(MODEL)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = str(tmp_path_factory.mktemp("repo"))
    make_repo(repo, "mlp", MODEL, max_batch_size=8)  # batching: weights travel as [1, ...]
    make_repo(repo, "mlp_nb", MODEL, max_batch_size=0)  # no batching: weights travel as-is
    with running(repo, model_control_mode="explicit", load_models=["mlp", "mlp_nb"]) as srv:
        yield srv


@pytest.fixture(params=["http", "grpc"])
def client(request, server):
    mod = httpclient if request.param == "http" else grpcclient
    url = server.http_url if request.param == "http" else server.grpc_url
    c = mod.InferenceServerClient(url)
    yield mod, c
    c.close()


def x(n=3, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)


def infer(mod, c, model="mlp", xs=None):
    r = c.infer(model, [tensor(mod, "x", x() if xs is None else xs)])
    return r.as_numpy("y"), version(r)


def update(mod, c, weights, model="mlp", **fields):
    batching = model == "mlp"
    inputs = [control(mod, {"op": "update", "secret": SECRET, **fields}, batching)]
    inputs += [tensor(mod, n, a[None] if batching else a) for n, a in weights.items()]
    return c.infer(model, inputs)


def status(mod, c, model="mlp"):
    return result(c.infer(model, [control(mod, {"op": "status", "secret": SECRET}, model == "mlp")]))


@pytest.fixture
def fresh(client):
    """Reset both models to their initial weights before a test."""
    mod, c = client
    for m in ("mlp", "mlp_nb"):
        c.infer(m, [control(mod, {"op": "reset", "secret": SECRET}, m == "mlp")])
    return client


@pytest.mark.parametrize("model", ["mlp", "mlp_nb"])
def test_served_inference_equals_runtime_and_ort(fresh, model):
    mod, c = fresh
    y, v = infer(mod, c, model)
    ref = zoo.ort_run(MODEL, {"x": x()})["y"]
    with wb.Bundle.load_from_mem(wb.build_bundle(wb.convert(MODEL))) as b:
        b.execute(1)
        local = b.execute(0, {"x": x()})["y"]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, local, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", ["mlp", "mlp_nb"])
def test_update_changes_the_next_answer(fresh, model):
    mod, c = fresh
    _, v0 = infer(mod, c, model)
    new = {"fc0.weight": np.random.default_rng(7).standard_normal((16, 32)).astype(np.float32), "fc2.bias": np.full(8, 3.0, np.float32)}
    r = update(mod, c, new, model)
    assert version(r) == v0 + 1
    y, v = infer(mod, c, model)
    assert v == v0 + 1
    np.testing.assert_allclose(y, zoo.ort_run(zoo.with_weights(MODEL, new), {"x": x()})["y"], rtol=1e-5, atol=1e-6)


def test_partial_update_keeps_weights_not_sent(fresh):
    mod, c = fresh
    before = status(mod, c)["checksums"]
    new_w = np.random.default_rng(3).standard_normal((32, 32)).astype(np.float32)
    # Over Triton, "keep" is an absent input: weight inputs carry exact shapes, so Triton itself
    # refuses an empty (or any wrong-sized) tensor before copying it, and nothing changes.
    with pytest.raises(InferenceServerException, match="shape"):
        c.infer(
            "mlp",
            [
                control(mod, {"op": "update", "secret": SECRET}, True),
                tensor(mod, "fc1.weight", new_w[None]),
                tensor(mod, "fc0.weight", np.empty((1, 0, 32), np.float32)),
            ],
        )
    assert status(mod, c)["checksums"] == before
    c.infer("mlp", [control(mod, {"op": "update", "secret": SECRET}, True), tensor(mod, "fc1.weight", new_w[None])])
    after = status(mod, c)["checksums"]
    assert after["fc1.weight"] != before["fc1.weight"]
    assert {k: v for k, v in after.items() if k != "fc1.weight"} == {k: v for k, v in before.items() if k != "fc1.weight"}
    y, _ = infer(mod, c)
    np.testing.assert_allclose(y, zoo.ort_run(zoo.with_weights(MODEL, {"fc1.weight": new_w}), {"x": x()})["y"], rtol=1e-5, atol=1e-6)


def _bad(mod, kind):
    ctl = lambda body: control(mod, body, True)  # noqa: E731
    ok = {"op": "update", "secret": SECRET}
    good_w = tensor(mod, "fc0.weight", np.ones((1, 16, 32), np.float32))
    if kind == "wrong_shape":
        return [ctl(ok), good_w, tensor(mod, "fc1.weight", np.ones((1, 32, 31), np.float32))], "shape"
    if kind == "wrong_dtype":
        return [ctl(ok), good_w, tensor(mod, "fc1.weight", np.ones((1, 32, 32), np.int32))], None
    if kind == "unknown_op":
        return [ctl({"op": "explode", "secret": SECRET}), good_w], "unknown op"
    if kind == "malformed_json":
        i = mod.InferInput("CONTROL", [1, 1], "BYTES")
        i.set_data_from_numpy(np.array([[b"{op: update"]], dtype=object))
        return [i, good_w], "not valid JSON"
    if kind == "non_string_control":
        i = mod.InferInput("CONTROL", [1, 1], "FP32")
        i.set_data_from_numpy(np.ones((1, 1), np.float32))
        return [i, good_w], None  # Triton itself refuses the wrong type; either way it is an error
    if kind == "no_secret":
        return [ctl({"op": "update"}), good_w], "secret"
    if kind == "wrong_secret":
        return [ctl({"op": "update", "secret": SECRET + "x"}), good_w], "secret"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["wrong_shape", "wrong_dtype", "unknown_op", "malformed_json", "non_string_control", "no_secret", "wrong_secret"])
def test_bad_command_errors_and_weights_stay_byte_identical(fresh, kind):
    mod, c = fresh
    before = status(mod, c)
    inputs, needle = _bad(mod, kind)
    with pytest.raises(InferenceServerException) as e:
        c.infer("mlp", inputs)
    if needle:
        assert needle in str(e.value), str(e.value)
    after = status(mod, c)
    assert after["version"] == before["version"] and after["checksums"] == before["checksums"]
    assert c.is_server_live() and c.is_model_ready("mlp")
    y, _ = infer(mod, c)
    np.testing.assert_allclose(y, zoo.ort_run(MODEL, {"x": x()})["y"], rtol=1e-5, atol=1e-6)


def test_many_concurrent_requests_through_dynamic_batching(fresh, server):
    mod, c = fresh
    inputs = [x(n=1 + i % 3, seed=i) for i in range(96)]
    refs = [zoo.ort_run(MODEL, {"x": a})["y"] for a in inputs]

    def one(i):
        cl = httpclient.InferenceServerClient(server.http_url) if mod is httpclient else grpcclient.InferenceServerClient(server.grpc_url)
        try:
            return infer(mod, cl, xs=inputs[i])[0]
        finally:
            cl.close()

    with cf.ThreadPoolExecutor(16) as ex:
        outs = list(ex.map(one, range(len(inputs))))
    for o, r in zip(outs, refs):
        np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-6)


def test_new_version_folder_loaded_with_explicit_model_control(fresh, server):
    mod, c = fresh
    model_dir = os.path.join(server.model_repository, "mlp_nb")
    new = {k: (v * 0.5).astype(v.dtype) for k, v in ORIG.items()}
    os.makedirs(os.path.join(model_dir, "2"))
    try:
        wb.save_bundle(os.path.join(model_dir, "2", "model.bundle"), wb.build_bundle(wb.convert(zoo.with_weights(MODEL, new))))
        c.load_model("mlp_nb")
        r = c.infer("mlp_nb", [tensor(mod, "x", x())])  # default policy: latest version
        np.testing.assert_allclose(r.as_numpy("y"), zoo.ort_run(zoo.with_weights(MODEL, new), {"x": x()})["y"], rtol=1e-5, atol=1e-6)
        assert version(r) == 0  # a new model version starts its own weight history
    finally:
        shutil.rmtree(os.path.join(model_dir, "2"))
        c.load_model("mlp_nb")
    r = c.infer("mlp_nb", [tensor(mod, "x", x())], model_version="1")
    np.testing.assert_allclose(r.as_numpy("y"), zoo.ort_run(MODEL, {"x": x()})["y"], rtol=1e-5, atol=1e-6)


def test_unload_frees_the_weight_store_and_reload_serves_again(fresh, server):
    import time

    mod, c = fresh

    def stores():
        return [d for d in os.listdir("/dev/shm") if d.startswith(f"weightbundle-{server.pid}-mlp_nb-")]

    assert stores()
    c.unload_model("mlp_nb")
    deadline = time.time() + 20
    while stores() and time.time() < deadline:
        time.sleep(0.1)
    assert stores() == []
    c.load_model("mlp_nb")
    y, v = infer(mod, c, "mlp_nb")
    assert v == 0
    np.testing.assert_allclose(y, zoo.ort_run(MODEL, {"x": x()})["y"], rtol=1e-5, atol=1e-6)


def test_cas_status_rollback_reset_over_the_wire(fresh):
    mod, c = fresh
    ctl = lambda body: control(mod, {"secret": SECRET, **body}, False)  # noqa: E731
    v0 = status(mod, c, "mlp_nb")["version"]
    base = status(mod, c, "mlp_nb")["checksums"]
    w1 = {"fc2.bias": np.full(8, 1.0, np.float32)}
    w2 = {"fc2.bias": np.full(8, 2.0, np.float32)}
    assert version(update(mod, c, w1, "mlp_nb", expected_version=v0)) == v0 + 1
    with pytest.raises(InferenceServerException, match=f"current version is {v0 + 1}"):
        update(mod, c, w2, "mlp_nb", expected_version=v0)  # stale CAS: refused, nothing changes
    assert status(mod, c, "mlp_nb")["version"] == v0 + 1
    update(mod, c, w2, "mlp_nb")
    r = c.infer("mlp_nb", [ctl({"op": "rollback"})])  # back to w1's contents, as a new version
    assert result(r)["version"] == v0 + 3 and result(r)["restored"] == f"rollback to {v0 + 1}"
    y, v = infer(mod, c, "mlp_nb")
    assert v == v0 + 3
    np.testing.assert_allclose(y, zoo.ort_run(zoo.with_weights(MODEL, w1), {"x": x()})["y"], rtol=1e-5, atol=1e-6)
    with pytest.raises(InferenceServerException, match="not retained"):  # history=1 keeps one step
        c.infer("mlp_nb", [ctl({"op": "rollback"})])
    with pytest.raises(InferenceServerException, match="current version"):
        c.infer("mlp_nb", [ctl({"op": "reset", "expected_version": 0})])
    c.infer("mlp_nb", [ctl({"op": "reset", "expected_version": v0 + 3})])
    st = status(mod, c, "mlp_nb")
    assert st["version"] == v0 + 4 and st["checksums"] == base
