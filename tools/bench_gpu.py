"""GPU benchmark: device-resident weights (``device="cuda"``) against a baked CUDA session.

For each model, in one process and one run:
- floors: a warm host memcpy of the weights, and host-to-device copies of them (pageable,
  through ORT's ``OrtValue.update_inplace``; pinned, through torch where it is installed);
- "reload": creating a baked CUDA session from the model bytes and its first answer, the
  least a Triton reload of the same model pays;
- update until served: ``update()`` of every weight, or of one, then the first inference
  that shows the new version (median of ``--reps``), and the device copy inside it; each
  starts once the previous one's background work (staging blob, collection) is done;
- steady inference: the bundle against the baked session (median of ``--runs``);
- correctness: against the CPU bundle (scaled error), and bit for bit across two
  separately loaded bundles and repeated runs;
- under updates (the MLP): inference threads while updates alternate two weight sets
  every 50 ms: each answer must be the exact bytes of its version's weights (none torn).

    python tools/bench_gpu.py --out DIR            # needs onnxruntime-gpu and a GPU
    python tools/bench_gpu.py --quick --device cpu # the same machinery on the CPU (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/: bench_core (it puts backend/ on the path)
from bench_core import med  # noqa: E402
import weightbundle as wb  # noqa: E402
from weightbundle import zoo  # noqa: E402


def models(quick: bool) -> list[dict]:
    if quick:
        return [
            {"name": "mlp", "make": lambda: zoo.big_mlp(n=256, layers=2), "x": ("x", (8, 256)), "torn": True},
            {"name": "transformer", "make": lambda: zoo.transformer_encoder(small=True), "x": ("ids", (2, 8), 50)},
        ]
    return [
        {"name": "mlp", "desc": "4x(2048x2048) FP32 MLP, 64 MiB, batch 32", "make": zoo.big_mlp, "x": ("x", (32, 2048)), "torn": True},
        {
            "name": "resnet50",
            "desc": "ResNet-50 (onnx light zoo graph, random weights, 98 MiB), batch 1 (the graph fixes it), built with fold_bn",
            "make": zoo.resnet50,
            "x": ("gpu_0/data_0", (1, 3, 224, 224)),
            "fold_bn": True,
        },
        {
            "name": "resnet50-det",
            "desc": "the same, deterministic=true (cuDNN's heuristic picks the convolution algorithms, not a timed search)",
            "make": zoo.resnet50,
            "x": ("gpu_0/data_0", (1, 3, 224, 224)),
            "fold_bn": True,
            "deterministic": True,
        },
        {
            "name": "transformer",
            "desc": "BERT-style encoder (4 layers, d_model 512, ffn 2048, vocab 8000, 65 MiB), batch 8, seq 128",
            "make": zoo.transformer_encoder,
            "x": ("ids", (8, 128), 8000),
            "torn": True,
        },
    ]


def make_input(spec: dict) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(123)
    name, shape = spec["x"][0], spec["x"][1]
    if len(spec["x"]) == 3:
        return {name: rng.integers(0, spec["x"][2], shape).astype(np.int64)}
    return {name: rng.standard_normal(shape).astype(np.float32)}


def weight_set(b: wb.Bundle, seed: int, names: list[str] | None = None, positive: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """Seeded random values for update inputs ``names`` (default: all); ``positive``: BatchNorm variances."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in b.update_inputs:
        if names is not None and s.name not in names:
            continue
        if not np.issubdtype(s.dtype, np.floating):
            continue
        a = rng.standard_normal(s.shape) * 0.05
        if s.name in positive:
            a = np.abs(a) + 0.5
        out[s.name] = a.astype(s.dtype)
    return out


def h2d_floors(arrays: list[np.ndarray], device: str, reps: int) -> dict:
    """Host memcpy and host-to-device copies of ``arrays`` (warm, median of ``reps``)."""
    out: dict = {}
    dst = [np.empty_like(a) for a in arrays]
    out["memcpy_ms"] = med(timed_runs(lambda: [np.copyto(d, a) for d, a in zip(dst, arrays)], reps, warm=1)) * 1e3
    vals = [ort.OrtValue.ortvalue_from_shape_and_type(a.shape, a.dtype, device, 0) for a in arrays]
    out["h2d_pageable_ms"] = med(timed_runs(lambda: [v.update_inplace(a) for v, a in zip(vals, arrays)], reps, warm=1)) * 1e3
    vals.clear()  # the device buffers go before the next floor's
    if device == "cuda":
        try:
            import torch

            n = sum(a.nbytes for a in arrays)
            host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
            dev = torch.empty(n, dtype=torch.uint8, device="cuda")
            torch.cuda.synchronize()

            def pinned_copy() -> None:
                dev.copy_(host, non_blocking=True)
                torch.cuda.synchronize()

            out["h2d_pinned_ms"] = med(timed_runs(pinned_copy, reps, warm=1)) * 1e3
            del host, dev
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - torch is optional here
            out["h2d_pinned_error"] = repr(e)
        try:
            out.update(registered_copy(arrays, reps))
        except Exception as e:  # noqa: BLE001 - an experiment: report it
            out["h2d_registered_error"] = repr(e)
    return out


def registered_copy(arrays: list[np.ndarray], reps: int) -> dict:
    """A lever not taken yet, measured: page-lock (cudaHostRegister) a host buffer holding the
    weights, as a recycled staging blob could be once, and copy from it."""
    import ctypes
    import mmap

    from weightbundle.device import _cudart

    rt = _cudart()
    if rt is None:
        return {"h2d_registered_error": "no libcudart loaded"}
    n = sum(a.nbytes for a in arrays)
    buf = mmap.mmap(-1, n)
    host = np.frombuffer(buf, np.uint8)
    off = 0
    for a in arrays:
        host[off : off + a.nbytes] = a.reshape(-1).view(np.uint8)
        off += a.nbytes
    ptr = host.ctypes.data
    rt.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
    rt.cudaHostUnregister.argtypes = [ctypes.c_void_p]
    t0 = time.perf_counter()
    rc = rt.cudaHostRegister(ptr, n, 0)
    reg = time.perf_counter() - t0
    if rc != 0:
        return {"h2d_registered_error": f"cudaHostRegister: {rc}"}
    vals = [ort.OrtValue.ortvalue_from_shape_and_type(a.shape, a.dtype, "cuda", 0) for a in arrays]

    def registered() -> None:
        off = 0
        for v, a in zip(vals, arrays):
            rt.cudaMemcpy(v.data_ptr(), ptr + off, a.nbytes, 1)
            off += a.nbytes
        rt.cudaStreamSynchronize(None)

    copy_s = med(timed_runs(registered, reps, warm=1))
    t0 = time.perf_counter()
    rt.cudaHostUnregister(ptr)
    unreg = time.perf_counter() - t0
    vals.clear()
    del host
    buf.close()
    return {"host_register_ms": reg * 1e3, "h2d_registered_ms": copy_s * 1e3, "host_unregister_ms": unreg * 1e3}


def fusion_diff(model_bytes: bytes, dw, opts) -> dict:
    """Op types (with counts) that differ between the baked session's optimized graph and the
    device-resident one's: the fusions that need constant weights."""
    import tempfile
    from collections import Counter

    import onnx

    from weightbundle.sessions import session_options

    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, src in (("baked", model_bytes), ("resident", dw.session._model_bytes if hasattr(dw.session, "_model_bytes") else None)):
            if src is None:
                continue
            so = session_options(opts, prepack=False, level=opts.optimization)
            so.optimized_model_filepath = os.path.join(tmp, label + ".onnx")
            ort.InferenceSession(src, so, providers=opts.session_providers())
            m = onnx.load(so.optimized_model_filepath, load_external_data=False)
            counts[label] = Counter(n.op_type for n in m.graph.node)
    if len(counts) < 2:
        return {"error": "no resident graph bytes"}
    a, b = counts["baked"], counts["resident"]
    return {k: [a.get(k, 0), b.get(k, 0)] for k in sorted(set(a) | set(b)) if a.get(k, 0) != b.get(k, 0)}


def timed_runs(fn, runs: int, warm: int = 5) -> list[float]:
    """Seconds per call of ``fn`` over ``runs`` calls, after ``warm`` untimed ones."""
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def bench(spec: dict, device: str, reps: int, runs: int, log) -> dict:
    R: dict = {"model": spec["name"], "desc": spec.get("desc", "")}
    model = spec["make"]()
    data = wb.build_bundle(wb.convert(model, fold_bn=spec.get("fold_bn")))
    opts = wb.RuntimeOptions(device=device, resident=True, deterministic=spec.get("deterministic", False))
    x = make_input(spec)
    providers = opts.session_providers() if device == "cuda" else ["CPUExecutionProvider"]

    # "reload": a baked session from the model bytes, and its first answer
    mbytes = model.SerializeToString()
    ts, first = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        baked = ort.InferenceSession(mbytes, providers=providers)
        t1 = time.perf_counter()
        baked.run(None, x)
        ts.append(t1 - t0)
        first.append(time.perf_counter() - t0)
    R["reload_session_ms"], R["reload_first_answer_ms"] = med(ts) * 1e3, med(first) * 1e3
    R["baked_ms"] = med(timed_runs(lambda: baked.run(None, x), runs)) * 1e3
    log(f"  {spec['name']}: reload {R['reload_first_answer_ms']:.0f} ms, baked inference {R['baked_ms']:.2f} ms")

    b = wb.Bundle.load_from_mem(data, opts)
    t0 = time.perf_counter()
    b.init()
    b.infer(x)
    R["load_init_first_answer_ms"] = (time.perf_counter() - t0) * 1e3
    dw = b._sessions._device
    assert dw is not None
    R["weight_bytes"] = sum(s.nbytes for s in b.variables if s.name in dw.names)
    R["bundle_ms"] = med(timed_runs(lambda: b.infer(x), runs)) * 1e3
    R["steady_ratio"] = R["bundle_ms"] / R["baked_ms"]
    view = b.infer_session()[1]  # the session run alone, without Bundle.infer's checks
    R["view_ms"] = med(timed_runs(lambda: view.run(None, x), runs)) * 1e3

    # correctness against the CPU bundle, and bit for bit across bundles and runs
    bn_var = frozenset(n.input[4] for n in model.graph.node if n.op_type == "BatchNormalization")
    full = [weight_set(b, 1, positive=bn_var), weight_set(b, 2, positive=bn_var)]
    ref = wb.Bundle.load_from_mem(data)
    ref.init()
    ref.update(full[0])
    b.update(full[0])
    want, _ = ref.infer(x)
    got, _ = b.infer(x)
    k = next(iter(want))
    R["max_rel_error_vs_cpu"] = float(np.abs(got[k] - want[k]).max() / max(1e-30, float(np.abs(want[k]).max())))
    other = wb.Bundle.load_from_mem(data, opts)
    other.init()
    other.update(full[0])
    again, _ = b.infer(x)
    R["bitwise_repeat"] = bool(np.array_equal(got[k], again[k]))
    R["bitwise_two_bundles"] = bool(np.array_equal(got[k], other.infer(x)[0][k]))
    other.unload()
    ref.unload()

    # floors over exactly the bytes a full update copies
    arrays = [np.ascontiguousarray(a) for a in b._store.arrays(b._store.current(), dw.names).values()]
    R.update(h2d_floors(arrays, device, reps))
    del arrays

    # update until served: every weight, then one tensor
    largest = max((s for s in b.update_inputs if np.issubdtype(s.dtype, np.floating)), key=lambda s: int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize).name
    part = [weight_set(b, 3, [largest]), weight_set(b, 4, [largest])]
    for label, sets in (("full", full), ("one_tensor", part)):
        ts, upd, copy, copied = [], [], [], []
        for i in range(reps):
            before = b.version
            b._updater.settle()  # the last update's background work (staging blob, collection) is done, as bench_core does
            t0 = time.perf_counter()
            b.update(sets[(i + 1) % 2])
            t1 = time.perf_counter()
            out, v = b.infer(x)
            ts.append(time.perf_counter() - t0)
            upd.append(t1 - t0)
            copy.append(dw.copy_seconds)
            copied.append(dw.copied_bytes)
            assert v != before
        R[f"update_{label}_ms"] = med(ts) * 1e3
        R[f"update_{label}_call_ms"] = med(upd) * 1e3
        R[f"update_{label}_device_copy_ms"] = med(copy) * 1e3
        R[f"update_{label}_copied_bytes"] = int(med(copied))
    R["update_full_x_h2d_pageable"] = R["update_full_ms"] / R["h2d_pageable_ms"]
    if "h2d_pinned_ms" in R:
        R["update_full_x_h2d_pinned"] = R["update_full_ms"] / R["h2d_pinned_ms"]
    R["reload_over_update_full"] = R["reload_first_answer_ms"] / R["update_full_ms"]
    R["device_copies"] = dw.device_bytes() / R["weight_bytes"]
    log(f"  {spec['name']}: update {R['update_full_ms']:.1f} ms (device copy {R['update_full_device_copy_ms']:.1f}), h2d {R['h2d_pageable_ms']:.1f} ms")

    if device == "cuda":
        try:
            R["fusions"] = fusion_diff(mbytes, dw, opts)
        except Exception as e:  # noqa: BLE001 - a diagnosis: report it
            R["fusions"] = {"error": repr(e)}
    if spec.get("torn"):
        R["under_updates"] = under_updates(b, x, full, runs)
    b.unload()
    return R


def under_updates(b: wb.Bundle, x: dict, sets: list[dict], runs: int) -> dict:
    """Two inference threads while updates alternate ``sets`` every 50 ms (bounded: 3 s)."""
    expect = {}
    for i, s in enumerate(sets):
        b.update(s)
        out, v = b.infer(x)
        expect[i] = next(iter(out.values()))
    of_version: dict[int, int] = {}
    lock = threading.Lock()
    stop = threading.Event()
    lat: list[float] = []
    torn = failed = 0
    base = [timed_runs(lambda: b.infer(x), runs)]

    def client() -> None:
        nonlocal torn, failed
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                out, v = b.infer(x)
            except Exception:  # noqa: BLE001 - counted
                failed += 1
                continue
            dt = time.perf_counter() - t0
            with lock:
                which = of_version.get(v)
                lat.append(dt)
            if which is None or not np.array_equal(next(iter(out.values())), expect[which]):
                torn += 1

    threads = [threading.Thread(target=client) for _ in range(2)]
    n = 0
    with lock:
        of_version[b.version] = len(sets) - 1
    for t in threads:
        t.start()
    t_end = time.monotonic() + 3.0
    while time.monotonic() < t_end:
        i = n % 2
        v = (b.version or 0) + 1  # chosen here, so that the clients can look it up as soon as it serves
        with lock:
            of_version[v] = i
        b.update(sets[i], version=v)
        n += 1
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(30)
    return {
        "updates": n,
        "answers": len(lat),
        "torn": torn,
        "failed": failed,
        "p99_ms": float(np.percentile(lat, 99)) * 1e3 if lat else None,
        "p99_no_updates_ms": float(np.percentile(base[0], 99)) * 1e3,
    }


def _load(r: dict) -> str:
    u = r.get("under_updates")
    if not u or not u["p99_ms"]:
        return "not run"
    return f"{u['p99_ms'] / u['p99_no_updates_ms']:.2f}×, {u['torn']}/{u['answers']} ({u['updates']} updates, {u['failed']} failed)"


def markdown(results: list[dict], env: dict) -> str:
    rows = [
        "| model | steady: bundle ÷ baked | full update until served | device copy in it | × H2D floor (pageable / pinned) | reload ÷ update "
        "| one-tensor update | device copies | bitwise (repeat / 2 bundles) | max rel. error vs CPU | under updates: p99 ÷ idle p99, torn/answers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['model']} | failed: {r['error']} |")
            continue
        pinned = f"{r['update_full_x_h2d_pinned']:.1f}×" if "update_full_x_h2d_pinned" in r else "n/a"
        rows.append(
            f"| {r['model']} | {r['steady_ratio']:.2f}× | {r['update_full_ms']:.1f} ms | {r['update_full_device_copy_ms']:.1f} ms "
            f"| {r['update_full_x_h2d_pageable']:.1f}× / {pinned} | {r['reload_over_update_full']:.1f}× | {r['update_one_tensor_ms']:.1f} ms "
            f"| {r['device_copies']:.2f} | {r['bitwise_repeat']} / {r['bitwise_two_bundles']} | {r['max_rel_error_vs_cpu']:.1e} | {_load(r)} |"
        )
    return f"{env}\n\n" + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="folder for gpu.json and gpu.md")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="small models (a smoke run)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--only", default=None, help="comma-separated model names")
    args = ap.parse_args(argv)

    def log(m: str) -> None:
        print(m, flush=True)

    if args.device == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    env = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(), "device": args.device}
    if args.device == "cuda":
        try:
            import torch

            env["gpu"] = torch.cuda.get_device_name(0)
        except Exception:  # noqa: BLE001
            pass
    log(json.dumps(env))
    results = []
    for spec in models(args.quick):
        if args.only and spec["name"] not in args.only.split(","):
            continue
        t0 = time.perf_counter()
        try:
            r = bench(spec, args.device, args.reps, args.runs, log)
        except Exception as e:  # noqa: BLE001 - report it, go on with the next model
            import traceback

            traceback.print_exc()
            r = {"model": spec["name"], "error": repr(e)[:300]}
        r["seconds"] = time.perf_counter() - t0
        results.append(r)
        log(json.dumps(r))
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "gpu.json"), "w") as f:
                json.dump({"env": env, "results": results}, f, indent=1)
    md = markdown(results, env)
    print(md)
    if args.out:
        with open(os.path.join(args.out, "gpu.md"), "w") as f:
            f.write(md)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
