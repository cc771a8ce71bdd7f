"""Streams of partial updates: one pinned session serves them all, the staging blob has room
for what the updates write, and the history moves to disk once the stream pauses."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import weightbundle as wb
from weightbundle import packing, sessions, updater, zoo

MLP = zoo.mlp()  # fc0.weight is 27% of the bytes inference reads, fc1.weight 55%
CONV = zoo.convnet(channels=(3, 16, 32))
X_MLP = {"x": np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)}
X_CONV = {"x": np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)}


@pytest.fixture
def streaming(monkeypatch):
    """Every update counts as part of a stream, whatever the pace of this machine."""
    monkeypatch.setattr(sessions, "STREAM_GAP_S", 3600.0)
    monkeypatch.setattr(updater, "STREAM_GAP_S", 3600.0)


@pytest.fixture
def load():
    loaded: list[wb.Bundle] = []

    def _load(model, options=None, **convert):
        b = wb.Bundle.load_from_mem(wb.build_bundle(wb.convert(model, **convert)), options)
        loaded.append(b)
        return b

    yield _load
    for b in loaded:
        b.unload()


class Held:
    """Keep the fully packed session from replacing the pinned one (as if the stream never
    settled) until ``release()``.  Install once the version after init is fully packed."""

    def __init__(self, b: wb.Bundle):
        assert b._sessions.builder.wait_idle(60)
        self.b, self.released = b, False
        build = b._sessions.builder._build
        b._sessions.builder._build = lambda v: build(v) if self.released else None

    def release(self) -> None:
        self.released = True
        self.b._sessions.builder.request(self.b.store.current())
        assert self.b._sessions.builder.wait_idle(60)


def wait_pinned(b: wb.Bundle, feeds: dict, timeout: float = 60.0) -> sessions.Served:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b.infer(feeds)
        cur = b._sessions.current
        if cur is not None and cur.feeds:
            return cur
        time.sleep(0.02)
    raise AssertionError("no pinned session within the timeout")


def packed_files(b: wb.Bundle) -> list[str]:
    return sorted(f for f in os.listdir(b.store.packed_path) if f.startswith(packing.PREFIX))


def assert_close(got: np.ndarray, ref: np.ndarray) -> None:
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 + 1e-5 * scale)


def check(b: wb.Bundle, model, weights: dict, feeds: dict, version: int) -> None:
    out, v = b.infer(feeds)
    assert v == version
    ref = zoo.ort_run(zoo.with_weights(model, weights), feeds)
    for k in ref:
        assert_close(out[k], ref[k])


@pytest.mark.parametrize("compile_once", [True, False])
def test_partial_updates_are_served_by_one_pinned_session(load, compile_once):
    """A partial update is pinned first (no stream needed); the versions after it reuse the pin."""
    b = load(MLP, wb.RuntimeOptions(compile_once=compile_once))
    w = zoo.initializers(MLP)
    b.init()
    b.infer(X_MLP)
    held = Held(b)
    rng = np.random.default_rng(2)
    w["fc0.weight"] = rng.standard_normal(w["fc0.weight"].shape).astype(np.float32)
    v = b.update({"fc0.weight": w["fc0.weight"]})
    pinned = wait_pinned(b, X_MLP)
    check(b, MLP, w, X_MLP, v)
    fed = set(pinned.feeds)
    assert len(fed) == 1 and pinned.session is b._sessions._pin.session  # the one weight the stream changes
    shared = b._sessions._pin.shared
    for _ in range(4):  # every later version of the stream: the same session, no build
        w["fc0.weight"] = rng.standard_normal(w["fc0.weight"].shape).astype(np.float32)
        v = b.update({"fc0.weight": w["fc0.weight"]})
        check(b, MLP, w, X_MLP, v)
        cur = b._sessions.current
        assert cur.version == v and cur.session is pinned.session and set(cur.feeds) == fed
    b._updater.settle()  # the updates' collection has run: the packed copy pins load over stays
    assert packed_files(b) == ["packed-v0.data", "packed-v0.onnx"]
    held.release()  # the stream settles: the version's fully packed session replaces the pin
    assert packed_files(b) == [f"packed-v{v}.data", f"packed-v{v}.onnx"]  # and the older copy goes
    cur, standby = b._sessions.current, b._sessions._pin
    assert cur.version == v and not cur.feeds and cur.session is not pinned.session
    # Compiled once, the pin maps the store's shared packed copy, and a standby pin with the
    # same fed weight waits over the new packed copy; else the pin packed privately, and goes.
    assert shared == compile_once
    assert (standby is not None and standby.shared and standby.fed == {"fc0.weight"}) if compile_once else standby is None
    check(b, MLP, w, X_MLP, v)


def test_the_next_stream_is_pinned_from_its_first_version(load, monkeypatch):
    """Once a stream settles, a standby pin waits over the packed copy: a later stream of
    the same weight is served pinned from its first update, with no pin built for it."""
    b = load(MLP, wb.RuntimeOptions())
    logs: list[str] = []
    b._log = lambda m, level="warn": logs.append(m)
    w = zoo.initializers(MLP)
    b.init()
    b.infer(X_MLP)
    assert b._sessions.builder.wait_idle(60)
    rng = np.random.default_rng(6)
    for stream in range(3):
        for i in range(3):
            w["fc0.weight"] = rng.standard_normal(w["fc0.weight"].shape).astype(np.float32)
            v = b.update({"fc0.weight": w["fc0.weight"]})
            if stream and not i:  # before the builder could build anything: the standby serves
                cur, standby = b._sessions.current, b._sessions._pin
                assert cur.version == v and cur.feeds and cur.session is standby.session
            check(b, MLP, w, X_MLP, v)
        if not stream:
            wait_pinned(b, X_MLP)
        assert b._sessions.builder.wait_idle(60)  # settles (the pause), then loads the standby
        pin, cur = b._sessions._pin, b._sessions.current
        assert pin is not None and pin.shared and not pin.used and cur.version == v and not cur.feeds
    built = [m for m in logs if "served by a session pinned over the shared packed copy" in m]
    standby = [m for m in logs if "served by the standby pinned session" in m]
    assert len(built) == 1 and len(standby) == 2, logs
    # A full update is not served by the standby, and a standby that served nothing is not renewed.
    w = {n: rng.standard_normal(a.shape).astype(np.float32) for n, a in w.items()}
    v = b.update(w)
    check(b, MLP, w, X_MLP, v)
    assert b._sessions.builder.wait_idle(60)
    assert b._sessions._pin is None and not b._sessions.current.feeds


def test_a_pin_packs_privately_when_the_shared_copy_is_gone(load, streaming):
    b = load(MLP, wb.RuntimeOptions())
    w = zoo.initializers(MLP)
    b.init()
    b.infer(X_MLP)
    held = Held(b)
    for f in os.listdir(b.store.packed_path):  # as if collected by a newer pack
        os.unlink(os.path.join(b.store.packed_path, f))
    w["fc0.weight"] = (w["fc0.weight"] * np.float32(3)).astype(np.float32)
    v = b.update({"fc0.weight": w["fc0.weight"]})
    pinned = wait_pinned(b, X_MLP)
    assert not b._sessions._pin.shared and set(pinned.feeds) == {"fc0.weight"}
    check(b, MLP, w, X_MLP, v)
    held.release()
    check(b, MLP, w, X_MLP, v)


def test_a_stream_right_after_a_full_update_pins_over_the_newest_shared_copy(load, streaming, monkeypatch):
    """Another instance packed the full update's version while this one still served it
    unpacked: the pin loads over that newer copy, not privately (measured through Triton,
    4 instances, a stream started 0.3 s after a full update: one of them pinned privately)."""
    b = load(MLP, wb.RuntimeOptions())
    logs: list[str] = []
    b._log = lambda m, level="warn": logs.append(m)
    w = zoo.initializers(MLP)
    b.init()
    b.infer(X_MLP)
    held = Held(b)
    old_base = b._sessions._packed_base
    rng = np.random.default_rng(8)
    w = {n: rng.standard_normal(a.shape).astype(np.float32) for n, a in w.items()}
    full = b.update(w)
    full_entries = b.store.version(full).entries
    b._sessions._packed_session(b.store.version(full))  # "another instance" packs it ...
    b._sessions._packed_base = old_base  # ... and this one has not swapped it in
    monkeypatch.setattr(sessions, "HOT_WINDOW_S", 0.0)  # the full update is 2 s old: only the stream is hot
    for _ in range(3):
        w["fc0.weight"] = rng.standard_normal(w["fc0.weight"].shape).astype(np.float32)
        v = b.update({"fc0.weight": w["fc0.weight"]})
    wait_pinned(b, X_MLP)
    pin = b._sessions._pin
    assert pin.shared and pin.fed == {"fc0.weight"}, logs
    assert all(pin.base[n] == full_entries[n] for n in pin.base)
    check(b, MLP, w, X_MLP, v)
    held.release()
    check(b, MLP, w, X_MLP, v)


def test_a_pinned_session_is_fed_re_laid_weights(load, streaming):
    """Conv filters are re-laid (NCHWc) for the once-optimized graph: the pin feeds them re-laid."""
    b = load(CONV, wb.RuntimeOptions(), fold_bn=True)
    w = zoo.initializers(CONV)
    b.init()
    b.infer(X_CONV)
    held = Held(b)
    cg = b._sessions._compiled
    assert cg is not None
    for i in range(3):
        w["conv0.weight"] = (w["conv0.weight"] * np.float32(1.25)).astype(np.float32)
        v = b.update({"conv0.weight": w["conv0.weight"]})
        if i == 0:
            pinned = wait_pinned(b, X_CONV)
            assert any(not cg.layouts[n].identity for n in pinned.feeds)  # a re-laid filter is fed
        check(b, CONV, w, X_CONV, v)
        assert b._sessions.current.session is pinned.session
    held.release()
    check(b, CONV, w, X_CONV, v)


def test_a_stream_moving_to_another_weight_pins_again(load, streaming):
    b = load(MLP, wb.RuntimeOptions())
    w = zoo.initializers(MLP)
    b.init()
    b.infer(X_MLP)
    held = Held(b)
    w["fc0.weight"] = (w["fc0.weight"] * np.float32(2)).astype(np.float32)
    b.update({"fc0.weight": w["fc0.weight"]})
    first = wait_pinned(b, X_MLP)
    w["fc2.weight"] = (w["fc2.weight"] * np.float32(-1)).astype(np.float32)
    v = b.update({"fc2.weight": w["fc2.weight"]})
    check(b, MLP, w, X_MLP, v)  # not the pin's weights: served by a zero-copy session meanwhile
    deadline = time.monotonic() + 60
    while True:  # a new pin, holding version 2's fc2.weight or taking it as an input, serves it
        b.infer(X_MLP)
        pin, cur = b._sessions._pin, b._sessions.current
        if pin is not None and pin.session is not first.session and cur.session is pin.session:
            break
        assert time.monotonic() < deadline, "no second pin"
        time.sleep(0.02)
    assert cur.version == v and "fc0.weight" in pin.fed and pin.fed <= {"fc0.weight", "fc2.weight"} and set(cur.feeds) == pin.fed
    check(b, MLP, w, X_MLP, v)
    held.release()


def test_a_pin_that_cannot_be_built_turns_pins_off_and_serving_goes_on(load, monkeypatch):
    b = load(MLP, wb.RuntimeOptions())
    logs: list[str] = []
    b._log = lambda m, level="warn": logs.append(m)
    calls = []

    def broken(v, fed):
        calls.append(v.number)
        raise RuntimeError("no kernel for that")

    monkeypatch.setattr(b._sessions, "_pinned_session", broken)
    monkeypatch.setattr(b._sessions, "_pin_from_packed", lambda v, fed: None)  # no shared copy to load over
    w = zoo.initializers(MLP)
    b.init()
    rng = np.random.default_rng(5)
    for _ in range(3):
        w["fc0.weight"] = rng.standard_normal(w["fc0.weight"].shape).astype(np.float32)
        v = b.update({"fc0.weight": w["fc0.weight"]})
        check(b, MLP, w, X_MLP, v)
        assert b._sessions.builder.wait_idle(60)
    assert len(calls) == 1 and sum("pinned sessions are off" in m for m in logs) == 1  # tried once, said so once
    assert b._sessions._pin is None and not b._sessions.current.feeds and b.fully_optimised


@pytest.mark.parametrize(
    "options, names",
    [
        (wb.RuntimeOptions(), ["fc1.weight"]),  # 55% of the bytes: packing the rest would not pay
        (wb.RuntimeOptions(deterministic=True), ["fc0.weight"]),  # one version, one answer: no unpacked GEMMs
        (wb.RuntimeOptions(pin_hot_weights=False), ["fc0.weight"]),
        (wb.RuntimeOptions(hybrid=False), ["fc0.weight"]),
    ],
)
def test_no_pin_where_it_would_not_pay_or_is_off(load, streaming, options, names):
    b = load(MLP, options)
    w = zoo.initializers(MLP)
    b.init()
    rng = np.random.default_rng(3)
    for _ in range(4):
        for n in names:
            w[n] = rng.standard_normal(w[n].shape).astype(np.float32)
        v = b.update({n: w[n] for n in names})
        check(b, MLP, w, X_MLP, v)
        b._sessions.builder.wait_idle(60)
        assert b._sessions._pin is None and not b._sessions.current.feeds


def test_the_staging_blob_has_room_for_what_updates_wrote(load, streaming):
    """After partial updates the next staging blob allocates their variables only; an update
    of another variable still lands (its room is allocated when it claims the blob)."""
    big = zoo.big_mlp(n=512, layers=4)  # 1 MiB per layer: large enough for the staging path
    b = load(big, wb.RuntimeOptions())
    w = zoo.initializers(big)
    b.init()
    x = {"x": np.random.default_rng(4).standard_normal((2, 512)).astype(np.float32)}
    layer = w["w0"].nbytes
    for _ in range(2):
        w["w0"] = (w["w0"] * np.float32(0.5)).astype(np.float32)
        v = b.update({"w0": w["w0"]})
        check(b, big, w, x, v)
        b._updater.settle()
    staging = os.path.join(b.store.path, wb.store.STAGING)
    st = os.stat(staging)
    assert st.st_size >= 4 * layer and st.st_blocks * 512 < 2 * layer  # a full-size file, one layer allocated
    w["w3"] = (w["w3"] * np.float32(-1)).astype(np.float32)
    specs = {"w3": (w["w3"].dtype, w["w3"].shape)}
    v = b.update_direct(specs, lambda views: np.copyto(views["w3"], w["w3"]))
    assert v is not None  # the staging path, into a place the prediction left as a hole
    check(b, big, w, x, v)


def test_the_history_moves_to_disk_once_a_stream_pauses(load, streaming, tmp_path, monkeypatch):
    disk = tmp_path / "disk"
    disk.mkdir()
    monkeypatch.setenv("WEIGHTBUNDLE_PACKED_ROOT", str(disk))
    b = load(MLP, wb.RuntimeOptions())
    if os.stat(b.store.path).st_dev == os.stat(disk).st_dev:
        pytest.skip("the private store and tmp_path share one filesystem here: nothing to move")
    b.init()
    w = zoo.initializers(MLP)
    for _ in range(2):
        w["fc0.weight"] = (w["fc0.weight"] * np.float32(3)).astype(np.float32)
        b.update({"fc0.weight": w["fc0.weight"]})
    v1 = b.store.version(1).entries
    for t in list(b._updater._threads):
        t.join(30)
    twin = disk / os.path.basename(b.store.path)
    cold = lambda: {f for f in os.listdir(twin) if f.startswith("cold-")} if twin.is_dir() else set()  # noqa: E731
    assert "blob-1.bin" in os.listdir(b.store.path) and cold() == set()  # within the stream: not moved yet
    b._updater.settle()  # the stream is over: the move that waited for it is done now
    assert "blob-1.bin" not in os.listdir(b.store.path) and cold() == {"cold-blob-1.bin"}
    r = b.store.rollback()  # blob-1 comes back into the store first
    assert r.entries == v1 and "blob-1.bin" in os.listdir(b.store.path)


def test_pin_weights_pins_the_first_stream_from_its_first_update(load):
    b = load(MLP, wb.RuntimeOptions(pin_weights=("fc0.*",)))
    w = zoo.initializers(MLP)
    b.init()
    b.infer(X_MLP)
    assert b._sessions.builder.wait_idle(60)
    standby = b._sessions._pin
    assert standby is not None and standby.shared and standby.fed == {"fc0.weight", "fc0.bias"}
    w["fc0.weight"] = (w["fc0.weight"] * np.float32(-2)).astype(np.float32)
    v = b.update({"fc0.weight": w["fc0.weight"]})
    cur = b._sessions.current
    assert cur.version == v and cur.session is standby.session
    check(b, MLP, w, X_MLP, v)


@pytest.mark.parametrize(
    "options, match",
    [
        (wb.RuntimeOptions(pin_weights=("fc9.*",)), "matches no update input"),
        (wb.RuntimeOptions(pin_weights=("fc1.weight",)), "55% of the bytes"),
        (wb.RuntimeOptions(pin_weights=("fc0.weight",), deterministic=True), "needs pinned sessions"),
        (wb.RuntimeOptions(pin_weights=("fc0.weight",), compile_once=False), "needs share_packed and compile_once"),
    ],
)
def test_pin_weights_that_cannot_pin_fail_the_load_and_leave_no_store(options, match):
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(wb.BundleError, match=match):
        wb.Bundle.load_from_mem(wb.build_bundle(wb.convert(MLP)), options)
    assert set(os.listdir("/dev/shm")) - before == set()
