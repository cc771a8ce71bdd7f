"""Under load: client threads inferring while updates stream in; p50/p99, failures, torn responses."""

from __future__ import annotations


import os
import threading
import time

import numpy as np


from weightbundle import zoo
import weightbundle as wb
from weightbundle.client import WeightClient
from .common import (
    Artifact,
    P4_MODES,
    MODE_LABEL,
    P4_SCALES,
    Resources,
    _PRIVATE_STORES,
    add_wb_model,
    concurrent_infer,
    log,
    now,
    pct,
    quiesce,
    rotate,
    runtime_options,
)


# --------------------------------------------------------------------------- P4
P4_CALM_S = 2.5  # quiet this long before a phase: longer than a model's deferred work waits (2 s)
P4_SETTLED_S = 1.0  # the "settled" p99 leaves out responses to requests sent in a phase's first second


def p4_refs(art: Artifact, x: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Reference output per layer-0 scale state, per prepack mode, computed in-process with ORT."""
    refs = {}
    base = art.A["w0"]
    for m in P4_MODES:
        with wb.Bundle.load_from_file(art.bundle_path, runtime_options(m)) as b:
            _PRIVATE_STORES.append(b.store.path)
            b.init()
            rs = []
            for s in P4_SCALES:
                b.update({"w0": base * np.float32(s)})
                rs.append(b.infer({"x": x})[0]["y"])
            refs[m] = rs
    # cross-check against plain ORT on the edited model, so the references are not self-referential
    y = zoo.ort_run(zoo.with_weights(art.model, {"w0": base * np.float32(P4_SCALES[2])}), {"x": x})["y"]
    np.testing.assert_allclose(refs["T"][2], y, rtol=1e-4, atol=1e-5)
    return refs


class P4Model:
    """State of one model under P4: which layer-0 scale each version number carries."""

    def __init__(self, url: str, model: str, secret: str, art: Artifact):
        self.url, self.model, self.secret = url, model, secret
        with WeightClient(url, model, secret=secret) as wc:
            self.version = wc.status(checksums=False)["version"]
        self.state_of = {self.version: 0}
        self.state = 0
        self.w0 = [art.A["w0"] * np.float32(s) for s in P4_SCALES]


def p4_phase(m: P4Model, x: np.ndarray, refs: list[np.ndarray], seconds: float, clients: int, period: float | None) -> dict:
    stop = threading.Event()
    lock = threading.Lock()
    lat: list[float] = []
    settled: list[float] = []  # latencies of requests sent P4_SETTLED_S or more into the phase
    failed: list[str] = []
    torn: list[str] = []
    exact = [0]
    unknown = [0]
    upd_lat: list[float] = []
    upd_fail: list[str] = []
    scale = max(float(np.abs(r).max()) for r in refs)

    def reader() -> None:
        wc = WeightClient(m.url, m.model)
        mine, late, bad, ex, unk, fails = [], [], [], 0, 0, []
        try:
            while not stop.is_set():
                t0 = now()
                try:
                    out, v = wc.infer({"x": x})
                except Exception as e:  # noqa: BLE001 - every failure counts, with its reason
                    fails.append(f"{type(e).__name__}: {e}"[:300])  # tritonclient exceptions repr() without their message
                    continue
                mine.append(now() - t0)
                if t0 - t_start >= P4_SETTLED_S:
                    late.append(mine[-1])
                k = m.state_of.get(v)
                if k is None:
                    unk += 1
                    continue
                y = out["y"]
                if np.array_equal(y, refs[k]):
                    ex += 1
                elif not np.max(np.abs(y - refs[k])) <= 1e-4 * scale:
                    others = [j for j, r in enumerate(refs) if np.max(np.abs(y - r)) <= 1e-4 * scale]
                    bad.append(f"version {v} (state {k}) answered like state(s) {others}")
        finally:
            wc.close()
            with lock:
                lat.extend(mine)
                settled.extend(late)
                torn.extend(bad)
                failed.extend(fails)
                exact[0] += ex
                unknown[0] += unk

    def updater() -> None:
        wc = WeightClient(m.url, m.model, secret=m.secret)
        nxt = now()
        try:
            while not stop.is_set():
                delay = nxt - now()
                if delay > 0 and stop.wait(delay):
                    break
                k = (m.state + 1) % len(P4_SCALES)
                m.state_of[m.version + 1] = k  # before sending: a reader may see it before the ack
                t0 = now()
                try:
                    r = wc.update({"w0": m.w0[k]}, via="shm", expected_version=m.version)
                except Exception as e:  # noqa: BLE001
                    upd_fail.append(f"{type(e).__name__}: {e}"[:300])
                else:
                    upd_lat.append(now() - t0)
                    m.version, m.state = r.version, k
                nxt = max(nxt + period, now())
        finally:
            wc.close()

    threads = [threading.Thread(target=reader, daemon=True) for _ in range(clients)]
    if period is not None:
        threads.append(threading.Thread(target=updater, daemon=True))
    t_start = now()  # the updater sends its first update at once
    for t in threads:
        t.start()
    try:
        stop.wait(seconds)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    wall = now() - t_start
    return {
        "lat_s": lat,
        "settled_lat_s": settled,
        "failed": failed,
        "torn": torn,
        "exact": exact[0],
        "unknown": unknown[0],
        "updates": len(upd_lat),
        "update_failed": upd_fail,
        "update_lat_s": upd_lat,
        "wall_s": wall,
    }


def p4(res: Resources, art: Artifact, env: dict, secret: str, x: np.ndarray, seconds: float, clients: int, period: float, instances: int) -> dict:
    refs = p4_refs(art, x)
    repo = res.tempdir("wb-bench-p4-")
    r = os.path.join(repo, "repo")
    os.makedirs(r)
    for m in P4_MODES:
        add_wb_model(r, f"m{m}", art, instances, **P4_MODES[m])
    srv = res.start_server(r, env, "p4")
    try:
        state = {m: P4Model(srv.http_url, f"m{m}", secret, art) for m in P4_MODES}
        for m in P4_MODES:
            concurrent_infer(srv.http_url, f"m{m}", x, threads=clients, per_thread=2)
        phases = [(m, upd) for m in P4_MODES for upd in (False, True)]
        acc: dict[str, list[dict]] = {f"{m}:{'updates' if u else 'no updates'}": [] for m, u in phases}
        halves = 2
        for h in range(halves):
            for m, upd in rotate(phases, h):
                quiesce(srv.pid, calm=P4_CALM_S)  # the last phase's deferred work must not land in this one
                ph = p4_phase(state[m], x, refs[m], seconds / halves, clients, period if upd else None)
                acc[f"{m}:{'updates' if upd else 'no updates'}"].append(ph)
                log(
                    f"P4 {MODE_LABEL[m]} {'updates' if upd else 'no updates'}: {len(ph['lat_s'])} responses, "
                    f"{ph['updates']} updates, {len(ph['failed'])} failed, {len(ph['torn'])} torn"
                )
                time.sleep(0.3)
        out = {}
        for key, parts in acc.items():
            lat = [v for p in parts for v in p["lat_s"]]
            late = [v for p in parts for v in p["settled_lat_s"]]
            upd = [v for p in parts for v in p["update_lat_s"]]
            wall = sum(p["wall_s"] for p in parts)
            out[key] = {
                "responses": len(lat),
                "throughput_rps": len(lat) / wall if wall else float("nan"),
                "p50_ms": pct(lat, 50) * 1e3,
                "p99_ms": pct(lat, 99) * 1e3,
                "settled_p99_ms": pct(late, 99) * 1e3,
                "max_ms": max(lat) * 1e3 if lat else float("nan"),
                "failed": sum(len(p["failed"]) for p in parts),
                "failed_examples": [e for p in parts for e in p["failed"]][:5],
                "torn": sum(len(p["torn"]) for p in parts),
                "torn_examples": [e for p in parts for e in p["torn"]][:5],
                "bitwise_equal": sum(p["exact"] for p in parts),
                "unknown_version": sum(p["unknown"] for p in parts),
                "updates": len(upd),
                "updates_per_s": len(upd) / wall if wall else 0.0,
                "update_failed": sum(len(p["update_failed"]) for p in parts),
                "update_failed_examples": [e for p in parts for e in p["update_failed"]][:5],
                "update_ack_p50_ms": pct(upd, 50) * 1e3,
                "update_ack_p99_ms": pct(upd, 99) * 1e3,
                "seconds": wall,
                "lat_s": lat,
            }
        return out
    finally:
        res.stop_server(srv)
