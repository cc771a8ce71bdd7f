#!/usr/bin/env python
"""Real architectures through a real Triton: a full weight update against Triton's reload.

Not a test: it measures and prints a markdown table (and writes JSON).  Per model (ResNet-50
built with ``--fold-bn``, and the BERT-style transformer encoder; ``--only`` picks), one
server holds two models with one instance each:

  wb     the bundle, default settings; updated with the ``file`` transport (the server reads
         a safetensors file the client wrote first, which is not counted).
  plain  a python-backend model running a baked ORT session; "reload" writes the same new
         weights as a new version folder (not counted) and calls ``load_model``.

Both are timed from the call until a response carries the new version, so both sides
include one inference; the rounds interleave the two and wait for the server to go quiet
between them.  "Ceiling" is reload over one steady inference: reload / served cannot
exceed it however fast the update.

    python tools/bench_real.py                      # both models, 5 rounds: 1-4 minutes
    python tools/bench_real.py --only resnet50 --reps 3
    python tools/bench_real.py --quick               # tiny models, one round: for the test suite
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/: bench_core and the serving_bench package
import bench_core  # noqa: E402
import weightbundle as wb  # noqa: E402
from serving_bench.common import PLAIN_MODEL_PY, SECRET_ENV, Resources, log, med, now, quiesce, rotate  # noqa: E402
from weightbundle.client import WeightClient  # noqa: E402
from weightbundle.modelconfig import make_config  # noqa: E402


def plain_config(name: str, b: wb.Bundle) -> str:
    """The bundle's own I/O (same names, dtypes and shapes), plus WEIGHTS_VERSION."""
    from weightbundle.modelconfig import triton_dtype

    def io(t) -> str:
        dims = ", ".join(str(d if isinstance(d, int) else -1) for d in t.shape)
        return f'{{ name: "{t.name}" data_type: {triton_dtype(t.dtype)} dims: [ {dims} ] }}'

    outs = [io(t) for t in b.outputs] + ['{ name: "WEIGHTS_VERSION" data_type: TYPE_UINT64 dims: [ 1 ] }']
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
        f"input [ {', '.join(io(t) for t in b.inputs)} ]\noutput [ {', '.join(outs)} ]\n"
        "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
    )


def infer_version(c, model: str, name: str, x: np.ndarray) -> int:
    import tritonclient.http as httpclient

    i = httpclient.InferInput(name, list(x.shape), "INT64" if x.dtype == np.int64 else "FP32")
    i.set_data_from_numpy(x)
    r = c.infer(model, [i], outputs=[httpclient.InferRequestedOutput("WEIGHTS_VERSION")])
    return int(r.as_numpy("WEIGHTS_VERSION").reshape(-1)[0])


def bench(spec: dict, res: Resources, env: dict, secret: str, reps: int) -> dict:
    import tritonclient.http as httpclient
    from safetensors.numpy import save_file

    model = bench_core.make_model(spec)
    work = res.tempdir(f"wb-bench-real-{spec['name']}-")
    repo, allowed = os.path.join(work, "repo"), os.path.join(work, "allowed")
    os.makedirs(os.path.join(repo, "wb", "1"))
    os.makedirs(allowed)
    t0 = now()
    data = wb.build_bundle(wb.convert(model, **spec.get("convert", {})))
    build_s = now() - t0
    wb.save_bundle(os.path.join(repo, "wb", "1", "model.bundle"), data)
    with wb.Bundle.load_from_mem(data) as b:
        params = {"allow_updates": "true", "update_secret_env": SECRET_ENV, "file_update_dirs": allowed}
        with open(os.path.join(repo, "wb", "config.pbtxt"), "w") as f:
            f.write(make_config(b, "wb", 0, 1, parameters=params))
        os.makedirs(os.path.join(repo, "plain"))
        with open(os.path.join(repo, "plain", "config.pbtxt"), "w") as f:
            f.write(plain_config("plain", b))
        sets = bench_core.weight_sets(model, b.sources)
    onnx_sets = [bench_core.zoo.with_weights(model, s).SerializeToString() for s in sets]

    def write_plain(version: int) -> None:
        d = os.path.join(repo, "plain", str(version))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "model.py"), "w") as f:
            f.write(PLAIN_MODEL_PY)
        with open(os.path.join(d, "model.onnx"), "wb") as f:
            f.write(onnx_sets[version % 2])

    write_plain(1)
    srv = res.start_server(repo, env, f"real-{spec['name']}", model_control_mode="explicit", load_models=["wb", "plain"])
    c = httpclient.InferenceServerClient(srv.http_url, connection_timeout=600, network_timeout=600)
    wc = WeightClient(srv.http_url, "wb", secret=secret)
    res.clients.append(wc)
    x, name = bench_core.make_input(spec), bench_core.input_name(spec)
    state = {"plain": 1, "turn": 0}

    def until(model_name: str, version: int, t0: float) -> float:
        while infer_version(c, model_name, name, x) != version:
            if now() - t0 > 300:
                raise TimeoutError(f"{model_name} never served version {version}")
        return now() - t0

    def reload() -> dict:
        v = state["plain"] + 1
        write_plain(v)
        t0 = now()
        c.load_model("plain")
        ack = now() - t0
        total = until("plain", v, t0)
        state["plain"] = v
        return {"total": total, "ack": ack}

    def update() -> dict:
        state["turn"] += 1
        path = os.path.join(allowed, "w.safetensors")
        save_file(sets[state["turn"] % 2], path)
        t0 = now()
        v = wc.push_file(path, via="file").version
        ack = now() - t0
        return {"total": until("wb", v, t0), "ack": ack}

    def steady(model_name: str) -> dict:
        ts = []
        for _ in range(3):
            t0 = now()
            infer_version(c, model_name, name, x)
            ts.append(now() - t0)
        return {"total": med(ts)}

    methods = {"steady:plain": lambda: steady("plain"), "steady:wb": lambda: steady("wb"), "reload": reload, "update:file": update}
    for fn in methods.values():  # warm: connections, the update graph, the first reload
        fn()
    raw: dict[str, list[dict]] = {m: [] for m in methods}
    for r in range(reps):
        for m in rotate(list(methods), r):
            quiesce(srv.pid)
            raw[m].append(methods[m]())
        log(f"{spec['name']} round {r + 1}/{reps}")
    wc.close()
    c.close()
    res.stop_server(srv)
    ms = {m: {k: med([row[k] for row in rows]) * 1e3 for k in rows[0]} for m, rows in raw.items()}
    reload_ms, served_ms, steady_ms = ms["reload"]["total"], ms["update:file"]["total"], ms["steady:plain"]["total"]
    return {
        "name": spec["name"],
        "desc": spec["desc"],
        "load_average": os.getloadavg(),
        "build_bundle_s": build_s,
        "median_ms": ms,
        "raw_s": raw,
        "reload_over_update": reload_ms / served_ms,
        "ceiling": reload_ms / steady_ms,
    }


def markdown(results: list[dict]) -> str:
    rows = [
        "| model | steady inference (plain / bundle) | Triton reload (ack) | `file` update → served (ack) | reload ÷ update | ceiling (reload ÷ one inference) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for R in results:
        m = R["median_ms"]
        rows.append(
            f"| {R['name']} | {m['steady:plain']['total']:.1f} / {m['steady:wb']['total']:.1f} ms | {m['reload']['total']:.0f} ms ({m['reload']['ack']:.0f}) | "
            f"{m['update:file']['total']:.0f} ms ({m['update:file']['ack']:.0f}) | **{R['reload_over_update']:.2f}×** | {R['ceiling']:.1f}× |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help="comma-separated: resnet50, transformer (--quick: conv-quick, transformer-quick)")
    ap.add_argument("--reps", type=int, default=None, help="rounds (default 5; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny models, one round (seconds): keeps this script from rotting")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    args = ap.parse_args(argv)
    args.only = args.only or ("conv-quick,transformer-quick" if args.quick else "resnet50,transformer")
    args.reps = args.reps or (1 if args.quick else 5)
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}", flush=True)
    specs = {s["name"]: s for s in bench_core.model_specs(args.quick)}
    secret = secrets.token_hex(16)
    env = dict(os.environ, **{SECRET_ENV: secret})
    res = Resources()
    results = []
    try:
        for name in args.only.split(","):
            results.append(bench(specs[name], res, env, secret, args.reps))
    finally:
        res.close()
    leaks = res.leaks()
    table = markdown(results)
    print("\n" + table + ("" if not leaks else f"\n\n**leak check: left behind: {leaks}**"))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_real.json"), "w") as f:
        json.dump({"results": results, "leaks": leaks, "load": os.getloadavg()}, f, indent=1, default=float)
    with open(os.path.join(args.out, "bench_real.md"), "w") as f:
        f.write(table + "\n")
    return 1 if leaks else 0


if __name__ == "__main__":
    sys.exit(main())
