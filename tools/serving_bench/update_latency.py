"""Update latency per transport and mode, vs Triton's reload of the same model and the memcpy floor."""

from __future__ import annotations


import os
import shutil
import threading

import numpy as np


from weightbundle.client import WeightClient
from .common import (
    Artifact,
    MODES,
    Resources,
    TRANSPORTS,
    add_plain_model,
    add_wb_model,
    http_client,
    log,
    med,
    now,
    quiesce,
    rotate,
    wait_version,
    write_plain_version,
)


# --------------------------------------------------------------------------- P1 + P2 (Triton)
class P1Server:
    """One server with, per size: a wb model per prepack mode + a plain baked model for reloads."""

    def __init__(self, res: Resources, arts: list[Artifact], env: dict, secret: str):
        self.res, self.arts, self.secret = res, arts, secret
        self.work = res.tempdir("wb-bench-p1-")
        self.repo = os.path.join(self.work, "repo")
        self.allowed = os.path.join(self.work, "allowed")  # /tmp: page cache (a fresh tmpfs file pays first-touch page faults)
        os.makedirs(self.repo)
        os.makedirs(self.allowed)
        names = []
        for a in arts:
            for m in MODES:
                add_wb_model(self.repo, f"wb{a.layers}{m}", a, 1, file_update_dirs=self.allowed, **MODES[m])
                names.append(f"wb{a.layers}{m}")
            add_plain_model(self.repo, f"plain{a.layers}", a, 1)
            names.append(f"plain{a.layers}")
        log(f"P1 server: loading {len(names)} models")
        t0 = now()
        self.srv = res.start_server(self.repo, env, "p1", model_control_mode="explicit", load_models=names)
        self.start_s = now() - t0
        self.c = http_client(self.srv.http_url)
        self.wc = {n: WeightClient(self.srv.http_url, n, secret=secret) for n in names if n.startswith("wb")}
        self.plain_version = {a.layers: 1 for a in arts}
        self.turn: dict[tuple[int, str], int] = {}
        self.staged: dict[tuple[int, str], tuple[WeightClient, str]] = {}  # (layers, mode) -> (client, its region)

    def next_set(self, layers: int, mode: str) -> str:
        k = self.turn.get((layers, mode), 0)
        self.turn[(layers, mode)] = k + 1
        return "B" if k % 2 == 0 else "A"  # models start at A: every push changes every value

    def stage_shm(self, art: Artifact) -> None:
        """Per model, a push region already holding the weights (a producer that writes straight
        into shm), with a client of its own so that the ``shm`` pushes do not overwrite it."""
        for mode in MODES:
            wc = WeightClient(self.srv.http_url, f"wb{art.layers}{mode}", secret=self.secret)
            self.res.clients.append(wc)
            self.staged[(art.layers, mode)] = (wc, wc._fill_region(art.B))

    def push_staged(self, layers: int, mode: str) -> int:
        wc, region = self.staged[(layers, mode)]
        return int(wc._push_region(region, None)["version"])

    def measure(self, art: Artifact, method: str, probe: np.ndarray, floor_buf: tuple[np.ndarray, np.ndarray]) -> dict:
        L = art.layers
        if method == "memcpy":
            src, dst = floor_buf
            ts = []
            for _ in range(3):  # one copy is ~10 ms: take the middle of three per visit
                t0 = now()
                np.copyto(dst, src)
                ts.append(now() - t0)
            return {"total": med(ts)}
        if method == "reload":
            v = self.plain_version[L] + 1
            name = f"plain{L}"
            t0 = now()
            write_plain_version(self.repo, name, v, art.onnx["B" if v % 2 == 0 else "A"])
            t_write = now() - t0
            t0 = now()
            self.c.load_model(name)
            t_ack = now() - t0
            probes = wait_version(self.c, name, probe, v)
            total = now() - t0
            self.plain_version[L] = v
            for old in os.listdir(os.path.join(self.repo, name)):  # the old version is unloaded now
                if old.isdigit() and int(old) < v:
                    shutil.rmtree(os.path.join(self.repo, name, old), ignore_errors=True)
            return {"total": total, "ack": t_ack, "client_write": t_write, "probes": probes}
        via, mode = method.split(":")
        model = f"wb{L}{mode}"
        wc = self.wc[model]
        out: dict[str, float] = {}
        if via == "shm-staged":
            t0 = now()
            v = self.push_staged(L, mode)
        elif via == "file":
            from safetensors.numpy import save_file

            path = os.path.join(self.allowed, f"w{L}{mode}.safetensors")
            t0 = now()
            save_file(art.weights(self.next_set(L, mode)), path)
            out["client_write"] = now() - t0
            t0 = now()
            v = wc.push_file(path, via="file").version
        else:
            weights = art.weights(self.next_set(L, mode))
            t0 = now()
            v = wc.update(weights, via=via).version
        out["ack"] = now() - t0
        out["probes"] = wait_version(self.c, model, probe, v)
        out["total"] = now() - t0
        return out

    def p1(self, reps: int) -> dict:
        methods = ["memcpy", "reload"] + [f"{t}:{m}" for m in MODES for t in TRANSPORTS]
        for a in self.arts:
            self.stage_shm(a)
        raw: dict[str, dict[str, list[dict]]] = {a.label: {m: [] for m in methods} for a in self.arts}
        probe = {a.layers: np.random.default_rng(7).standard_normal((1, a.n)).astype(np.float32) for a in self.arts}
        # Warm every path once at the smallest size (connections, first-call costs), and each
        # model's update graph session with one push.
        for m in methods:
            self.measure(self.arts[0], m, probe[self.arts[0].layers], self._floor(self.arts[0]))
        for a in self.arts[1:]:
            for mode in MODES:
                self.measure(a, f"shm-staged:{mode}", probe[a.layers], None)
        for r in range(reps):
            for si, a in enumerate(self.arts):
                t0 = now()
                buf = self._floor(a)
                for m in rotate(methods, r + si):
                    quiesce(self.srv.pid)  # the previous push's background work (session build, staging) is done
                    raw[a.label][m].append(self.measure(a, m, probe[a.layers], buf))
                log(f"P1 round {r + 1}/{reps} {a.label}: {now() - t0:.1f} s")
                del buf
        summary = {}
        for a in self.arts:
            s = {}
            for m in methods:
                rows = raw[a.label][m]
                s[m] = {k: med([row[k] for row in rows]) * (1 if k == "probes" else 1e3) for k in rows[0] if k != "probes"}
                s[m]["probes_max"] = max(row.get("probes", 1) for row in rows)
            summary[a.label] = s
        return {"methods": methods, "raw_s": raw, "median_ms": summary, "bytes": {a.label: a.nbytes for a in self.arts}}

    def _floor(self, a: Artifact) -> tuple[np.ndarray, np.ndarray]:
        src = np.ones(a.nbytes // 4, np.float32)
        dst = np.empty_like(src)
        dst.fill(0.0)  # pre-faulted: writing touches every page (np.zeros could hand out lazy zero pages)
        return src, dst

    def stop_async(self) -> threading.Thread:
        """Release client-side things now; the server's shutdown (seconds) runs in a thread."""
        self._release_clients()
        return self.res.stop_server_async(self.srv)

    def _release_clients(self) -> None:
        for wc in self.wc.values():
            wc.close()
        for wc, _ in self.staged.values():
            wc.close()
        self.c.close()
