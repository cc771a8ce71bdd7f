"""One shared pre-packed copy per weight version (packing.py), in-process with two "instances"."""

from __future__ import annotations

import os
import shutil
import uuid

import numpy as np
import pytest

from weightbundle import zoo
import weightbundle as wb
from weightbundle import packing

MODEL = zoo.mlp(sizes=(16, 256, 256, 8))
X = np.random.default_rng(7).standard_normal((4, 16)).astype(np.float32)


@pytest.fixture
def pair(tmp_path, monkeypatch):
    """Two bundles on one store, as two Triton instances of a model would be."""
    monkeypatch.setenv("WEIGHTBUNDLE_PACKED_ROOT", str(tmp_path / "disk"))
    store = f"/dev/shm/weightbundle-test-{uuid.uuid4().hex[:8]}"
    data = wb.build_bundle(wb.convert(MODEL))
    bundles = [wb.Bundle.load_from_mem(data, wb.RuntimeOptions(store_dir=store, intra_op_threads=1)) for _ in range(2)]
    for b in bundles:
        b.store.register()
    bundles[0].init()
    yield bundles
    stores = [b.store for b in bundles]
    for b in bundles:
        b.unload()
    for s in stores:
        s.release()
    shutil.rmtree(store, ignore_errors=True)


def packed(b: wb.Bundle) -> np.ndarray:
    b.infer({"x": X})
    assert b._sessions.builder.wait_idle(60)
    out, _ = b.infer({"x": X})
    assert b.fully_optimised
    return out["y"]


def test_instances_share_one_packed_copy_and_answer_the_same_bytes(pair):
    a, b = pair
    ya, yb = packed(a), packed(b)
    assert np.array_equal(ya, yb)  # one packing, one set of bytes, whichever instance answers
    np.testing.assert_allclose(ya, zoo.ort_run(MODEL, {"x": X})["y"], rtol=1e-5, atol=1e-5 * np.abs(ya).max())
    files = sorted(os.listdir(a.store.packed_path))
    assert [f for f in files if f.startswith(packing.PREFIX)] == ["packed-v0.data", "packed-v0.onnx"]
    assert a.store.packed_path != a.store.path  # disk-backed twin, not the tmpfs store


def test_a_new_version_replaces_the_packed_files_and_release_removes_them(pair):
    a, b = pair
    packed(a)
    w = {"fc1.weight": np.random.default_rng(1).standard_normal((256, 256)).astype(np.float32)}
    v = a.update(w)
    ya, yb = packed(a), packed(b)
    assert np.array_equal(ya, yb)
    np.testing.assert_allclose(ya, zoo.ort_run(zoo.with_weights(MODEL, w), {"x": X})["y"], rtol=1e-5, atol=1e-5 * np.abs(ya).max())
    names = [f for f in os.listdir(a.store.packed_path) if f.startswith(packing.PREFIX)]
    assert sorted(names) == [f"packed-v{v}.data", f"packed-v{v}.onnx"]  # the old version's files are gone


def test_a_superseded_version_is_neither_packed_nor_copied_privately(pair, monkeypatch):
    """Under a stream, 4 instances through Triton: one loaded an old version's packed pair
    while another, having packed a newer one, collected it; it then packed a private copy
    of a version no one served any more (+0.8 weight copies mid-stream, and CPU)."""
    from weightbundle import sessions

    a, b = pair
    packed(a), packed(b)
    old = b.store.current()
    a.update({"fc1.weight": np.random.default_rng(2).standard_normal((256, 256)).astype(np.float32)})
    ya = packed(a)  # packs the new version, and collects the old pair
    logs: list[str] = []
    b._sessions._log = lambda m, level="warn": logs.append(m)
    b._sessions._swap_in(old)  # b's builder had settled on the old version: skipped, not packed anew
    assert not [f for f in os.listdir(b.store.packed_path) if f.startswith(f"{packing.PREFIX}{old.number}.")]
    monkeypatch.setattr(sessions.packing, "ensure", lambda path, n, build, verify: packing.model_path(path, n))
    with pytest.raises(sessions._Superseded):
        b._sessions._packed_session(old)  # its pair vanished during the load: nothing to serve, no private copy
    assert logs == []
    monkeypatch.undo()
    assert np.array_equal(packed(b), ya)  # b serves the new version from the one shared copy


def test_a_staged_versions_packed_pair_survives_collection_until_activated(pair, monkeypatch):
    """CI failure: a collection running while a stage built its pair swept it (its number is
    ahead of head), and the stage then failed as 'superseded' instead of serving."""
    from weightbundle import sessions

    a, b = pair
    packed(a), packed(b)
    w = {"fc1.weight": np.random.default_rng(3).standard_normal((256, 256)).astype(np.float32)}
    st = a.stage(w)
    pair_files = [f"{packing.PREFIX}{st.number}.data", f"{packing.PREFIX}{st.number}.onnx"]
    a.store.collect_packed()
    a.store.collect()
    assert set(pair_files) <= set(os.listdir(a.store.packed_path))
    a.activate(st.number)
    ya, yb = packed(a), packed(b)
    assert np.array_equal(ya, yb)
    np.testing.assert_allclose(ya, zoo.ort_run(zoo.with_weights(MODEL, w), {"x": X})["y"], rtol=1e-5, atol=1e-5 * np.abs(ya).max())
    # Had the pair gone anyway, the stage serves from a private copy rather than failing.
    w2 = {"fc2.weight": np.random.default_rng(4).standard_normal((256, 8)).astype(np.float32)}
    logs: list[str] = []
    a._sessions._log = lambda m, level="warn": logs.append(m)
    monkeypatch.setattr(sessions.packing, "ensure", lambda path, n, build, verify: packing.model_path(path, n))
    st2 = a.stage(w2)
    monkeypatch.undo()
    assert any("private copy" in m for m in logs)
    a.activate(st2.number)
    y = a.infer({"x": X})[0]["y"]
    ref = zoo.ort_run(zoo.with_weights(MODEL, {**w, **w2}), {"x": X})["y"]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_a_stage_whose_base_was_collected_meanwhile_fails_cleanly(pair, monkeypatch):
    """Not an internal error ('_Superseded'): a clear UpdateError, and nothing left staged."""
    a, _ = pair
    packed(a)

    def collected(*args, **kwargs):
        raise FileNotFoundError("blob-0.bin")

    monkeypatch.setattr(a.store, "arrays", collected)
    with pytest.raises(wb.UpdateError, match="stage it again"):
        a.stage({"fc2.bias": np.ones(8, np.float32)})
    monkeypatch.undo()
    assert a.store.staged_versions() == []


def test_a_dead_builders_leftovers_are_swept(pair):
    a, _ = pair
    packed(a)
    d = a.store.packed_path
    dead = os.path.join(d, f"{packing.BUILDING}999999999-abcd.onnx")
    open(dead, "wb").close()
    scratch = os.path.join(d, f"{packing.BUILDING}999999999-compile-abcd")  # a learn() cut short
    os.makedirs(os.path.join(scratch, "sub"))
    a.update({"fc2.bias": np.zeros(8, np.float32)})
    a._updater.settle()  # collection runs after the update, off its path
    assert not os.path.exists(dead) and not os.path.exists(scratch)


def test_unsupported_sharing_falls_back_to_a_private_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTBUNDLE_PACKED_ROOT", str(tmp_path / "nope" / "file"))
    (tmp_path / "nope").mkdir()
    (tmp_path / "nope" / "file").write_bytes(b"")  # not a folder: building there fails
    logs = []
    with wb.Bundle.load_from_mem(wb.build_bundle(wb.convert(MODEL))) as b:
        b._log = lambda m, level="warn": logs.append(m)
        b.init()
        y = packed(b)
    np.testing.assert_allclose(y, zoo.ort_run(MODEL, {"x": X})["y"], rtol=1e-5, atol=1e-5 * np.abs(y).max())
    assert any("private copy" in m for m in logs)


def test_a_bundle_never_unloaded_leaves_no_store_and_no_packed_files(tmp_path):
    """Dropped without unload(): collected with the GC; exiting while a pack is in flight: the
    exit finalizer stops the builder before it removes the store, so no packed twin outlives it."""
    import gc
    import subprocess
    import sys

    b = wb.Bundle.load_from_mem(wb.build_bundle(wb.convert(MODEL)))
    b.init()
    b.infer({"x": X})  # the background builder starts
    store, twin = b.store.path, b.store.packed_path
    del b
    gc.collect()
    assert not os.path.exists(store) and not os.path.exists(twin)

    root = tmp_path / "disk"
    code = (
        "import numpy as np, weightbundle as wb; from weightbundle import zoo\n"
        "m = zoo.big_mlp(n=1024, layers=2)\n"
        "b = wb.Bundle.load_from_mem(wb.build_bundle(wb.convert(m)))\n"
        "b.init(); b.infer({'x': np.zeros((4, 1024), np.float32)})\n"
        "print(b.store.path)\n"  # and exit at once, packing in flight, no unload()
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "WEIGHTBUNDLE_PACKED_ROOT": str(root)}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not os.path.exists(out.stdout.strip())
    assert not root.exists() or os.listdir(root) == [], os.listdir(root)
