"""Steady-state inference: through Triton (our backend vs a plain python-backend model) and in-process."""

from __future__ import annotations


import os
from typing import Any, Callable

import numpy as np


import onnxruntime as ort

import weightbundle as wb
from weightbundle.tritonserver import TritonServer
from .common import (
    Artifact,
    MODES,
    MODE_LABEL,
    Resources,
    _PRIVATE_STORES,
    add_plain_model,
    add_wb_model,
    http_client,
    med,
    now,
    pct,
    quiesce,
    rotate,
    runtime_options,
    wait_optimised,
)


# --------------------------------------------------------------------------- P2 in-process
def p2_inprocess(art: Artifact, x: np.ndarray, n_req: int, block: int) -> dict:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    baked = ort.InferenceSession(art.onnx["A"], so, providers=["CPUExecutionProvider"])
    bundles = {f"Bundle {MODE_LABEL[m]}": wb.Bundle.load_from_file(art.bundle_path, runtime_options(m)) for m in ("T", "F")}
    _PRIVATE_STORES.extend(b.store.path for b in bundles.values())
    try:
        for b in bundles.values():
            b.init()
            b.infer({"x": x})
            wait_optimised(b)
        fns: dict[str, Callable[[], Any]] = {"ORT baked": lambda: baked.run(None, {"x": x})}
        for k, b in bundles.items():
            fns[k] = lambda b=b: b.infer({"x": x})
        ref = baked.run(None, {"x": x})[0]
        for b in bundles.values():  # same answers, or the comparison means nothing
            np.testing.assert_allclose(b.infer({"x": x})[0]["y"], ref, rtol=1e-4, atol=1e-5)
        lat: dict[str, list[float]] = {k: [] for k in fns}
        names = list(fns)
        for k in names:
            for _ in range(3):
                fns[k]()
        for bi in range(max(1, n_req // block)):
            for k in rotate(names, bi):
                f = fns[k]
                for _ in range(block):
                    t0 = now()
                    f()
                    lat[k].append(now() - t0)
        return {"samples_s": lat, "p50_ms": {k: med(v) * 1e3 for k, v in lat.items()}}
    finally:
        for b in bundles.values():
            b.unload()


def p2_triton(res: Resources, art: Artifact, env: dict, x: np.ndarray, n_req: int, block: int) -> tuple[dict, TritonServer]:
    """A server of its own (4 models, 1 instance each): p50 of sequential requests, interleaved blocks."""
    import tritonclient.http as httpclient

    work = res.tempdir("wb-bench-p2-")
    repo = os.path.join(work, "repo")
    os.makedirs(repo)
    variants = {"wbT": MODES["T"], "wbF": MODES["F"]}
    for name, params in variants.items():
        add_wb_model(repo, name, art, 1, **params)
    add_plain_model(repo, "plain", art, 1)
    names = list(variants) + ["plain"]
    srv = res.start_server(repo, env, "p2")
    c = http_client(srv.http_url)
    try:
        inp = httpclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        outs = [httpclient.InferRequestedOutput("y")]
        ref = None
        for n in names:  # warm, and check every model gives the same answer
            for _ in range(5):
                y = c.infer(n, [inp], outputs=outs).as_numpy("y")
            ref = y if ref is None else ref
            np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
        quiesce(srv.pid)  # background (pre-packed) session builds are done
        lat: dict[str, list[float]] = {n: [] for n in names}
        for bi in range(max(1, n_req // block)):
            for n in rotate(names, bi):
                for _ in range(block):
                    t0 = now()
                    c.infer(n, [inp], outputs=outs)
                    lat[n].append(now() - t0)
        return ({"samples_s": lat, "p50_ms": {n: med(v) * 1e3 for n, v in lat.items()}, "p90_ms": {n: pct(v, 90) * 1e3 for n, v in lat.items()}}, srv)
    finally:
        c.close()
