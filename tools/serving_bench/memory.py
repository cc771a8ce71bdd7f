"""Memory: weight copies resident in the tritonserver process tree and /dev/shm, idle and after an update."""

from __future__ import annotations


import os
import threading
import time

import numpy as np


from weightbundle.client import WeightClient
from weightbundle.tritonserver import SHM_PATTERN, TritonServer
from .common import Artifact, MODES, MiB, Resources, add_plain_model, add_wb_model, concurrent_infer, log, quiesce, run_parallel


# --------------------------------------------------------------------------- memory (P3)
def _allocated(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def _tree_bytes(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        total += sum(_allocated(os.path.join(dirpath, f)) for f in files)
    return total


def _rollup(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for ln in f:
                k, _, rest = ln.partition(":")
                if k in ("Pss_Anon", "Pss_File", "Pss_Shmem"):
                    out[k] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def tree_memory(pid: int) -> dict:
    """tritonserver + its stubs: RSS, PSS (psutil), PSS split anon/file/shmem, and /dev/shm use.

    footprint = anon + file PSS of the tree + this server's /dev/shm bytes counted once
    (tmpfs pages that processes map show up in Pss_Shmem and in /dev/shm; this counts them once).
    """
    import psutil

    root = psutil.Process(pid)
    procs = [root] + root.children(recursive=True)
    tot = {"processes": 0, "rss": 0, "pss": 0, "uss": 0, "pss_anon": 0, "pss_file": 0, "pss_shmem": 0}
    regions: set[str] = set()
    for p in procs:
        try:
            m = p.memory_full_info()
            cmd = p.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        tot["processes"] += 1
        tot["rss"] += m.rss
        tot["pss"] += m.pss
        tot["uss"] += m.uss
        r = _rollup(p.pid)
        tot["pss_anon"] += r.get("Pss_Anon", 0)
        tot["pss_file"] += r.get("Pss_File", 0)
        tot["pss_shmem"] += r.get("Pss_Shmem", 0)
        regions |= {a.lstrip("/") for a in cmd if SHM_PATTERN.match(a.lstrip("/"))}
        try:
            with open(f"/proc/{p.pid}/maps") as f:
                for ln in f:
                    i = ln.find("/dev/shm/")
                    if i >= 0:
                        name = ln[i + 9 :].split()[0]
                        if SHM_PATTERN.match(name):
                            regions.add(name)
        except OSError:
            pass
    stores = [d for d in os.listdir("/dev/shm") if d.startswith(f"weightbundle-{pid}-")]
    tot["shm_store"] = sum(_tree_bytes(os.path.join("/dev/shm", d)) for d in stores)
    tot["shm_regions"] = sum(_allocated(os.path.join("/dev/shm", r)) for r in regions)
    tot["shm_region_count"] = len(regions)
    tot["footprint"] = tot["pss_anon"] + tot["pss_file"] + tot["shm_store"] + tot["shm_regions"]
    return tot


def p3(
    res: Resources,
    art: Artifact,
    env: dict,
    secret: str,
    x: np.ndarray,
    instance_counts: tuple[int, ...],
    parallel: bool,
    pending: threading.Thread | None = None,
    tiny: Artifact | None = None,
) -> dict:
    """One server per config.  Sequential (full mode): each server is measured alone, its
    shutdown overlapping the next start.  ``parallel`` (--quick): all at once, for speed;
    shared-library pages are then split between more processes, so PSS is a bit lower.
    ``tiny``: the same backend with tiny weights (prepack=F), x1 and x4, measures the
    per-instance process overhead, so weight copies per instance can be told apart from it."""
    kinds = ("wb prepack=T", "wb prepack=F", "plain baked") + (("overhead probe",) if tiny is not None else ())
    configs = [(kind, k) for kind in kinds for k in instance_counts]
    out: dict[str, dict] = {}

    def make(kind: str, k: int) -> str:
        repo = res.tempdir("wb-bench-p3-")
        r = os.path.join(repo, "repo")
        os.makedirs(r)
        if kind == "overhead probe":
            add_wb_model(r, "m", tiny, k, prepack="false")
        elif kind.startswith("wb"):
            add_wb_model(r, "m", art, k, **MODES["T" if kind.endswith("T") else "F"])
        else:
            add_plain_model(r, "m", art, k)
        return r

    def measure(kind: str, k: int, srv: TritonServer) -> None:
        if kind == "overhead probe":
            xt = np.ones((x.shape[0], tiny.n), np.float32)
            concurrent_infer(srv.http_url, "m", xt, threads=2 * k, per_thread=3)
            quiesce(srv.pid)
            time.sleep(0.3)
            out[f"{kind} x{k}"] = {"idle": tree_memory(srv.pid)}
            log(f"P3 {kind} x{k}: footprint {out[f'{kind} x{k}']['idle']['footprint'] / MiB:.0f} MiB")
            return
        concurrent_infer(srv.http_url, "m", x, threads=2 * k, per_thread=3)
        quiesce(srv.pid)
        time.sleep(0.3)
        row = {"idle": tree_memory(srv.pid)}
        if kind.startswith("wb"):
            with WeightClient(srv.http_url, "m", secret=secret) as wc:
                v = wc.update(art.B, via="shm").version
            seen = concurrent_infer(srv.http_url, "m", x, threads=2 * k, per_thread=3)
            quiesce(srv.pid)
            time.sleep(0.3)
            row["after_update"] = tree_memory(srv.pid)
            row["after_update"]["versions_seen"] = sorted(seen)
            if seen != {v}:
                raise RuntimeError(f"P3 {kind} x{k}: after update {v} the instances answered with versions {sorted(seen)}")
            if k == instance_counts[-1] and "w0" in art.A:
                row["mid_stream"] = _mid_stream(srv, art, x, secret, readers=2 * k)
                quiesce(srv.pid, calm=2.5)  # the stream's deferred pack and standby pin land before the next server
        out[f"{kind} x{k}"] = row
        log(f"P3 {kind} x{k}: footprint {row['idle']['footprint'] / MiB:.0f} MiB")

    stops: list[threading.Thread] = []
    try:
        if parallel:
            servers: dict[tuple[str, int], TritonServer] = {}

            def start(kind: str, k: int) -> None:
                servers[(kind, k)] = res.start_server(make(kind, k), env, f"p3-{kind[-1]}{k}")

            run_parallel([lambda c=c: start(*c) for c in configs])
            if pending is not None:
                pending.join()
            for kind, k in configs:
                measure(kind, k, servers[(kind, k)])
            stops = [res.stop_server_async(srv) for srv in servers.values()]
        else:
            for kind, k in configs:
                srv = res.start_server(make(kind, k), env, "p3")
                if pending is not None:  # the previous server's shutdown overlapped this start
                    pending.join()
                measure(kind, k, srv)
                pending = res.stop_server_async(srv)
    finally:
        for t in stops + ([pending] if pending is not None else []):
            t.join()
    return out


def _mid_stream(srv: TritonServer, art: Artifact, x: np.ndarray, secret: str, readers: int, updates: int = 20) -> dict:
    """Memory while a stream of one-layer updates (w0 every 100 ms, as in P4) is served under
    load: measured after ``updates`` updates, while the stream goes on (pinned sessions).
    Not sooner: while an instance loads its first pin, ORT holds a check copy of the layers
    it packs (48 MiB here) for a few tenths of a second; after 8 updates two instances of
    four were still loading (+1.57 copies of anon in that run; +0.05-0.13 later in the stream)."""
    stop = threading.Event()

    def read() -> None:
        with WeightClient(srv.http_url, "m") as c:
            while not stop.is_set():
                c.infer({"x": x})

    threads = [threading.Thread(target=read, daemon=True) for _ in range(readers)]
    for t in threads:
        t.start()
    try:
        with WeightClient(srv.http_url, "m", secret=secret) as wc:
            for i in range(updates):
                wc.update({"w0": art.A["w0"] * np.float32(1.0 + 0.01 * (i + 1))}, via="shm")
                time.sleep(0.1)
            m = tree_memory(srv.pid)
            wc.update({"w0": art.A["w0"] * np.float32(0.5)}, via="shm")  # the stream goes on past the measure
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    return m


def p3_summary(p3r: dict, instance_counts: tuple[int, ...], wbytes: int) -> dict:
    """Weight copies resident, from footprints minus the overhead probe's (same backend, tiny weights):

    - per extra instance (x1 -> x4, idle): (growth - probe's growth) / weights;
    - resident at x4, idle: (footprint - probe's footprint) / weights, split into store (/dev/shm),
      file PSS (the bundle file's page cache: initial weights), anon (private copies) and regions;
    - after one update (x4): growth split into store, python-backend regions, anon.
    """
    lo, hi = instance_counts[0], instance_counts[-1]
    W = wbytes / MiB
    per: dict[str, dict] = {}
    for kind in ("wb prepack=T", "wb prepack=F", "plain baked", "overhead probe"):
        if f"{kind} x{hi}" not in p3r:
            continue
        a, b = p3r[f"{kind} x{lo}"]["idle"], p3r[f"{kind} x{hi}"]["idle"]
        per[kind] = {"footprint_mib": (b["footprint"] - a["footprint"]) / (hi - lo) / MiB, "anon_mib": (b["pss_anon"] - a["pss_anon"]) / (hi - lo) / MiB}
    probe = per.get("overhead probe")
    pb = p3r.get(f"overhead probe x{hi}", {}).get("idle")
    for kind, d in per.items():
        if kind == "overhead probe" or not probe:
            d["weight_copies_est"] = None
            continue
        d["weight_copies_est"] = (d["footprint_mib"] - probe["footprint_mib"]) / W
        i = p3r[f"{kind} x{hi}"]["idle"]
        d[f"resident_x{hi}"] = _growth(pb, i, ("shm_store", "pss_file", "pss_anon", "shm_regions"), wbytes)  # over the probe
    for kind in ("wb prepack=T", "wb prepack=F"):
        for k in (lo, hi):
            row = p3r[f"{kind} x{k}"]
            for state, key, parts in (
                ("after_update", "update_growth", ("shm_store", "shm_regions", "pss_anon")),
                ("mid_stream", "stream_growth", ("shm_store", "pss_file", "pss_anon")),
            ):
                if state in row:
                    per[kind][f"{key}_x{k}"] = _growth(row["idle"], row[state], parts, wbytes)
    return per


_COPIES = {"footprint": "total_copies", "shm_store": "store_copies", "shm_regions": "regions_copies", "pss_file": "file_copies", "pss_anon": "anon_copies"}


def _growth(before: dict, after: dict, parts: tuple[str, ...], wbytes: int) -> dict:
    """Growth from ``before`` to ``after`` in weight copies: the footprint, and ``parts`` of it."""
    return {_COPIES[p]: (after[p] - before[p]) / wbytes for p in ("footprint", *parts)}
