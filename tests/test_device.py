"""Device-resident weights (``device.py``): one session per load, updates copied into standby buffers.

These run the machinery on ORT's CPU device (``resident=True``), or on CUDA buffers with
``WEIGHTBUNDLE_TEST_DEVICE=cuda`` (onnxruntime-gpu and a GPU); ``tools/bench_gpu.py``
measures it there.  What is checked: the answers equal the per-version
sessions' after init, full and partial updates; an update copies only what it changed; a
running inference keeps its buffers while a newer version waits for it; a retired view
sends ``Bundle.infer`` to the current one; under a stream of updates every answer is the
exact bytes of its version's weights; a missing CUDA provider is a clear error.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

import weightbundle as wb
from weightbundle.device import StaleView

# "cuda" on a GPU machine with onnxruntime-gpu: the same tests on device-resident CUDA buffers.
DEVICE = os.environ.get("WEIGHTBUNDLE_TEST_DEVICE", "cpu")
RESIDENT = wb.RuntimeOptions(device=DEVICE, resident=True)
# Against the CPU sessions: CUDA's GEMMs use TF32 by default in ONNX Runtime (~1e-3 relative).
RTOL = 1e-5 if DEVICE == "cpu" else 3e-3


def _x(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal((4, 16)).astype(np.float32)}


def _weights(b: wb.Bundle, seed: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s.name: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype) for s in b.update_inputs if names is None or s.name in names}


@pytest.fixture
def mlp(built):
    """An initialized MLP bundle with device-resident weights, unloaded afterwards."""
    b = wb.Bundle.load_from_mem(built("mlp"), RESIDENT)
    b.init()
    yield b
    b.unload()


def _close(a: np.ndarray, b: np.ndarray) -> None:
    scale = max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * scale)


@pytest.mark.parametrize("name", ["mlp", "convnet", "transformer_encoder"])
def test_resident_answers_equal_the_per_version_sessions(built, name):
    from test_runtime import feeds_for  # the zoo models' inputs

    data = built(name)
    ref, dev = wb.Bundle.load_from_mem(data), wb.Bundle.load_from_mem(data, RESIDENT)
    try:
        rng = np.random.default_rng(7)
        x = feeds_for(name, rng)
        ref.init()
        dev.init()
        out = next(iter(ref.outputs)).name
        _close(dev.infer(x)[0][out], ref.infer(x)[0][out])
        full = _weights(dev, 1)
        full = {k: (np.abs(v) + 0.5 if k.endswith(".var") else v) for k, v in full.items()}  # BatchNorm variances stay positive
        part = {dev.update_inputs[0].name: full[dev.update_inputs[0].name] * 2}
        for upd in (full, part, {n: np.zeros((0,), np.float32) for n in full}):  # the last: all empty = keep every weight
            assert ref.update(upd) == dev.update(upd)
            got, v = dev.infer(x)
            want, w = ref.infer(x)
            assert v == w
            _close(got[out], want[out])
    finally:
        ref.unload()
        dev.unload()


def test_an_update_copies_only_what_it_changed(mlp):
    b = mlp
    dw = b._sessions._device
    total = sum(s.nbytes for s in b.variables if s.name in dw.names)
    assert dw.copied_bytes == total  # the first version: every weight
    first = b.update_inputs[0]
    nbytes = b._specs[first.name].nbytes  # an MLP's update inputs are its variables
    b.update(_weights(b, 2, [first.name]))
    assert dw.copied_bytes == nbytes
    assert dw.device_bytes() == total + nbytes  # a standby only for the weight that changed
    b.update({first.name: np.zeros((0,), np.float32)})  # keep: same store entries, nothing to copy
    assert dw.copied_bytes == 0


def test_a_running_inference_keeps_its_buffers_and_a_newer_version_waits_for_it(mlp):
    b = mlp
    x = _x(np.random.default_rng(0))
    name = b.update_inputs[0].name
    old = b._sessions.infer_session()
    before = old.session.run(None, x)[0]
    b.update(_weights(b, 3, [name]))  # writes the standby buffer: the old view's are untouched
    np.testing.assert_array_equal(old.session.run(None, x)[0], before)
    view = old.session
    view.running += 1  # an inference of the old version is in flight
    done = threading.Event()

    def update() -> None:
        b.update(_weights(b, 4, [name]))  # overwrites the buffer the old version reads
        done.set()

    t = threading.Thread(target=update)
    t.start()
    assert not done.wait(0.5), "the update overwrote buffers a running inference reads"
    with view._owner._cond:
        view.running -= 1
        view._owner._cond.notify_all()
    assert done.wait(30)
    t.join()
    with pytest.raises(StaleView):
        view.run(None, x)  # retired: whoever still holds it takes the current view
    _, v = b.infer(x)  # Bundle.infer does so by itself
    assert v == b.version


def test_under_a_stream_of_updates_every_answer_is_its_versions_exact_bytes(mlp):
    b = mlp
    x = _x(np.random.default_rng(1))
    sets = [_weights(b, 10), _weights(b, 11)]
    expect = []
    for s in sets:
        b.update(s)
        expect.append(b.infer(x)[0]["y"])
    of_version = {b.version: 1}
    bad: list[str] = []
    stop = threading.Event()
    answers = [0]

    def client() -> None:
        while not stop.is_set():
            try:
                out, v = b.infer(x)
            except Exception as e:  # noqa: BLE001 - a failed answer is a finding, not a dead thread
                bad.append(repr(e))
                continue
            which = of_version.get(v)
            if which is None or not np.array_equal(out["y"], expect[which]):
                bad.append(f"version {v}")
            answers[0] += 1

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(40):
            v = b.version + 1
            of_version[v] = i % 2  # before it serves: the clients look it up
            b.update(sets[i % 2], version=v)
            time.sleep(0.005)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert answers[0] > 40
    assert not bad, bad[:5]


def test_two_loads_give_the_same_bytes(built):
    x = _x(np.random.default_rng(2))
    outs = []
    for _ in range(2):
        with wb.Bundle.load_from_mem(built("mlp"), RESIDENT) as b:
            b.init()
            b.update(_weights(b, 5))
            outs.append(b.infer(x)[0]["y"])
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU-only build")
def test_cuda_without_its_provider_or_an_unknown_device_is_a_clear_error(built):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(wb.BundleError, match="onnxruntime-gpu"):
            wb.Bundle.load_from_mem(built("mlp"), wb.RuntimeOptions(device="cuda"))
    with pytest.raises(ValueError, match="device must be"):
        wb.Bundle.load_from_mem(built("mlp"), wb.RuntimeOptions(device="tpu"))
    assert wb.RuntimeOptions(providers=("CUDAExecutionProvider", "CPUExecutionProvider")).device_resident


def test_serving_settings_choose_the_device_and_refuse_an_unknown_one():
    from weightbundle.serving import ServingSettings

    s = ServingSettings.from_model_config({"parameters": {"device": {"string_value": "cuda"}}})
    s.device_id = 1  # model.py sets it from Triton's model_instance_device_id (KIND_GPU)
    opts = s.runtime_options(None)
    assert (opts.device, opts.device_id, opts.device_resident) == ("cuda", 1, True)
    assert opts.session_providers()[0] == ("CUDAExecutionProvider", {"device_id": "1", "cudnn_conv_algo_search": "EXHAUSTIVE"})
    assert not ServingSettings.from_model_config({}).runtime_options(None).device_resident
    with pytest.raises(wb.BundleError, match="device must be"):
        ServingSettings.from_model_config({"parameters": {"device": {"string_value": "gpu0"}}})


def test_an_answer_is_not_overwritten_by_the_next_inference(mlp):
    b = mlp
    rng = np.random.default_rng(3)
    x1, x2 = _x(rng), _x(rng)
    first = b.infer(x1)[0]["y"]
    kept = first.copy()
    for _ in range(3):
        second = b.infer(x2)[0]["y"]
    assert not np.shares_memory(first, second)
    np.testing.assert_array_equal(first, kept)


def test_unload_frees_the_device_buffers_even_while_serving_threads_live_on(built):
    import gc
    import weakref

    b = wb.Bundle.load_from_mem(built("mlp"), RESIDENT)
    b.init()
    x = _x(np.random.default_rng(4))
    served, release = threading.Event(), threading.Event()

    def server_thread() -> None:  # like a Triton stub's thread: it outlives the model
        b.infer(x)
        served.set()
        release.wait(30)

    t = threading.Thread(target=server_thread)
    t.start()
    try:
        assert served.wait(30)
        dw = weakref.ref(b._sessions._device)
        b.unload()
        gc.collect()
        assert dw() is None, "a thread's cached binding kept the session and its buffers alive"
    finally:
        release.set()
        t.join(30)


def test_a_version_another_instance_acknowledged_is_never_answered_from_the_one_before(built, tmp_path, monkeypatch):
    """Two instances on one store: while instance B copies in the version A's update returned,
    B's other threads wait for it instead of answering from the previous version."""
    import shutil
    import uuid

    monkeypatch.setenv("WEIGHTBUNDLE_PACKED_ROOT", str(tmp_path / "disk"))
    store = f"/dev/shm/weightbundle-test-{uuid.uuid4().hex[:8]}"
    opts = wb.RuntimeOptions(device=DEVICE, resident=True, store_dir=store)
    a, b = (wb.Bundle.load_from_mem(built("mlp"), opts) for _ in range(2))
    try:
        for x in (a, b):
            x.store.register()
        a.init()
        x = _x(np.random.default_rng(5))
        b.infer(x)
        dw = b._sessions._device
        slow = threading.Event()
        real = dw._copy

        def slow_copy(dst, src):
            slow.set()
            time.sleep(0.3)  # B's copy of the new version is under way
            real(dst, src)

        monkeypatch.setattr(dw, "_copy", slow_copy)
        v = a.update(_weights(a, 6))  # acknowledged by instance A
        first: list[int] = []
        t = threading.Thread(target=lambda: first.append(b.infer(x)[1]))
        t.start()
        assert slow.wait(10)
        assert b.infer(x)[1] == v  # not the version before, though B's copy is not done yet
        t.join(30)
        assert first == [v]
    finally:
        stores = [a.store, b.store]
        a.unload()
        b.unload()
        for s in stores:
            s.release()
        shutil.rmtree(store, ignore_errors=True)


def test_a_config_for_device_cuda_asks_triton_for_gpu_instances(built):
    from weightbundle.modelconfig import make_config

    with wb.Bundle.load_from_mem(built("mlp")) as b:
        gpu = make_config(b, "m", parameters={"device": "cuda"})
        cpu = make_config(b, "m")
    assert "KIND_GPU" in gpu and 'string_value: "cuda"' in gpu
    assert "KIND_CPU" in cpu and "KIND_GPU" not in cpu
