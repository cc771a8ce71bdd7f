"""Service routing and the control protocol, in-process (no Triton needed).

The same behaviours are exercised against a real tritonserver in test_e2e_*.py.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from weightbundle import zoo
import weightbundle as wb
from weightbundle.control import Authorizer, ControlError, parse_command
from weightbundle.serving import Service, ServingSettings

SECRET = "t0ps3cret"


def _repo(tmp_path, model=None, batching=8, **params):
    model = model or zoo.mlp()
    d = tmp_path / "repo" / "m"
    (d / "1").mkdir(parents=True)
    wb.save_bundle(d / "1" / "model.bundle", wb.build_bundle(wb.convert(model)))
    cfg = {"max_batch_size": batching, "parameters": {k: {"string_value": v} for k, v in params.items()}}
    return str(d), cfg


@pytest.fixture
def service(tmp_path, monkeypatch):
    monkeypatch.setenv("WB_TEST_SECRET", SECRET)
    d, cfg = _repo(tmp_path, allow_updates="true", update_secret_env="WB_TEST_SECRET", history="2", store_root=str(tmp_path / "shm"))
    (tmp_path / "shm").mkdir()
    svc = Service.open(d, 1, ServingSettings.from_model_config(cfg), "m")
    yield svc
    svc.close()


def ctl(**kw) -> np.ndarray:
    return np.array([[json.dumps(kw).encode()]], dtype=object)


def x(n=2, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)


def test_inference_matches_ort_and_reports_version(service):
    [r] = service.handle([{"x": x()}])
    assert r.error is None
    np.testing.assert_allclose(r.outputs["y"], zoo.ort_run(zoo.mlp(), {"x": x()})["y"], rtol=1e-5, atol=1e-6)
    assert r.outputs["WEIGHTS_VERSION"].tolist() == [[0], [0]]


def test_update_then_inference_in_one_batch_respects_order(service):
    w = np.zeros((1, 16, 32), np.float32)
    replies = service.handle([{"x": x()}, {"CONTROL": ctl(op="update", secret=SECRET), "fc0.weight": w}, {"x": x()}])
    assert [r.error for r in replies] == [None, None, None]
    assert replies[0].outputs["WEIGHTS_VERSION"].ravel().tolist() == [0, 0]
    assert replies[1].outputs["WEIGHTS_VERSION"].ravel().tolist() == [1]
    assert replies[2].outputs["WEIGHTS_VERSION"].ravel().tolist() == [1, 1]
    ref = zoo.ort_run(zoo.with_weights(zoo.mlp(), {"fc0.weight": w[0]}), {"x": x()})["y"]
    np.testing.assert_allclose(replies[2].outputs["y"], ref, rtol=1e-5, atol=1e-6)
    assert json.loads(replies[1].outputs["CONTROL_RESULT"].ravel()[0])["updated"] == ["fc0.weight"]


def test_consecutive_inference_requests_are_batched_and_split(service):
    reqs = [{"x": x(n, seed=n)} for n in (1, 3, 2)]
    replies = service.handle(reqs)
    for req, r in zip(reqs, replies):
        np.testing.assert_allclose(r.outputs["y"], zoo.ort_run(zoo.mlp(), req)["y"], rtol=1e-5, atol=1e-6)
        assert r.outputs["WEIGHTS_VERSION"].shape == (len(req["x"]), 1)


def test_bad_request_in_a_batch_does_not_fail_its_neighbours(service):
    replies = service.handle([{"x": x()}, {"x": x().astype(np.float64)}, {"x": x()}])
    assert replies[0].error is None and replies[2].error is None
    assert "dtype" in replies[1].error


@pytest.mark.parametrize(
    "control, needle",
    [
        (np.array([[b"{not json"]], dtype=object), "not valid JSON"),
        (np.array([[b'{"op": "explode"}']], dtype=object), "unknown op"),
        (np.array([[b'["update"]']], dtype=object), "JSON object"),
        (np.array([[1.0]], dtype=np.float32), "TYPE_STRING"),
        (np.array([[b'{"op":"update"}', b'{"op":"update"}']], dtype=object), "exactly one element"),
        (np.array([[b'{"op":"update","expected_version":"x"}']], dtype=object), "expected_version"),
        (np.array([[b'{"op":"update","bogus":1}']], dtype=object), "does not take"),
    ],
)
def test_malformed_commands_are_rejected_and_change_nothing(service, control, needle):
    before = service.handle([{"CONTROL": ctl(op="status", secret=SECRET)}])[0].outputs["CONTROL_RESULT"]
    [r] = service.handle([{"CONTROL": control, "fc0.weight": np.zeros((1, 16, 32), np.float32)}])
    assert r.error is not None and needle in r.error
    after = service.handle([{"CONTROL": ctl(op="status", secret=SECRET)}])[0].outputs["CONTROL_RESULT"]
    assert before.tolist() == after.tolist()


@pytest.mark.parametrize(
    "weights, needle",
    [
        ({"fc0.weight": np.zeros((1, 16, 31), np.float32)}, "shape"),
        ({"fc0.weight": np.zeros((1, 16, 32), np.int32)}, "cannot be cast"),
        ({"fc0.weight": np.zeros((2, 16, 32), np.float32)}, "leading dimension must be 1"),
        ({"x": x()}, "non-weight input"),
    ],
)
def test_bad_update_is_all_or_nothing(service, weights, needle):
    ok = {"fc1.weight": np.ones((1, 32, 32), np.float32)}
    [r] = service.handle([{"CONTROL": ctl(op="update", secret=SECRET), **ok, **weights}])
    assert r.error is not None and needle in r.error, r.error
    assert service.bundle.version == 0
    store = service.bundle.store
    np.testing.assert_array_equal(store.array(store.current(), "fc1.weight"), zoo.initializers(zoo.mlp())["fc1.weight"])


def test_secret_is_required_and_compared(service):
    w = {"fc0.weight": np.zeros((1, 16, 32), np.float32)}
    for c in (ctl(op="update"), ctl(op="update", secret="wrong"), ctl(op="reset"), ctl(op="rollback", secret="nope")):
        [r] = service.handle([{"CONTROL": c, **w}] if "update" in c[0, 0].decode() else [{"CONTROL": c}])
        assert r.error and "secret" in r.error
    assert service.bundle.version == 0
    [r] = service.handle([{"CONTROL": ctl(op="status")}])  # read-only: no secret needed
    assert r.error is None


def test_cas_reset_rollback_status(service):
    w = np.full((1, 32, 8), 0.5, np.float32)
    [r] = service.handle([{"CONTROL": ctl(op="update", secret=SECRET, expected_version=5), "fc2.weight": w}])
    assert "current version is 0" in r.error
    [r] = service.handle([{"CONTROL": ctl(op="update", secret=SECRET, expected_version=0), "fc2.weight": w}])
    assert r.error is None and service.bundle.version == 1
    st = json.loads(service.handle([{"CONTROL": ctl(op="status", secret=SECRET)}])[0].outputs["CONTROL_RESULT"].ravel()[0])
    assert st["version"] == 1 and set(st["checksums"]) == {v.name for v in service.bundle.variables}
    [r] = service.handle([{"CONTROL": ctl(op="rollback", secret=SECRET)}])
    assert r.error is None and service.bundle.version == 2
    st2 = json.loads(service.handle([{"CONTROL": ctl(op="status", secret=SECRET)}])[0].outputs["CONTROL_RESULT"].ravel()[0])
    assert st2["checksums"]["fc2.weight"] != st["checksums"]["fc2.weight"]
    [r] = service.handle([{"CONTROL": ctl(op="reset", secret=SECRET)}])
    assert r.error is None and service.bundle.version == 3
    [r] = service.handle([{"x": x()}])
    np.testing.assert_allclose(r.outputs["y"], zoo.ort_run(zoo.mlp(), {"x": x()})["y"], rtol=1e-5, atol=1e-6)


def test_an_applied_update_is_reported_applied_even_if_its_session_fails_to_build(service, monkeypatch):
    """Building the new version's session is best effort once the update is published: the reply
    must still say it was applied (the next inference builds the session again)."""

    def fail() -> None:
        raise wb.BundleError("no session today")

    monkeypatch.setattr(service.bundle._sessions, "infer_session", fail)
    [r] = service.handle([{"CONTROL": ctl(op="update", secret=SECRET), "fc0.weight": np.zeros((1, 16, 32), np.float32)}])
    assert r.error is None and r.outputs["WEIGHTS_VERSION"].ravel().tolist() == [1] and service.bundle.version == 1
    monkeypatch.undo()
    [r] = service.handle([{"x": x()}])
    assert r.error is None and r.outputs["WEIGHTS_VERSION"].ravel().tolist() == [1, 1]


def test_weight_inputs_without_control_are_refused(service):
    [r] = service.handle([{"x": x(), "fc0.weight": np.zeros((1, 16, 32), np.float32)}])
    assert "CONTROL" in r.error


def test_updates_disabled_by_default(tmp_path):
    d, cfg = _repo(tmp_path, store_root=str(tmp_path))
    svc = Service.open(d, 1, ServingSettings.from_model_config(cfg), "m")
    try:
        [r] = svc.handle([{"CONTROL": ctl(op="update", secret="x"), "fc0.weight": np.zeros((1, 16, 32), np.float32)}])
        assert "disabled" in r.error
    finally:
        svc.close()


def test_enabling_updates_without_a_secret_source_fails_loudly(tmp_path):
    d, cfg = _repo(tmp_path, allow_updates="true", store_root=str(tmp_path))
    with pytest.raises(ControlError, match="no secret"):
        Service.open(d, 1, ServingSettings.from_model_config(cfg), "m")
    d2, cfg2 = _repo(tmp_path / "b", allow_updates="true", update_secret_env="WB_SURELY_UNSET_VAR", store_root=str(tmp_path))
    with pytest.raises(ControlError, match="WB_SURELY_UNSET_VAR"):
        Service.open(d2, 1, ServingSettings.from_model_config(cfg2), "m")


def test_secret_from_file(tmp_path):
    f = tmp_path / "secret"
    f.write_text("filesecret\n")
    auth = Authorizer.from_sources(True, None, str(f))
    auth.check(parse_command(np.array([b'{"op":"update","secret":"filesecret"}'], dtype=object)))
    with pytest.raises(ControlError):
        auth.check(parse_command(np.array([b'{"op":"update","secret":"filesecre"}'], dtype=object)))


def test_unknown_parameter_is_an_error(tmp_path):
    with pytest.raises(wb.BundleError, match="unknown model config parameter"):
        ServingSettings.from_model_config({"parameters": {"alow_updates": {"string_value": "true"}}})


def test_no_init_bundle_serves_after_first_full_update(tmp_path, monkeypatch):
    monkeypatch.setenv("WB_TEST_SECRET", SECRET)
    d = tmp_path / "repo" / "m"
    (d / "1").mkdir(parents=True)
    g = wb.convert(zoo.mlp())
    wb.save_bundle(d / "1" / "model.bundle", wb.build_bundle(g, include_init=False))
    cfg = {
        "max_batch_size": 0,
        "parameters": {
            "allow_updates": {"string_value": "true"},
            "update_secret_env": {"string_value": "WB_TEST_SECRET"},
            "store_root": {"string_value": str(tmp_path)},
        },
    }
    svc = Service.open(str(d), 1, ServingSettings.from_model_config(cfg), "m")
    try:
        [r] = svc.handle([{"x": x()}])
        assert "not initialised" in r.error and r.code == "UNAVAILABLE"
        inits = zoo.initializers(zoo.mlp())
        [r] = svc.handle(
            [{"CONTROL": np.array([json.dumps({"op": "update", "secret": SECRET}).encode()], dtype=object), **{v.name: inits[v.name] for v in g.variables}}]
        )
        assert r.error is None and r.outputs["WEIGHTS_VERSION"].tolist() == [0]
        [r] = svc.handle([{"x": x()}])
        np.testing.assert_allclose(r.outputs["y"], zoo.ort_run(zoo.mlp(), {"x": x()})["y"], rtol=1e-5, atol=1e-6)
    finally:
        svc.close()


def test_two_instances_share_one_store_and_last_one_out_removes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WB_TEST_SECRET", SECRET)
    d, cfg = _repo(tmp_path, allow_updates="true", update_secret_env="WB_TEST_SECRET", store_root=str(tmp_path / "shm"))
    (tmp_path / "shm").mkdir()
    settings = ServingSettings.from_model_config(cfg)
    a = Service.open(d, 1, settings, "m")
    b = Service.open(d, 1, settings, "m")
    assert a.bundle.store.path == b.bundle.store.path
    [r] = a.handle([{"CONTROL": ctl(op="update", secret=SECRET), "fc2.bias": np.ones((1, 8), np.float32)}])
    assert r.error is None
    [r] = b.handle([{"x": x()}])
    assert r.outputs["WEIGHTS_VERSION"].ravel().tolist() == [1, 1]
    ref = zoo.ort_run(zoo.with_weights(zoo.mlp(), {"fc2.bias": np.ones(8, np.float32)}), {"x": x()})["y"]
    np.testing.assert_allclose(r.outputs["y"], ref, rtol=1e-5, atol=1e-6)
    path = a.bundle.store.path
    a.close()
    assert os.path.isdir(path)
    b.close()
    assert not os.path.exists(path)


def test_commit_writes_a_loadable_version_folder_with_the_current_weights(service):
    w = np.full((1, 32, 8), 0.25, np.float32)
    [r] = service.handle([{"CONTROL": ctl(op="update", secret=SECRET), "fc2.weight": w}])
    assert r.error is None
    [r] = service.handle([{"CONTROL": ctl(op="commit", secret=SECRET, expected_version=1)}])
    assert r.error is None, r.error
    res = json.loads(r.outputs["CONTROL_RESULT"].ravel()[0])
    assert res["model_version_folder"] == 2 and res["committed_version"] == 1
    assert sorted(os.listdir(service.model_dir)) == ["1", "2"]  # no temp folder left behind
    with wb.Bundle.load_from_file(res["path"]) as b:
        b.execute(1)
        out = b.execute(0, {"x": x()[:1]})
    ref = zoo.ort_run(zoo.with_weights(zoo.mlp(), {"fc2.weight": w[0]}), {"x": x()[:1]})["y"]
    np.testing.assert_allclose(out["y"], ref, rtol=1e-5, atol=1e-6)
    [r] = service.handle([{"CONTROL": ctl(op="commit", secret=SECRET, expected_version=0)}])
    assert "current version is 1" in r.error
    assert sorted(os.listdir(service.model_dir)) == ["1", "2"]


def test_sweep_partial_removes_only_commits_nobody_is_writing(tmp_path):
    import fcntl

    from weightbundle.repository import sweep_partial

    live = tmp_path / ".commit-999999999-abc"  # a writer holds its lock, whatever the pid says
    dead = tmp_path / f".commit-{os.getpid()}-def"  # pid alive, but nobody holds the lock: writer died
    legacy = tmp_path / ".commit-nopid"
    for d in (live, dead, legacy):
        d.mkdir()
    (tmp_path / "1").mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert sorted(sweep_partial(str(tmp_path))) == sorted([dead.name, legacy.name])
    finally:
        os.close(fd)
    assert live.exists() and (tmp_path / "1").exists()


def test_reject_nonfinite_from_config_and_per_command(tmp_path, monkeypatch):
    monkeypatch.setenv("WB_TEST_SECRET", SECRET)
    (tmp_path / "shm").mkdir()
    d, cfg = _repo(tmp_path, allow_updates="true", update_secret_env="WB_TEST_SECRET", reject_nonfinite="true", store_root=str(tmp_path / "shm"))
    svc = Service.open(d, 1, ServingSettings.from_model_config(cfg), "m")
    try:
        bad = np.ones((1, 8), np.float32)
        bad[0, 3] = np.nan
        [r] = svc.handle([{"CONTROL": ctl(op="update", secret=SECRET), "fc2.bias": bad}])
        assert "NaN or Inf" in r.error and svc.bundle.version == 0
    finally:
        svc.close()


def test_per_command_reject_nonfinite_and_status_without_checksums(service):
    inf = np.full((1, 8), np.inf, np.float32)
    [r] = service.handle([{"CONTROL": ctl(op="update", secret=SECRET, reject_nonfinite=True), "fc2.bias": inf}])
    assert "NaN or Inf" in r.error
    [r] = service.handle([{"CONTROL": ctl(op="update", secret=SECRET), "fc2.bias": inf}])  # allowed when not asked
    assert r.error is None
    st = json.loads(service.handle([{"CONTROL": ctl(op="status", checksums=False)}])[0].outputs["CONTROL_RESULT"].ravel()[0])
    assert "checksums" not in st and st["version"] == 1


def test_a_file_update_is_read_straight_into_the_store_when_nothing_needs_the_update_graph(tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    monkeypatch.setenv("WB_TEST_SECRET", SECRET)
    allowed = tmp_path / "ckpt"
    allowed.mkdir()
    (tmp_path / "shm").mkdir()
    model = zoo.big_mlp(n=512, layers=3)  # 1 MiB per weight: the staging blob applies
    params = {"allow_updates": "true", "update_secret_env": "WB_TEST_SECRET", "file_update_dirs": str(allowed), "store_root": str(tmp_path / "shm")}
    d, cfg = _repo(tmp_path, model, 0, **params)
    svc = Service.open(d, 1, ServingSettings.from_model_config(cfg), "m")
    try:
        rng = np.random.default_rng(4)
        feeds = {"x": rng.standard_normal((2, 512)).astype(np.float32)}

        def push(weights: dict, name: str) -> dict:
            path = allowed / name
            save_file(weights, str(path))
            [r] = svc.handle([{"CONTROL": ctl(op="update", secret=SECRET, source={"file": str(path)})}])
            assert r.error is None, r.error
            return json.loads(r.outputs["CONTROL_RESULT"].ravel()[0])

        first = {n: (rng.standard_normal((512, 512)) / 20).astype(np.float32) for n in ("w0", "w1")}
        assert push(first, "a.safetensors")["updated"] == ["w0", "w1"]  # no staging blob yet: through the update graph
        svc.bundle._updater.settle()
        monkeypatch.setattr(svc.bundle, "update", lambda *a, **k: pytest.fail("read the file into memory first"))
        second = {"w2": (rng.standard_normal((512, 512)) / 20).astype(np.float32)}
        r2 = push(second, "b.safetensors")
        assert r2["version"] == 2 and r2["updated"] == ["w2"]
        cur = svc.bundle.store.current()
        assert cur.number == 2
        np.testing.assert_array_equal(svc.bundle.store.array(cur, "w2"), second["w2"])
        np.testing.assert_array_equal(svc.bundle.store.array(cur, "w0"), first["w0"])
        [r] = svc.handle([feeds])
        want = zoo.ort_run(zoo.with_weights(model, {**first, **second}), feeds)["y"]
        np.testing.assert_allclose(r.outputs["y"], want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
        # a wrong shape is declined by the direct path and refused by the update graph, as before
        monkeypatch.undo()
        save_file({"w0": np.ones((512, 511), np.float32)}, str(allowed / "bad.safetensors"))
        [r] = svc.handle([{"CONTROL": ctl(op="update", secret=SECRET, source={"file": str(allowed / "bad.safetensors")})}])
        assert r.error is not None and "shape" in r.error
        assert svc.bundle.version == 2
    finally:
        svc.close()


def _shm_region(tmp_name: str, weights: dict[str, np.ndarray]) -> str:
    """A client push region in /dev/shm holding ``weights`` (as WeightClient writes it)."""
    from weightbundle.client import shm_image_layout

    header, start, size = shm_image_layout(weights)
    data = bytearray(size)
    data[: len(header)] = header
    off = start
    for a in weights.values():
        data[off : off + a.nbytes] = a.tobytes()
        off += a.nbytes
    path = os.path.join("/dev/shm", tmp_name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_an_shm_source_is_read_by_the_server_and_only_client_regions_are_opened(tmp_path, monkeypatch):
    monkeypatch.setenv("WB_TEST_SECRET", SECRET)
    (tmp_path / "shm").mkdir()
    model = zoo.big_mlp(n=512, layers=3)
    d, cfg = _repo(tmp_path, model, 0, allow_updates="true", update_secret_env="WB_TEST_SECRET", store_root=str(tmp_path / "shm"))
    svc = Service.open(d, 1, ServingSettings.from_model_config(cfg), "m")
    name = f"wbpush-{os.getpid()}-test{np.random.default_rng(0).integers(1 << 30)}"
    made: list[str] = []
    try:
        rng = np.random.default_rng(5)
        feeds = {"x": rng.standard_normal((2, 512)).astype(np.float32)}
        new = {"w1": (rng.standard_normal((512, 512)) / 20).astype(np.float32)}
        made.append(_shm_region(name, new))

        def command(source: dict) -> tuple[str | None, dict | None]:
            [r] = svc.handle([{"CONTROL": ctl(op="update", secret=SECRET, source=source)}])
            return r.error, (json.loads(r.outputs["CONTROL_RESULT"].ravel()[0]) if r.error is None else None)

        first = svc.bundle.version
        err, res = command({"shm": name})
        assert err is None and res["updated"] == ["w1"] and res["version"] == first + 1
        np.testing.assert_array_equal(svc.bundle.store.array(svc.bundle.store.current(), "w1"), new["w1"])
        [r] = svc.handle([feeds])
        want = zoo.ort_run(zoo.with_weights(model, new), feeds)["y"]
        np.testing.assert_allclose(r.outputs["y"], want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))

        # Anything but a client's wbpush-* regular file is refused, and changes nothing.
        os.symlink(made[0], f"/dev/shm/{name}-link")
        made.append(f"/dev/shm/{name}-link")
        os.mkdir(f"/dev/shm/{name}-dir")
        made.append(f"/dev/shm/{name}-dir")
        before = svc.bundle.store.current().number
        for source, needle in [
            ({"shm": "../etc/passwd"}, "must name a client push region"),
            ({"shm": f"weightbundle-{os.getpid()}-m-v1/HEAD"}, "must name a client push region"),
            ({"shm": "wbpush-a/b"}, "must name a client push region"),
            ({"shm": 7}, "must name a client push region"),
            ({"shm": f"{name}-nothere"}, "does not exist"),
            ({"shm": f"{name}-link"}, "cannot open shm region"),
            ({"shm": f"{name}-dir"}, "not a regular file"),
            ({"shm": name, "file": "/x"}, "'source' must be"),
        ]:
            err, _ = command(source)
            assert err is not None and needle in err, (source, err)
        assert svc.bundle.store.current().number == before
    finally:
        svc.close()
        for p in made:
            if os.path.isdir(p) and not os.path.islink(p):
                os.rmdir(p)
            else:
                os.unlink(p)
