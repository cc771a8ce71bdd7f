#!/usr/bin/env python
"""Benchmark of the bundle core: steady-state speed and update latency.

Not a test: it measures, prints a markdown table and writes the raw numbers as JSON.
Every ratio in the table comes from ONE run in which the compared things were
measured side by side, their repetitions interleaved (the order rotates each round),
so a noisy machine shifts numerator and denominator alike.  Reported values are
medians over the repetitions.

Per model (the 4x(2048x2048) FP32 MLP at batch 32, a conv net with BatchNorm, ResNet-50 at
batch 1 and a BERT-style transformer encoder at batch 8 x seq 128; ``--only NAME`` picks some):

  (a) baked   plain ONNX Runtime on the original model, initializers baked in, default
              session options (ORT_ENABLE_ALL): the speed baseline.
  (b) steady  ``Bundle.infer`` for each RuntimeOptions mode (prepack x optimization),
              ratio to (a).
  (c) update  ``Bundle.update(full new weights)`` until the next ``infer`` returns the new
              version, minus one steady inference; split into update() and first-infer
              (= session build + one inference); ratio to the memcpy floor, ``np.copyto`` of
              the same total bytes into a pre-faulted buffer, measured in the same rounds.
              The "tmpfs floor" (writing those bytes to a new file in the store's tmpfs) is
              shown too: a new immutable blob has to pay for page allocation.
  (e) reload  a baked ORT session created from scratch plus its first run: what serving new
              weights costs without a bundle. Per mode the table gives reload / (update() +
              first infer): like for like, both sides include their first inference.  So it
              stays under reload / one steady inference (the "ceiling", however fast the
              update); "create / update()" compares the two sides without inference.
  (d) session build time, process RSS growth per mode (a fresh subprocess per mode, so
              modes do not pollute each other's numbers), load_from_file time.

    python tools/bench_core.py            # all four models: about 16 minutes on 2 cores (2026-12-08)
    python tools/bench_core.py --only mlp conv   # the small models: about 4 minutes
    python tools/bench_core.py --quick    # tiny models, seconds: keeps the script from rotting
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "backend",):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from weightbundle import zoo  # noqa: E402
import weightbundle as wb  # noqa: E402
from weightbundle import RuntimeOptions  # noqa: E402

LEVELS = ("none", "basic", "extended", "all")
# (prepack, optimization, hybrid, deterministic). hybrid only matters with prepack: a new version
# is served at once from a zero-copy session (or a private pre-packed one: deterministic), while
# the shared pre-packed copy is built in the background.
MODES = [(True, "all", True, False), (True, "all", True, True)] + [(pp, lvl, False, False) for pp in (True, False) for lvl in LEVELS]
MiB = 1 << 20
WARM_CALLS = 2  # untimed inferences at the start of each steady visit
QUIESCE_S = 0.01  # pause before each timed update visit, so spinning ORT pools of the last visit go idle


def quiesce_bundles(bundles: "Iterable[wb.Bundle]") -> None:
    """Before a timed visit: every loaded bundle's background work is done (pre-packed builds,
    the after-publish work: staging blob, collection, moving the old version to disk), so
    that one mode's update is not billed for another's, and neither is the memcpy floor."""
    for b in bundles:
        b._sessions.builder.wait_idle()
        b._updater.settle()


def mode_name(mode: tuple[bool, str, bool, bool]) -> str:
    return f"prepack={'T' if mode[0] else 'F'} opt={mode[1]}" + (" hybrid" if mode[2] else "") + (" deterministic" if mode[3] else "")


def mode_options(mode: tuple[bool, str, bool, bool] | list, threads: int) -> RuntimeOptions:
    pp, lvl, hy, det = mode
    return RuntimeOptions(prepack=pp, optimization=lvl, hybrid=hy, deterministic=det, intra_op_threads=threads)


# --------------------------------------------------------------------------- models
def bench_convnet(channels=(3, 64, 128, 256, 512), hw: int = 64, classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    """tests/zoo.convnet's blocks (Conv -> BatchNorm -> Relu -> MaxPool, GAP, Gemm head), wider, larger input."""
    return zoo.convnet(channels=channels, classes=classes, seed=seed, hw=hw)


def model_specs(quick: bool) -> list[dict]:
    """name, how to make the model (re-made in probe subprocesses), input shape."""
    if quick:
        return [
            {"name": "mlp-quick", "desc": "2x(256x256) FP32 MLP, batch 8", "make": ["big_mlp", {"n": 256, "layers": 2}], "x": [8, 256]},
            {
                "name": "conv-quick",
                "desc": "tests/zoo.convnet() (3,8,16) 16x16, batch 4, built with --fold-bn",
                "make": ["convnet", {}],
                "x": [4, 3, 16, 16],
                "convert": {"fold_bn": True},
            },
            {
                "name": "transformer-quick",
                "desc": "zoo.transformer_encoder(small=True), batch 2, seq 8",
                "make": ["transformer_encoder", {"small": True}],
                "x": [2, 8],
                "input": "ids",
                "vocab": 50,
            },
        ]
    return [
        {"name": "mlp", "desc": "4x(2048x2048) FP32 MLP, batch 32", "make": ["big_mlp", {}], "x": [32, 2048]},
        {
            "name": "conv",
            "desc": "conv net Conv-BN-Relu-MaxPool x4, channels (3,64,128,256,512), 64x64, 1000 classes, batch 4, built with --fold-bn",
            "make": ["bench_convnet", {}],
            "x": [4, 3, 64, 64],
            "convert": {"fold_bn": True},  # BN folded by the update graph, so compile_once applies
        },
        {
            "name": "resnet50",
            "desc": "ResNet-50 (onnx light zoo graph, random weights, 98 MiB), batch 1, built with --fold-bn",
            "make": ["resnet50", {}],
            "x": [1, 3, 224, 224],
            "convert": {"fold_bn": True},
            "input": "gpu_0/data_0",
        },
        {
            "name": "transformer",
            "desc": "BERT-style encoder (zoo.transformer_encoder: 4 layers, d_model 512, 8 heads, ffn 2048, vocab 8000, 65 MiB), batch 8, seq 128",
            "make": ["transformer_encoder", {}],
            "x": [8, 128],
            "input": "ids",
            "vocab": 8000,
        },
    ]


def make_model(spec: dict) -> onnx.ModelProto:
    fn, kw = spec["make"]
    return bench_convnet(**kw) if fn == "bench_convnet" else getattr(zoo, fn)(**kw)


def input_name(spec: dict) -> str:
    return spec.get("input", "x")


def make_input(spec: dict) -> np.ndarray:
    """Token ids in [0, vocab) for a model with a ``vocab``, else standard normal FP32."""
    rng = np.random.default_rng(123)
    if "vocab" in spec:
        return rng.integers(0, spec["vocab"], spec["x"]).astype(np.int64)
    return rng.standard_normal(spec["x"]).astype(np.float32)


def weight_sets(model: onnx.ModelProto, variables: list, n: int = 2) -> list[dict[str, np.ndarray]]:
    """``n`` full sets of new weights: each original scaled elementwise by U(0.9, 1.1) (keeps
    signs, so BatchNorm variances stay positive), deterministic so probes can remake them."""
    orig = zoo.initializers(model)
    rng = np.random.default_rng(7)
    return [{v.name: (orig[v.name] * rng.uniform(0.9, 1.1, orig[v.name].shape)).astype(v.np_dtype) for v in variables} for _ in range(n)]


# --------------------------------------------------------------------------- helpers
def now() -> float:
    return time.perf_counter()


def med(xs) -> float:
    return float(np.median(xs)) if len(xs) else float("nan")


def baked_session(model_bytes: bytes, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()  # defaults: ORT_ENABLE_ALL, pre-packing on
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def mem_now() -> dict[str, float]:
    """Process memory in MiB: psutil RSS plus the kernel's split (anon = private copies such
    as pre-packed weights; shmem/file = mapped tmpfs blobs, shared with the store)."""
    import psutil

    out = {"rss": psutil.Process().memory_info().rss / MiB}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("RssAnon", "RssFile", "RssShmem"):
                    out[k[3:].lower()] = int(v.split()[0]) / 1024
    except OSError:
        pass
    return out


def dir_bytes(path: str) -> int:
    try:
        return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())
    except OSError:
        return 0


# --------------------------------------------------------------------------- RSS probe (subprocess)
def probe(req: dict) -> dict:
    """Memory of one mode in a fresh process: load, init, first infer, then two full updates."""
    spec, threads = req["spec"], req["threads"]
    model = make_model(spec)
    x = make_input(spec)
    gc.collect()
    if req["mode"] == "baked":
        with open(req["model_path"], "rb") as f:
            model_bytes = f.read()
        del model
        gc.collect()
        m0 = mem_now()
        t0 = now()
        sess = baked_session(model_bytes, threads)
        t1 = now()
        sess.run(None, {input_name(spec): x})
        m1 = mem_now()
        return {"create_s": t1 - t0, "mem_before": m0, "mem_steady": m1}
    opts = mode_options(req["mode"], threads)
    probe_bundle = wb.Bundle.load_from_file(req["bundle_path"], RuntimeOptions())
    sets = weight_sets(model, probe_bundle.sources)
    probe_bundle.unload()
    del model
    gc.collect()
    m0 = mem_now()
    b = wb.Bundle.load_from_file(req["bundle_path"], opts)
    m_load = mem_now()
    b.init()
    b.infer({input_name(spec): x})
    m_v0 = mem_now()
    for w in sets:
        b.update(w)
        b.infer({input_name(spec): x})
    gc.collect()
    m_ss = mem_now()
    store = dir_bytes(b.store.path)
    b.unload()
    return {
        "mem_before": m0,
        "mem_loaded": m_load,
        "mem_first": m_v0,
        "mem_steady": m_ss,
        "store_bytes": store,
        "weight_set_bytes": int(sum(a.nbytes for a in sets[0].values())),
    }


def run_probe(req: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_probe", json.dumps(req)]
    # A fixed mmap threshold: large blocks go back to the OS on free, so memory freed before
    # the first reading is not silently reused later and RSS growth is not understated.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main benchmark
def bench_model(spec: dict, args, workdir: str, log) -> dict:
    iters, threads = args.iters, args.threads
    model = make_model(spec)
    model_bytes = model.SerializeToString()
    model_path = os.path.join(workdir, f"{spec['name']}.onnx")
    bundle_path = os.path.join(workdir, f"{spec['name']}.bundle")
    with open(model_path, "wb") as f:
        f.write(model_bytes)
    x = make_input(spec)
    feeds = {input_name(spec): x}

    t0 = now()
    data = wb.build_bundle(wb.convert(model, **spec.get("convert", {})))
    build_s = now() - t0
    wb.save_bundle(bundle_path, data)
    del data

    R: dict = {
        "name": spec["name"],
        "desc": spec["desc"],
        "input_shape": spec["x"],
        "build_bundle_s": build_s,
        "bundle_file_bytes": os.path.getsize(bundle_path),
    }

    # (a) baseline: plain ORT, baked initializers. Creation and the first run of the new session
    # timed a few times: together they are the "reload" analogue, what serving new weights costs
    # without a bundle (a new baked session from scratch, as a Triton reload builds one).
    creates, firsts = [], []
    for _ in range(args.create_reps):
        gc.collect()
        t0 = now()
        baked = baked_session(model_bytes, threads)
        t1 = now()
        baked.run(None, feeds)
        creates.append(t1 - t0)
        firsts.append(now() - t1)
    R["baked_create_s"] = creates
    R["baked_first_run_s"] = firsts

    # (d) load_from_file, init, cold first inference, for every mode
    bundles: dict[tuple[bool, str], wb.Bundle] = {}
    setup: dict[str, dict] = {}
    for mode in MODES:
        gc.collect()
        t0 = now()
        b = wb.Bundle.load_from_file(bundle_path, mode_options(mode, threads))
        t1 = now()
        b.init()
        t2 = now()
        b.infer(feeds)
        t3 = now()
        bundles[mode] = b
        setup[mode_name(mode)] = {"load_s": t1 - t0, "init_s": t2 - t1, "first_infer_after_init_s": t3 - t2}
    R["setup"] = setup
    variables = bundles[MODES[0]].sources  # what an update pushes (with --fold-bn, the store also holds the folded pair)
    total_bytes = int(sum(v.nbytes for v in variables))
    R["weights"] = {"count": len(variables), "bytes": total_bytes}
    loads = []
    for _ in range(iters):
        t0 = now()
        b = wb.Bundle.load_from_file(bundle_path)
        loads.append(now() - t0)
        b.unload()
    R["load_from_file_s"] = loads
    log(f"  {spec['name']}: {len(variables)} weights, {total_bytes / MiB:.1f} MiB; bundle built in {build_s:.2f} s")

    # (b) steady state, interleaved: each round visits baseline + every mode in rotated order
    keys = ["baked"] + [mode_name(m) for m in MODES]
    runners = {"baked": functools.partial(baked.run, None, feeds)}
    for m in MODES:
        runners[mode_name(m)] = (lambda b: lambda: b.infer(feeds))(bundles[m])
    for r in runners.values():  # warm-up
        r()
    # Each visit: untimed warm-up calls first. ORT worker threads spin for a while after a run;
    # on 2 cores the previous session's spinning pool would otherwise be billed to the next one.
    inner = max(1, args.inner)
    steady: dict[str, list[float]] = {k: [] for k in keys}
    paired: dict[str, list[float]] = {k: [] for k in keys}  # per round: median(mode) / median(baked)
    for rnd in range(iters * 2):
        order = keys[rnd % len(keys) :] + keys[: rnd % len(keys)]
        this = {}
        for k in order:
            fn = runners[k]
            for _ in range(WARM_CALLS):
                fn()
            ts = []
            for _ in range(inner):
                t0 = now()
                fn()
                ts.append(now() - t0)
            steady[k] += ts
            this[k] = med(ts)
        for k in keys:
            paired[k].append(this[k] / this["baked"])
    R["steady_s"] = steady
    R["steady_paired_ratio"] = paired
    steady_med = {k: med(v) for k, v in steady.items()}
    log("  steady: " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in steady_med.items()))

    # (c) update latency, interleaved with the memcpy and tmpfs floors
    sets = weight_sets(model, variables)
    flat = [np.concatenate([s[v.name].reshape(-1).view(np.uint8) for v in variables]) for s in sets]
    dst = np.empty_like(flat[0])
    dst[:] = 1  # pre-fault: the floor is a pure copy
    shm = tempfile.mkdtemp(prefix="bench-core-floor-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    floor = {"memcpy": [], "tmpfs_new_file": []}
    upd: dict[str, dict[str, list[float]]] = {mode_name(m): {"update": [], "first_infer": [], "post_steady": []} for m in MODES}
    mkeys = ["memcpy", "tmpfs"] + [mode_name(m) for m in MODES]
    for rnd in range(iters):
        w = sets[rnd % 2]
        order = mkeys[rnd % len(mkeys) :] + mkeys[: rnd % len(mkeys)]
        for k in order:
            quiesce_bundles(bundles.values())
            gc.collect()
            time.sleep(QUIESCE_S)
            if k == "memcpy":
                t0 = now()
                np.copyto(dst, flat[rnd % 2])
                floor["memcpy"].append(now() - t0)
                continue
            if k == "tmpfs":
                p = os.path.join(shm, f"f{rnd}.bin")
                t0 = now()
                with open(p, "wb") as f:
                    f.write(memoryview(flat[rnd % 2]))
                floor["tmpfs_new_file"].append(now() - t0)
                os.unlink(p)
                continue
            b = next(bb for m, bb in bundles.items() if mode_name(m) == k)
            t0 = now()
            ver = b.update(w)
            t1 = now()
            _, got = b.infer(feeds)
            t2 = now()
            b.infer(feeds)
            t3 = now()
            if got != ver:
                raise RuntimeError(f"{k}: infer after update returned version {got}, expected {ver}")
            upd[k]["update"].append(t1 - t0)
            upd[k]["first_infer"].append(t2 - t1)
            upd[k]["post_steady"].append(t3 - t2)
    shutil.rmtree(shm, ignore_errors=True)
    R["floor_s"] = floor
    R["update_s"] = upd

    # sanity: every mode serves the last weights, matching ORT on the original model with them
    last = sets[(iters - 1) % 2]
    ref = baked_session(zoo.with_weights(model, last).SerializeToString(), threads).run(None, feeds)[0]
    R["max_abs_err_vs_ort"] = {mode_name(m): float(np.max(np.abs(next(iter(bundles[m].infer(feeds)[0].values())) - ref))) for m in MODES}
    R["ref_max_abs"] = float(np.max(np.abs(ref)))
    for b in bundles.values():
        b.unload()
    del baked, bundles
    gc.collect()

    # (d) memory per mode, each in a fresh process
    probe_modes = ["baked"] + (MODES if not args.quick else [(True, "all", True, False), (False, "none", False, False)])
    R["mem"] = {}
    for pm in probe_modes:
        req = {"spec": spec, "threads": threads, "mode": pm if pm == "baked" else list(pm), "model_path": model_path, "bundle_path": bundle_path}
        R["mem"]["baked" if pm == "baked" else mode_name(pm)] = run_probe(req)
    return R


def summarize(R: dict) -> dict:
    base = med(R["steady_s"]["baked"])
    floor = med(R["floor_s"]["memcpy"])
    base_p10 = float(np.percentile(R["steady_s"]["baked"], 10))
    reload_s = med([c + f for c, f in zip(R["baked_create_s"], R["baked_first_run_s"])])
    rows = {}
    for key, u in R["update_s"].items():
        st = med(R["steady_s"][key])
        # paired per round: the steady inference right after the first one, same session, same round
        lat = med([a + b - c for a, b, c in zip(u["update"], u["first_infer"], u["post_steady"])])
        build = med([b - c for b, c in zip(u["first_infer"], u["post_steady"])])
        mem = R["mem"].get(key, {})
        rows[key] = {
            "steady_ms": st * 1e3,
            "steady_ratio": med(R["steady_paired_ratio"][key]),
            "steady_ratio_unpaired": st / base,
            "steady_ratio_p10": float(np.percentile(R["steady_s"][key], 10)) / base_p10,
            "update_ms": med(u["update"]) * 1e3,
            "first_infer_ms": med(u["first_infer"]) * 1e3,
            "build_ms": build * 1e3,
            "latency_ms": lat * 1e3,
            "latency_x_memcpy": lat / floor,
            # like for like: both include the first inference (not minus a steady one)
            "served_ms": med([a + b for a, b in zip(u["update"], u["first_infer"])]) * 1e3,
            "reload_over_served": reload_s / med([a + b for a, b in zip(u["update"], u["first_infer"])]),
            # ready to serve on both sides, no inference: what compiling costs against updating
            "create_over_update": med(R["baked_create_s"]) / med(u["update"]),
            "update_x_memcpy": med(u["update"]) / floor,
            "cold_build_ms": (R["setup"][key]["first_infer_after_init_s"] - st) * 1e3,
            "rss_growth_mib": mem["mem_steady"]["rss"] - mem["mem_before"]["rss"] if "mem_steady" in mem else None,
            "anon_growth_mib": mem["mem_steady"].get("anon", float("nan")) - mem["mem_before"].get("anon", float("nan")) if "mem_steady" in mem else None,
            "store_mib": mem["store_bytes"] / MiB if "store_bytes" in mem else None,
            "max_abs_err": R["max_abs_err_vs_ort"][key],
        }
    bm = R["mem"].get("baked", {})
    return {
        "baked_ms": base * 1e3,
        "memcpy_ms": floor * 1e3,
        "tmpfs_ms": med(R["floor_s"]["tmpfs_new_file"]) * 1e3,
        "memcpy_gbps": R["weights"]["bytes"] / floor / 1e9,
        "baked_create_ms": med(R["baked_create_s"]) * 1e3,
        "baked_first_run_ms": med(R["baked_first_run_s"]) * 1e3,
        "reload_ms": reload_s * 1e3,
        # served = update() + one inference, so reload / served < reload / one inference, however
        # fast the update: the most "reload ÷ served" can reach on this machine
        "ceiling_x": reload_s / base,
        "baked_rss_growth_mib": bm["mem_steady"]["rss"] - bm["mem_before"]["rss"] if "mem_steady" in bm else None,
        "baked_anon_growth_mib": bm["mem_steady"].get("anon", float("nan")) - bm["mem_before"].get("anon", float("nan")) if "mem_steady" in bm else None,
        "load_from_file_ms": med(R["load_from_file_s"]) * 1e3,
        "init_ms": {k: v["init_s"] * 1e3 for k, v in R["setup"].items()},
        "rows": rows,
    }


def fmt(v, spec=".2f", suffix=""):
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:{spec}}{suffix}"


def markdown(results: list[dict], summaries: list[dict]) -> str:
    out = []
    out.append(
        "| model | mode | steady ms | vs baked (p10) | update() ms (vs memcpy) | 1st infer ms | build ms | update→served ms | vs memcpy | reload ÷ (update()+1st infer) "
        "| create ÷ update() | RSS +MiB (anon) | store MiB |"
    )
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for R, S in zip(results, summaries):
        out.append(
            f"| {R['name']} | (a) baked ORT | {S['baked_ms']:.2f} | 1.00 | | {S['baked_first_run_ms']:.1f} | {S['baked_create_ms']:.0f} (create) | "
            f"| | reload {S['reload_ms']:.0f} ms (ceiling {S['ceiling_x']:.1f}x) | | "
            f"{fmt(S['baked_rss_growth_mib'], '.0f')} ({fmt(S['baked_anon_growth_mib'], '.0f')}) | |"
        )
        for key, r in S["rows"].items():
            out.append(
                f"| {R['name']} | {key} | {r['steady_ms']:.2f} | {r['steady_ratio']:.2f}x ({r['steady_ratio_p10']:.2f}x) | {r['update_ms']:.1f} ({r['update_x_memcpy']:.1f}x) | {r['first_infer_ms']:.1f} | "
                f"{r['build_ms']:.1f} | {r['latency_ms']:.1f} | {r['latency_x_memcpy']:.1f}x | {r['reload_over_served']:.2f}x | {r['create_over_update']:.2f}x | "
                f"{fmt(r['rss_growth_mib'], '.0f')} ({fmt(r['anon_growth_mib'], '.0f')}) | {fmt(r['store_mib'], '.0f')} |"
            )
    out.append("")
    out.append("| model | weights | memcpy floor | tmpfs new-file floor | load_from_file | init (prepack=T opt=all) | build_bundle |")
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    for R, S in zip(results, summaries):
        out.append(
            f"| {R['name']} | {R['weights']['count']} tensors, {R['weights']['bytes'] / MiB:.1f} MiB | {S['memcpy_ms']:.2f} ms ({S['memcpy_gbps']:.1f} GB/s) | "
            f"{S['tmpfs_ms']:.2f} ms | {S['load_from_file_ms']:.2f} ms | {S['init_ms'].get('prepack=T opt=all', float('nan')):.1f} ms | {R['build_bundle_s'] * 1e3:.0f} ms |"
        )
    return "\n".join(out)


def fmt_load(la) -> str:
    return "n/a" if la is None else "/".join(f"{x:.2f}" for x in la)


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": cpu,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "onnx": onnx.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


FIX = ROOT / "tests" / "fixtures" / "torch"


def _linear_stack(n: int, layers: int, exported: bool, seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A trainer's Linear stack as a folding exporter writes it (``exported``: anonymous [in, out]
    weights, the checkpoint holds [out, in]) or with the variables already in the graph's layout."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    ck = {f"l{i}.weight": (rng.standard_normal((n, n), dtype=np.float32) / np.sqrt(n)).astype(np.float32) for i in range(layers)}
    inits, nodes, x = [], [], "x"
    for i in range(layers):
        name = f"onnx::MatMul_{100 + i}" if exported else f"l{i}.weight"
        inits.append(numpy_helper.from_array(np.ascontiguousarray(ck[f"l{i}.weight"].T), name))
        nodes += [helper.make_node("MatMul", [x, name], [f"h{i}"]), helper.make_node("Relu", [f"h{i}"], [f"r{i}"])]
        x = f"r{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    g = helper.make_graph(
        nodes,
        "stack",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m, ck if exported else {k: np.ascontiguousarray(v.T) for k, v in ck.items()}


def bench_trainer(args, log) -> tuple[str, dict]:
    """Issue 9: steady inference of the hoisted transformer fixture against ORT on the folded export,
    and the time from pushing a full state_dict to the first inference serving it, with and without
    derived variables."""
    from safetensors.numpy import load_file

    out: dict = {}
    rounds = 3 if args.quick else 15
    before = load_file(str(FIX / "transformer.before.safetensors"))
    after = load_file(str(FIX / "transformer.after.safetensors"))
    x1 = load_file(str(FIX / "transformer.io.safetensors"))["x"]
    x = np.tile(x1, (16, 1))  # batch 32
    src = str(FIX / "transformer.ts.onnx")
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    base = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    opts = RuntimeOptions(intra_op_threads=args.threads)
    b = wb.Bundle.load_from_mem(wb.build_bundle(wb.convert(src, checkpoint=before)), opts)
    b.init()
    b.infer({"x": x})
    b._sessions.builder.wait_idle()
    out["transformer_steady"] = {}
    for batch in (32, 512):
        xb = np.tile(x1, (batch // 2, 1))
        sess = b.infer_session()[1]
        fns = {
            "baked": functools.partial(base.run, None, {"x": xb}),
            "bundle": functools.partial(b.infer, {"x": xb}),
            "bundle_session": functools.partial(sess.run, None, {"x": xb}),
        }  # the bundle's graph without Bundle.infer's checks
        times: dict = {k: [] for k in fns}
        reps = max(2, args.inner * (10 if batch == 32 else 2))
        for r in range(2 * rounds):
            keys = list(fns)[r % 3 :] + list(fns)[: r % 3]
            for k in keys:
                t0 = now()
                for _ in range(reps):
                    fns[k]()
                times[k].append((now() - t0) / reps)
        ratio = [w / bk for w, bk in zip(times["bundle"], times["baked"])]
        ratio_s = [w / bk for w, bk in zip(times["bundle_session"], times["baked"])]
        out["transformer_steady"][batch] = {
            "baked_ms": med(times["baked"]) * 1e3,
            "bundle_ms": med(times["bundle"]) * 1e3,
            "ratio": med(ratio),
            "ratio_p10": float(np.percentile(times["bundle"], 10) / np.percentile(times["baked"], 10)),
            "session_ratio": med(ratio_s),
        }
    b.unload()

    def update_cost(bundle_bytes: bytes, push: dict, xin: np.ndarray) -> list[float]:
        ts = []
        with wb.Bundle.load_from_mem(bundle_bytes, RuntimeOptions(intra_op_threads=args.threads)) as bb:
            bb.init()
            bb.infer({"x": xin})
            alt = [push, {k: v * np.float32(1.01) for k, v in push.items()}]
            for r in range(rounds + 1):
                quiesce_bundles([bb])
                time.sleep(QUIESCE_S)
                t0 = now()
                v = bb.load_state_dict(alt[r % 2])["version"]
                _, served = bb.infer({"x": xin})
                ts.append(now() - t0)
                assert served == v
        return ts[1:]  # the first round pays one-time session and staging setup

    n, layers = (256, 2) if args.quick else (1024, 4)
    rows = {}
    xin = np.random.default_rng(1).standard_normal((32, n)).astype(np.float32)
    for label, exported in (("derived (anonymous [in,out] weights, pushed as [out,in])", True), ("no derived variables", False)):
        m, ck = _linear_stack(n, layers, exported)
        graphs = wb.convert(m, checkpoint=ck)
        push = {k: v + np.float32(0.001) for k, v in ck.items()}
        buf = np.empty(sum(v.nbytes for v in push.values()), np.uint8)
        cp = []
        for _ in range(rounds):
            t0 = now()
            off = 0
            for v in push.values():
                np.copyto(buf[off : off + v.nbytes], v.reshape(-1).view(np.uint8))
                off += v.nbytes
            cp.append(now() - t0)
        ts = update_cost(wb.build_bundle(graphs), push, xin)
        rows[label] = {"derived": len(graphs.derived), "ms": med(ts) * 1e3, "memcpy_ms": med(cp) * 1e3, "x_memcpy": med(ts) / med(cp), "mib": buf.nbytes / MiB}
        log(f"trainer update cost, {label}: {rows[label]['ms']:.1f} ms")
    fx = {}
    for label, tag, kw in (
        ("transformer fixture, --checkpoint (derived)", "ts", {"checkpoint": before}),
        ("transformer fixture, names kept, --no-hoist (no derived)", "ts_nofold", {"hoist": False}),
    ):
        graphs = wb.convert(str(FIX / f"transformer.{tag}.onnx"), **kw)
        names = {s.name for s in graphs.sources}
        ts = update_cost(wb.build_bundle(graphs), {k: v for k, v in after.items() if k in names}, x)
        fx[label] = {"derived": len(graphs.derived), "ms": med(ts) * 1e3}
    out["update_cost"] = rows
    out["update_cost_fixture"] = fx
    md = [
        "",
        "**Trainer pushes**",
        "",
        "| steady inference, transformer fixture (TorchScript default export, built with `--checkpoint`) | ORT on the folded export ms | bundle ms | bundle / ORT (p10) | bundle's session alone / ORT |",
        "|---|---:|---:|---:|---:|",
    ]
    for batch, st in out["transformer_steady"].items():
        md.append(
            f"| batch {batch} | {st['baked_ms']:.3f} | {st['bundle_ms']:.3f} | **{st['ratio']:.2f}x** ({st['ratio_p10']:.2f}x) | {st['session_ratio']:.2f}x |"
        )
    md += [
        "",
        f"| full state_dict push → first inference serving it ({n}x{n} x {layers} FP32 Linear stack) | derived | ms | memcpy floor ms | x memcpy |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, r in rows.items():
        md.append(f"| {label} | {r['derived']} | {r['ms']:.1f} | {r['memcpy_ms']:.2f} ({r['mib']:.0f} MiB) | {r['x_memcpy']:.1f}x |")
    for label, r in fx.items():
        md.append(f"| {label} | {r['derived']} | {r['ms']:.1f} | | |")
    return "\n".join(md), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models and few iterations (seconds; for CI)")
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads, baseline and bundle alike (default 2)")
    ap.add_argument("--iters", type=int, default=None, help="update rounds; steady rounds are 2x this (default 15, quick 3)")
    ap.add_argument("--inner", type=int, default=3, help="timed inferences per mode per steady round (default 3)")
    ap.add_argument("--out", default=str(ROOT / "tools" / "out"), help="folder for the JSON and markdown (default tools/out)")
    ap.add_argument("--_probe", help=argparse.SUPPRESS)
    ap.add_argument("--trainer-only", action="store_true", help="only the trainer section (trainer pushes, hoisted transformer)")
    ap.add_argument(
        "--only", nargs="+", metavar="NAME", help="only these models (mlp, conv, resnet50, transformer; quick: mlp-quick, conv-quick, transformer-quick)"
    )
    args = ap.parse_args(argv)
    if args._probe:
        print(json.dumps(probe(json.loads(args._probe))))
        return 0
    if args.iters is None:
        args.iters = 3 if args.quick else 15
    args.iters = max(1, args.iters)
    args.create_reps = 1 if args.quick else max(3, args.iters)  # the reload analogue: as many samples as update rounds

    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    mach = machine()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    log(f"$ {command}")
    t_start = now()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    results, summaries = [], []
    workdir = tempfile.mkdtemp(prefix="bench-core-")
    try:
        for spec in [] if args.trainer_only else [s for s in model_specs(args.quick) if not args.only or s["name"] in args.only]:
            R = bench_model(spec, args, workdir, log)
            results.append(R)
            summaries.append(summarize(R))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    elapsed = now() - t_start
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    noise = {R["name"]: float(np.subtract(*np.percentile(R["steady_s"]["baked"], [75, 25])) / med(R["steady_s"]["baked"])) for R in results}

    table = markdown(results, summaries) if results else ""
    trainer_md, trainer = bench_trainer(args, log)
    table += "\n" + trainer_md
    header = (
        f"command: `{command}` (cwd {os.getcwd()})\n"
        f"machine: {mach['cpu_count']} CPUs ({mach['cpu']}), onnxruntime {mach['onnxruntime']}, numpy {mach['numpy']}, "
        f"python {mach['python']}, {mach['platform']}\n"
        f"threads {args.threads}, {args.iters} update rounds, {2 * args.iters}x{args.inner} steady samples per mode, "
        f"medians; total {elapsed:.0f} s\n"
        f"noise: load average {fmt_load(load_start)} at start, {fmt_load(load_end)} at end; IQR/median of baked steady "
        + ", ".join(f"{k} {v:.0%}" for k, v in noise.items())
        + " (when the paired median and p10 ratios disagree, the "
        "machine was contended: trust p10)\n"
    )
    notes = (
        "\nsteady: Bundle.infer; vs baked: median over rounds of the per-round ratio to (a) (p10: ratio of 10th percentiles, "
        "closer to an uncontended machine). update→served: update() + first infer of the new version - the steady infer "
        "that follows it (paired per round); vs memcpy: over np.copyto of the same bytes in this run. build: first infer - steady. "
        "reload: a baked ORT session created from scratch + its first run (the no-bundle way to serve new weights); "
        "reload ÷ (update()+1st infer): how many times faster this mode serves new weights than a reload, both sides "
        "including their first inference (>= 10 is issue 12's target); its ceiling (baked row) is reload ÷ one steady inference, "
        "what a free update would reach. create ÷ update(): a baked session's creation over update(), both sides ready to serve "
        "and neither inferring (the compile cost a bundle saves). "
        "RSS: growth of a fresh process from before load to after init + 2 full updates (anon = private copies, e.g. pre-packed "
        "weights; the rest is mapped tmpfs blobs, shared with the store). store: tmpfs bytes the store holds (history=1)."
    )
    print(header)
    print(table)
    print(notes)
    os.makedirs(args.out, exist_ok=True)
    stem = ("bench_core-quick" if args.quick else "bench_core") + ("-trainer" if args.trainer_only else "")
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(
            {
                "command": command,
                "cwd": os.getcwd(),
                "machine": mach,
                "loadavg_start": load_start,
                "loadavg_end": load_end,
                "baked_steady_iqr_over_median": noise,
                "threads": args.threads,
                "iters": args.iters,
                "inner": args.inner,
                "elapsed_s": elapsed,
                "summary": {R["name"]: S for R, S in zip(results, summaries)},
                "raw": results,
                "trainer": trainer,
            },
            f,
            indent=1,
        )
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(header + "\n" + table + "\n" + notes + "\n")
    log(f"wrote {os.path.join(args.out, stem + '.json')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
