"""Staged versions and publisher-chosen version numbers, in-process (store + Bundle)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from weightbundle import zoo
import weightbundle as wb
from weightbundle.errors import UpdateError, VersionConflictError, VersionOrderError

MODEL = zoo.mlp(sizes=(16, 32, 8))
X = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)


@pytest.fixture
def bundle():
    b = wb.Bundle.load_from_mem(wb.build_bundle(wb.convert(MODEL)))
    b.init()
    yield b
    b.unload()


def _new(b: wb.Bundle, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {v.name: rng.standard_normal(v.shape).astype(v.np_dtype) for v in b.variables}


def _snapshot(b: wb.Bundle) -> dict[str, bytes]:
    cur = b.store.current()
    return {v.name: b.store.array(cur, v.name).tobytes() for v in b.variables}


def test_publisher_chosen_versions(bundle):
    w = _new(bundle, 1)
    assert bundle.update(w, version=7) == 7
    with pytest.raises(VersionOrderError, match="must exceed the current version 7"):
        bundle.update(w, version=7)
    assert bundle.update(w) == 8  # without a number: today's numbering
    assert bundle.store.rollback(version=20).number == 20
    assert bundle.init(version=21) == 21


def test_stage_serves_nothing_until_activated(bundle):
    before = _snapshot(bundle)
    y0, v0 = bundle.infer({"x": X})
    w = _new(bundle, 2)
    st = bundle.stage(w, version=5)
    assert st.number == 5 and st.base is None and len(st.digest) == 64
    assert bundle.version == 0 and _snapshot(bundle) == before
    np.testing.assert_array_equal(bundle.infer({"x": X})[0]["y"], y0["y"])
    assert [s.number for s in bundle.store.staged_versions()] == [5]
    v = bundle.store.activate(5, expected_version=0)
    assert v.number == 5 and bundle.version == 5 and bundle.store.staged_versions() == []
    ref = zoo.ort_run(zoo.with_weights(MODEL, w), {"x": X})["y"]
    y, ver = bundle.infer({"x": X})
    assert ver == 5
    np.testing.assert_allclose(y["y"], ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    assert bundle.store.current_digest() == st.digest


def test_delta_stage_needs_its_base(bundle):
    name = bundle.variables[0].name
    one = {name: _new(bundle, 3)[name]}
    st = bundle.stage(one, version=2)
    assert st.base == 0 and list(st.entries) == [name]
    bundle.update(_new(bundle, 4))  # version 1: the delta's base is gone
    before = _snapshot(bundle)
    with pytest.raises(VersionConflictError, match="stage it again"):
        bundle.store.activate(2)
    assert _snapshot(bundle) == before and bundle.version == 1


def test_activate_cas_abort_and_errors(bundle):
    bundle.stage(_new(bundle, 5), version=3)
    with pytest.raises(UpdateError, match="already staged"):
        bundle.stage(_new(bundle, 6), version=3)
    with pytest.raises(VersionConflictError, match="expected_version=9"):
        bundle.store.activate(3, expected_version=9)
    with pytest.raises(UpdateError, match="not staged"):
        bundle.store.activate(4)
    with pytest.raises(VersionOrderError):
        bundle.stage(_new(bundle, 6), version=0)
    assert bundle.store.abort(3).number == 3
    with pytest.raises(UpdateError, match="not staged"):
        bundle.store.activate(3)
    assert not [f for f in os.listdir(bundle.store.path) if f.startswith(("staged-", ".stage-"))]
    assert bundle.version == 0


def test_bad_stage_leaves_nothing(bundle):
    before = _snapshot(bundle)
    w = _new(bundle, 7)
    w[bundle.variables[0].name] = np.zeros((3, 3), np.float32)
    with pytest.raises(UpdateError, match="shape"):
        bundle.stage(w, version=1)
    w = _new(bundle, 7)
    w[bundle.variables[0].name][0, 0] = np.nan
    with pytest.raises(UpdateError, match="NaN"):
        bundle.stage(w, version=1, reject_nonfinite=True)
    assert bundle.store.staged_versions() == [] and _snapshot(bundle) == before
    assert not [f for f in os.listdir(bundle.store.path) if f.startswith(("staged-", ".stage-"))]


def test_staged_version_expires(bundle):
    bundle.stage(_new(bundle, 8), version=1, ttl=0.05)
    time.sleep(0.1)
    assert bundle.store.staged_versions() == []
    with pytest.raises(UpdateError, match="not staged"):
        bundle.store.activate(1)
    assert not [f for f in os.listdir(bundle.store.path) if f.startswith("staged-")]


# -- over the control protocol (Service, in-process) ----------------------------------------
def _service(tmp_path, monkeypatch):
    import json

    from weightbundle.serving import Service, ServingSettings

    monkeypatch.setenv("WB_TEST_SECRET", "s3cr3t")
    d = tmp_path / "repo" / "m"
    (d / "1").mkdir(parents=True)
    (tmp_path / "shm").mkdir()
    wb.save_bundle(d / "1" / "model.bundle", wb.build_bundle(wb.convert(MODEL)))
    p = {"allow_updates": "true", "update_secret_env": "WB_TEST_SECRET", "store_root": str(tmp_path / "shm"), "history": "2"}
    svc = Service.open(str(d), 1, ServingSettings.from_model_config({"parameters": {k: {"string_value": v} for k, v in p.items()}}), "m")

    def call(tensors=None, **body):
        body.setdefault("secret", "s3cr3t")
        [r] = svc.handle([{"CONTROL": np.array([json.dumps(body).encode()], dtype=object), **(tensors or {})}])
        return (None, r.error, r.code) if r.error else (json.loads(r.outputs["CONTROL_RESULT"][0]), None, None)

    return svc, call


def test_version_field_and_two_phase_ops_over_the_protocol(tmp_path, monkeypatch):
    svc, call = _service(tmp_path, monkeypatch)
    try:
        w = _new(svc.bundle, 9)
        r, e, _ = call(w, op="update", version=10)
        assert e is None and r["version"] == 10
        _, e, code = call(w, op="update", version=10)
        assert "must exceed the current version 10" in e and code == "ALREADY_EXISTS"
        r, e, _ = call(op="rollback", version=12)
        assert r["version"] == 12
        r, e, _ = call(op="reset", version=13, expected_version=12)
        assert r["version"] == 13
        for bad in ("x", -1, True, 1.5):
            _, e, _ = call(w, op="update", version=bad)
            assert "'version' must be" in e
        # stage from request tensors: serves nothing until activated, on every instance
        r, e, _ = call(w, op="stage", version=20)
        assert e is None and r["staged_version"] == 20 and r["version"] == 13 and len(r["digest"]) == 64
        [st] = call(op="status", checksums=False)[0]["staged"]
        assert st["version"] == 20 and st["base"] is None
        assert "needs 'version'" in call(op="activate")[1]
        assert "not staged" in call(op="activate", version=21)[1]
        _, e, code = call(op="activate", version=20, expected_version=12)
        assert code == "ALREADY_EXISTS"
        r, e, _ = call(op="activate", version=20, expected_version=13)
        assert r["version"] == 20 and r["activated"] == 20
        assert svc.handle([{"x": X}])[0].outputs["WEIGHTS_VERSION"].tolist() == [20]
        call(w, op="stage", version=21)
        assert call(op="abort", version=21)[0]["aborted"] == 21
        assert call(op="status", checksums=False)[0]["staged"] == []
        # secret is required for every two-phase op
        for op in ("stage", "activate", "abort"):
            _, e, _ = call(op=op, version=30, secret="wrong")
            assert "wrong 'secret'" in e
        _, e, _ = call(op="stage", source={"s3": "s3://bkt/p/m/v30"})
        assert "s3_allowed_prefixes" in e
    finally:
        svc.close()


def test_expired_stage_drops_its_prebuilt_session(bundle):
    bundle.stage(_new(bundle, 10), version=4, ttl=0.05)
    assert bundle._sessions.prebuilt is not None and bundle._sessions.prebuilt[0] == 4
    time.sleep(0.1)
    assert bundle.staged_versions() == [] and bundle._sessions.prebuilt is None
    assert bundle.infer({"x": X})[1] == 0


def test_aborted_number_restaged_with_other_weights_serves_the_new_ones(bundle):
    """The packed copy built while staging is keyed by number: an abort must not leave it for a re-stage."""
    w1, w2 = _new(bundle, 11), _new(bundle, 12)
    bundle.stage(w1, version=3)
    bundle.abort(3)
    bundle.stage(w2, version=3)
    bundle.activate(3)
    ref = zoo.ort_run(zoo.with_weights(MODEL, w2), {"x": X})["y"]
    y, v = bundle.infer({"x": X})
    assert v == 3
    np.testing.assert_allclose(y["y"], ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
