"""Publish to and stage from a real S3-compatible server (SeaweedFS on 127.0.0.1), in-process Service."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
from safetensors.numpy import save_file

from weightbundle import zoo
import weightbundle as wb
from s3_util import ACCESS_KEY, SECRET_KEY, running_seaweed
from weightbundle import objectstore as osx
from weightbundle.objectstore import ObjectStoreError
from weightbundle.serving import Service, ServingSettings

SECRET = "t0ps3cret"
MODEL = zoo.mlp(sizes=(16, 32, 8))
X = np.random.default_rng(11).standard_normal((2, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def s3():
    with running_seaweed() as srv:
        yield srv


@pytest.fixture
def creds(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)


def weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in zoo.initializers(MODEL).items()}


def ckpt(tmp_path, w: dict[str, np.ndarray], name: str = "ckpt") -> str:
    p = str(tmp_path / f"{name}.safetensors")
    save_file(w, p)
    return p


def open_service(tmp_path, s3, bucket: str, **params: str) -> Service:
    d = tmp_path / "repo" / "m"
    if not d.exists():
        (d / "1").mkdir(parents=True)
        wb.save_bundle(d / "1" / "model.bundle", wb.build_bundle(wb.convert(MODEL)))
        (tmp_path / "shm").mkdir()
    p = {
        "allow_updates": "true",
        "update_secret_env": "WB_TEST_SECRET",
        "store_root": str(tmp_path / "shm"),
        "s3_endpoint": s3.endpoint,
        "s3_allowed_prefixes": f"{bucket}/fleet",
        **params,
    }
    cfg = {"max_batch_size": 0, "parameters": {k: {"string_value": v} for k, v in p.items()}}
    os.environ["WB_TEST_SECRET"] = SECRET
    return Service.open(str(d), 1, ServingSettings.from_model_config(cfg), "m")


def cmd(svc: Service, **body) -> dict:
    body.setdefault("secret", SECRET)
    [r] = svc.handle([{"CONTROL": np.array([json.dumps(body).encode()], dtype=object)}])
    assert r.error is None, r.error
    return json.loads(r.outputs["CONTROL_RESULT"][0])


def err(svc: Service, **body) -> str:
    body.setdefault("secret", SECRET)
    [r] = svc.handle([{"CONTROL": np.array([json.dumps(body).encode()], dtype=object)}])
    assert r.error, f"expected an error for {body}"
    return r.error


def infer(svc: Service) -> tuple[np.ndarray, int]:
    [r] = svc.handle([{"x": X}])
    assert r.error is None, r.error
    return r.outputs["y"], int(r.outputs["WEIGHTS_VERSION"][0])


def ref(w: dict[str, np.ndarray]) -> np.ndarray:
    return zoo.ort_run(zoo.with_weights(MODEL, w), {"x": X})["y"]


def test_publish_layout_manifest_and_no_overwrite(s3, tmp_path):
    c, b = s3.client(), s3.bucket()
    dest = osx.parse_url(f"s3://{b}/fleet")
    seen = []
    r = osx.publish(c, ckpt(tmp_path, weights(1)), dest, "m", 1, progress=lambda d, t: seen.append((d, t)))
    assert r.version == 1 and r.parent is None and len(r.uploaded) == 1 and seen[-1][0] == seen[-1][1]
    keys = sorted(o["Key"] for o in c.list_objects_v2(Bucket=b)["Contents"])
    assert keys[-1] == "fleet/m/v1/manifest.json" and keys[0].startswith("fleet/m/v1/") and keys[0].endswith(".safetensors")
    m = osx.read_manifest(c, dest.child("m"), 1)
    assert set(m["tensors"]) == set(weights(1)) and m["parent"] is None
    assert all(len(o["sha256"]) == 64 for o in m["objects"].values())
    with pytest.raises(ObjectStoreError, match="already published"):
        osx.publish(c, ckpt(tmp_path, weights(2)), dest, "m", 1)
    assert osx.published_versions(c, dest.child("m")) == [1]


def test_two_publishers_racing_for_one_version_exactly_one_wins(s3, tmp_path):
    c, b = s3.client(), s3.bucket()
    dest = osx.parse_url(f"s3://{b}/fleet")
    paths = [ckpt(tmp_path, weights(10 + i), f"p{i}") for i in range(2)]
    barrier, outcome = threading.Barrier(2), [None, None]

    def run(i: int) -> None:
        barrier.wait()
        try:
            outcome[i] = osx.publish(s3.client(), paths[i], dest, "m", 5)
        except ObjectStoreError as e:
            outcome[i] = e

    ts = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    wins = [o for o in outcome if isinstance(o, osx.PublishResult)]
    assert len(wins) == 1, outcome
    assert "already published" in str([o for o in outcome if isinstance(o, ObjectStoreError)][0]) or "published by someone else" in str(
        [o for o in outcome if isinstance(o, ObjectStoreError)][0]
    )
    # the loser left no objects behind; the manifest names only the winner's
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=b)["Contents"]]
    m = osx.read_manifest(c, dest.child("m"), 5)
    assert sorted(k for k in keys if k.endswith(".safetensors")) == sorted(f"fleet/m/{k}" for k in m["objects"])


def test_stage_activate_from_s3_and_delta_fetches_only_the_changed_tensor(s3, tmp_path, creds):
    c, b = s3.client(), s3.bucket()
    dest = osx.parse_url(f"s3://{b}/fleet")
    w1 = weights(1)
    osx.publish(c, ckpt(tmp_path, w1, "v1"), dest, "m", 1)
    w2 = dict(w1, **{"fc1.weight": weights(2)["fc1.weight"]})
    r2 = osx.publish(c, ckpt(tmp_path, w2, "v2"), dest, "m", 2, delta_from=1)
    nbytes = w2["fc1.weight"].nbytes
    assert r2.parent == 1 and nbytes <= r2.uploaded_bytes < nbytes + 1024  # only that tensor travelled
    svc = open_service(tmp_path, s3, b)
    try:
        st = cmd(svc, op="stage", source={"s3": f"s3://{b}/fleet/m/v1"})
        assert st["staged_version"] == 1 and st["version"] == 0 and infer(svc)[1] == 0
        assert [s["version"] for s in cmd(svc, op="status", checksums=False)["staged"]] == [1]
        assert cmd(svc, op="activate", version=1, expected_version=0)["version"] == 1
        y, v = infer(svc)
        assert v == 1
        np.testing.assert_allclose(y, ref(w1), rtol=1e-5, atol=1e-6 * np.abs(ref(w1)).max())
        st2 = cmd(svc, op="stage", source={"s3": f"s3://{b}/fleet/m/v2"})
        assert st2["staged"] == ["fc1.weight"] and st2["base"] == 1 and nbytes <= st2["fetched_bytes"] < nbytes + 1024
        cmd(svc, op="activate", version=2)
        y, v = infer(svc)
        assert v == 2
        np.testing.assert_allclose(y, ref(w2), rtol=1e-5, atol=1e-6 * np.abs(ref(w2)).max())
        assert cmd(svc, op="status", checksums=False)["staged"] == []
    finally:
        svc.close()


def _checksums(svc: Service) -> dict:
    return cmd(svc, op="status")["checksums"]


def test_corrupt_object_bad_manifest_allowlist_and_credentials_change_nothing(s3, tmp_path, creds, monkeypatch):
    c, b = s3.client(), s3.bucket()
    dest = osx.parse_url(f"s3://{b}/fleet")
    osx.publish(c, ckpt(tmp_path, weights(1)), dest, "m", 1)
    osx.publish(c, ckpt(tmp_path, weights(2), "b"), dest, "m", 2)
    svc = open_service(tmp_path, s3, b)
    try:
        before = _checksums(svc)
        # corrupt object: same size, one byte flipped
        m = osx.read_manifest(c, dest.child("m"), 2)
        key = f"fleet/m/{next(iter(m['objects']))}"
        data = bytearray(c.get_object(Bucket=b, Key=key)["Body"].read())
        data[-1] ^= 0xFF
        c.put_object(Bucket=b, Key=key, Body=bytes(data))
        assert "failed verification" in err(svc, op="stage", source={"s3": f"s3://{b}/fleet/m/v2"})
        # a manifest that does not fit the model
        bad = dict(m, version=3, tensors={**m["tensors"], "nope.weight": next(iter(m["tensors"].values()))})
        c.put_object(Bucket=b, Key="fleet/m/v3/manifest.json", Body=json.dumps(bad).encode())
        assert "does not fit this model" in err(svc, op="stage", source={"s3": f"s3://{b}/fleet/m/v3"})
        c.put_object(Bucket=b, Key="fleet/m/v4/manifest.json", Body=b"{not json")
        assert "not valid JSON" in err(svc, op="stage", source={"s3": f"s3://{b}/fleet/m/v4"})
        # a missing object
        m1 = osx.read_manifest(c, dest.child("m"), 1)
        c.delete_object(Bucket=b, Key=f"fleet/m/{next(iter(m1['objects']))}")
        assert "not found" in err(svc, op="stage", source={"s3": f"s3://{b}/fleet/m/v1"})
        # outside the allowlist
        assert "outside the allowed" in err(svc, op="stage", source={"s3": f"s3://{b}/other/m/v1"})
        assert "outside the allowed" in err(svc, op="stage", source={"s3": f"s3://{b}-x/fleet/m/v1"})
        assert "'..'" in err(svc, op="stage", source={"s3": f"s3://{b}/fleet/../m/v1"})
        assert cmd(svc, op="status", checksums=False)["staged"] == [] and _checksums(svc) == before
        assert infer(svc)[1] == 0
    finally:
        svc.close()
    # credentials: missing, then wrong
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    svc = open_service(tmp_path, s3, b)
    try:
        assert "no S3 credentials" in err(svc, op="stage", source={"s3": f"s3://{b}/fleet/m/v2"})
    finally:
        svc.close()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    svc = open_service(tmp_path, s3, b)
    try:
        assert "refused the credentials" in err(svc, op="stage", source={"s3": f"s3://{b}/fleet/m/v2"})
        assert _checksums(svc) == before
    finally:
        svc.close()
    # a credentials file named by a parameter works without the environment
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    cf = tmp_path / "s3creds"
    cf.write_text(f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n")
    svc = open_service(tmp_path, s3, b, s3_credentials_file=str(cf))
    try:
        osx.publish(c, ckpt(tmp_path, weights(5), "c"), dest, "m", 5)
        assert cmd(svc, op="stage", source={"s3": f"s3://{b}/fleet/m/v5"})["staged_version"] == 5
        assert cmd(svc, op="abort", version=5)["aborted"] == 5
        # keys rotated in the file: the next stage uses the new ones (here: wrong ones), no restart
        cf.write_text(f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = rotated-wrong\n")
        assert "refused the credentials" in err(svc, op="stage", source={"s3": f"s3://{b}/fleet/m/v5"})
    finally:
        svc.close()


def test_catch_up_at_open_and_active_pointer(s3, tmp_path, creds):
    c, b = s3.client(), s3.bucket()
    dest = osx.parse_url(f"s3://{b}/fleet")
    mu = dest.child("m")
    w3 = weights(3)
    osx.publish(c, ckpt(tmp_path, w3), dest, "m", 3)
    assert osx.read_active(c, mu) is None
    osx.write_active(c, mu, 3, None)
    a = osx.read_active(c, mu)
    assert a.version == 3 and a.history == []
    with pytest.raises(ObjectStoreError, match="changed meanwhile"):
        osx.write_active(c, mu, 4, None)  # someone else created it first
    svc = open_service(tmp_path, s3, b, weights_source=f"s3://{b}/fleet/m")
    try:
        y, v = infer(svc)
        assert v == 3
        np.testing.assert_allclose(y, ref(w3), rtol=1e-5, atol=1e-6 * np.abs(ref(w3)).max())
        assert svc.catch_up() is None  # already there
    finally:
        svc.close()


def test_urls_allowlist_and_manifest_validation_without_a_server():
    u = osx.parse_url("s3://bkt/a/b/m/v12/")
    assert (u.bucket, u.key) == ("bkt", "a/b/m/v12") and osx.split_version_url(u) == (osx.S3Url("bkt", "a/b/m"), 12)
    for bad in ("http://x/y", "s3://", "s3://b/../x", "s3://b/./x", 3):
        with pytest.raises(ObjectStoreError):
            osx.parse_url(bad)
    with pytest.raises(ObjectStoreError, match="does not name a version"):
        osx.split_version_url(osx.parse_url("s3://b/p/m"))
    osx.check_allowed(osx.parse_url("s3://bkt/team/m/v1"), ["other", "bkt/team"])
    osx.check_allowed(osx.parse_url("s3://bkt/anything/v1"), ["bkt"])
    for url in ("s3://bkt/teamx/m/v1", "s3://bkt2/team/m/v1", "s3://bkt/m/v1"):
        with pytest.raises(ObjectStoreError, match="outside the allowed"):
            osx.check_allowed(osx.parse_url(url), ["bkt/team"])
    with pytest.raises(ObjectStoreError, match="disabled"):
        osx.check_allowed(osx.parse_url("s3://bkt/team"), [])
    good = {
        "format": osx.FORMAT,
        "version": 1,
        "tensors": {"w": {"dtype": "F32", "shape": [2], "sha256": "0" * 64, "object": "o"}},
        "objects": {"o": {"sha256": "1" * 64, "size": 8}},
    }
    osx.validate_manifest(good, "here", 1)
    with pytest.raises(ObjectStoreError, match="does not match its location"):
        osx.validate_manifest(good, "here", 2)
    with pytest.raises(ObjectStoreError, match="needs dtype"):
        osx.validate_manifest({**good, "tensors": {"w": {"dtype": "F32", "shape": [2], "sha256": "0", "object": "missing"}}}, "here")
    with pytest.raises(ObjectStoreError, match="shape"):
        osx.check_fits(good, {"w": (np.dtype("float32"), (3,))}, "here")


def test_follow_mode_stages_and_activates_what_active_names(s3, tmp_path, creds):
    import time

    c, b = s3.client(), s3.bucket()
    dest = osx.parse_url(f"s3://{b}/fleet")
    svc = open_service(tmp_path, s3, b, weights_source=f"s3://{b}/fleet/m", follow_seconds="0.2")
    try:
        assert infer(svc)[1] == 0  # no ACTIVE yet: the bundle's initial weights
        w = weights(6)
        osx.publish(c, ckpt(tmp_path, w), dest, "m", 6)
        osx.write_active(c, dest.child("m"), 6, None)
        deadline = time.monotonic() + 30
        while infer(svc)[1] != 6 and time.monotonic() < deadline:
            time.sleep(0.1)
        y, v = infer(svc)
        assert v == 6
        np.testing.assert_allclose(y, ref(w), rtol=1e-5, atol=1e-6 * np.abs(ref(w)).max())
    finally:
        svc.close()


def test_publish_cli_progress_and_refusal(s3, tmp_path):
    import subprocess
    import sys

    b = s3.bucket()
    path = ckpt(tmp_path, weights(7))
    env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    cmdline = [sys.executable, "-m", "weightbundle.cli", "publish", path, f"s3://{b}/fleet", "--model", "m", "--version", "7", "--endpoint", s3.endpoint]
    p = subprocess.run(cmdline, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"published s3://{b}/fleet/m/v7" in p.stdout and "100%" in p.stderr
    p = subprocess.run(cmdline, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "already published" in p.stderr
    env.pop("AWS_SECRET_ACCESS_KEY")
    p = subprocess.run(cmdline[:-3] + ["8", "--endpoint", s3.endpoint], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no S3 credentials" in p.stderr


def test_after_a_local_update_the_next_fetch_takes_every_tensor(s3, tmp_path, creds):
    """Skipping tensors relies on the served version's recorded source digests: a version
    made any other way records none, so nothing is skipped on a guess."""
    c, b = s3.client(), s3.bucket()
    dest = osx.parse_url(f"s3://{b}/fleet")
    w1 = weights(1)
    osx.publish(c, ckpt(tmp_path, w1, "v1"), dest, "m", 1)
    w10 = dict(w1, **{"fc1.weight": weights(10)["fc1.weight"]})
    osx.publish(c, ckpt(tmp_path, w10, "v10"), dest, "m", 10, delta_from=1)
    svc = open_service(tmp_path, s3, b)
    try:
        cmd(svc, op="stage", source={"s3": f"s3://{b}/fleet/m/v1"})
        cmd(svc, op="activate", version=1)
        local = {"fc0.weight": weights(99)["fc0.weight"]}  # changes a tensor v10 shares with v1
        [r] = svc.handle([{"CONTROL": np.array([json.dumps({"op": "update", "secret": SECRET}).encode()], dtype=object), **local}])
        assert r.error is None, r.error
        st = cmd(svc, op="stage", source={"s3": f"s3://{b}/fleet/m/v10"})
        assert st["staged"] == sorted(w10)  # everything fetched again
        cmd(svc, op="activate", version=10)
        y, v = infer(svc)
        assert v == 10
        np.testing.assert_allclose(y, ref(w10), rtol=1e-5, atol=1e-6 * np.abs(ref(w10)).max())
    finally:
        svc.close()


def test_bf16_checkpoint_is_cast_by_the_update_graph(s3, tmp_path, creds):
    import ml_dtypes

    c, b = s3.client(), s3.bucket()
    w = {k: v.astype(ml_dtypes.bfloat16) for k, v in weights(4).items()}
    osx.publish(c, ckpt(tmp_path, w), osx.parse_url(f"s3://{b}/fleet"), "m", 4)
    svc = open_service(tmp_path, s3, b)
    try:
        cmd(svc, op="stage", source={"s3": f"s3://{b}/fleet/m/v4"})
        cmd(svc, op="activate", version=4)
        want = ref({k: v.astype(np.float32) for k, v in w.items()})
        y, v = infer(svc)
        assert v == 4
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    finally:
        svc.close()
