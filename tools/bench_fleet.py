#!/usr/bin/env python
"""Fleet benchmark: a 64 MiB fleet push to 3 tritonservers from SeaweedFS.

Not a test: it measures and prints a markdown table, and writes ``bench_fleet.md`` and
``bench_fleet.json`` (every raw sample) into ``--out``. Everything runs on this machine:
SeaweedFS (`weed mini`) and three tritonservers on 127.0.0.1.

Each round does three things:
  A. ``weightbundle publish`` of a full checkpoint, then ``fleet.push``: the parallel
     stage on all servers and the parallel activate, reported apart, plus per server.
  B. three sequential per-server pushes of the same checkpoint (``WeightClient.push_file``
     via ``file``: the fastest single-server transport; the servers read one local file).
  C. three Triton reloads: a new version folder holding a bundle with the new weights, in
     each server's repository, then ``load_model`` on all three at once (explicit model
     control), until all three have returned.
The order of B and C rotates every round. Reported values are medians over the rounds.

Model: ``tests/zoo.big_mlp``: 4 x (2048 x 2048) FP32, 64 MiB (``--quick``: 2 x 256², 0.5 MiB, 1 round).

    python tools/bench_fleet.py            # about 1-2 minutes on 2 cores
    python tools/bench_fleet.py --quick    # keeps this script from rotting (run by the test suite)

Stops every server and SeaweedFS and removes its temp files, on errors too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "backend", ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from safetensors.numpy import save_file  # noqa: E402

from weightbundle import zoo  # noqa: E402
import weightbundle as wb  # noqa: E402
from s3_util import ACCESS_KEY, SECRET_KEY, running_seaweed  # noqa: E402  (tests/s3_util.py)
from weightbundle import fleet  # noqa: E402
from weightbundle import objectstore as osx  # noqa: E402
from weightbundle.client import WeightClient  # noqa: E402
from weightbundle.modelconfig import make_config  # noqa: E402
from weightbundle.tritonserver import TritonServer  # noqa: E402

SECRET_ENV, SECRET = "WEIGHTBUNDLE_BENCH_SECRET", "bench-secret"
MiB = 1 << 20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "tools" / "out"))
    a = ap.parse_args()
    n, layers, rounds = (256, 2, 1) if a.quick else (2048, 4, a.rounds)
    model = zoo.big_mlp(n=n, layers=layers)
    nbytes = sum(v.nbytes for v in zoo.initializers(model).values())
    os.makedirs(a.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="wb-bench-fleet-")
    os.environ.update({"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, SECRET_ENV: SECRET})
    samples: dict[str, list[float]] = {}
    per_server: list[dict[str, Any]] = []

    def note(key: str, v: float) -> None:
        samples.setdefault(key, []).append(v)

    try:
        with running_seaweed() as s3, ExitStack() as stack:
            bucket = s3.bucket("bench")
            client = s3.client()
            bundle_bytes = wb.build_bundle(wb.convert(model))
            repos, servers = [], []
            for i in range(3):
                repo = os.path.join(tmp, f"repo{i}")
                os.makedirs(os.path.join(repo, "m", "1"))
                with open(os.path.join(repo, "m", "1", "model.bundle"), "wb") as f:
                    f.write(bundle_bytes)
                params = {
                    "allow_updates": "true",
                    "update_secret_env": SECRET_ENV,
                    "s3_endpoint": s3.endpoint,
                    "s3_allowed_prefixes": f"{bucket}/fleet",
                    "file_update_dirs": tmp,
                }
                with wb.Bundle.load_from_mem(bundle_bytes) as b:
                    cfg = make_config(b, "m", 0, 1, parameters=params)
                with open(os.path.join(repo, "m", "config.pbtxt"), "w") as f:
                    f.write(cfg)
                srv = TritonServer(repo, model_control_mode="explicit", load_models=["m"], allow_metrics=False, log_file=os.path.join(tmp, f"server{i}.log"))
                stack.callback(srv.stop)
                srv.start(timeout=180)
                repos.append(repo)
                servers.append(srv)
            urls = [f"127.0.0.1:{s.http_port}" for s in servers]
            for r in range(rounds):
                rng = np.random.default_rng(100 + r)
                w = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in zoo.initializers(model).items()}
                ckpt = os.path.join(tmp, f"ckpt-{r}.safetensors")
                save_file(w, ckpt)
                version = 1000 * (r + 1)  # above whatever the per-server pushes numbered
                # A: publish + fleet push
                t0 = time.perf_counter()
                osx.publish(client, ckpt, osx.parse_url(f"s3://{bucket}/fleet"), "m", version)
                note("publish_s", time.perf_counter() - t0)
                t0 = time.perf_counter()
                rep = fleet.push(urls, "m", version, f"s3://{bucket}/fleet", secret=SECRET, deadline=300, s3=client)
                note("fleet_push_s", time.perf_counter() - t0)
                note("fleet_stage_s", rep.stage_wall_ms / 1000)
                note("fleet_activate_s", rep.activate_wall_ms / 1000)
                for s in rep.servers:
                    per_server.append(
                        {
                            "round": r,
                            "server": s.url,
                            "stage_ms": s.stage_ms,
                            "fetch_ms": s.fetch_ms,
                            "activate_ms": s.activate_ms,
                            "fetched_bytes": s.fetched_bytes,
                        }
                    )
                    note("server_stage_s", (s.stage_ms or 0) / 1000)
                    note("server_fetch_s", (s.fetch_ms or 0) / 1000)
                    note("server_activate_s", (s.activate_ms or 0) / 1000)
                order = ["seq", "reload"] if r % 2 == 0 else ["reload", "seq"]
                for what in order:
                    if what == "seq":  # B: three sequential per-server pushes
                        t0 = time.perf_counter()
                        for u in urls:
                            with WeightClient(u, "m", secret=SECRET) as c:
                                c.push_file(ckpt, via="file")
                        note("sequential_push_s", time.perf_counter() - t0)
                    else:  # C: three Triton reloads of a new version folder
                        data = wb.build_bundle(wb.convert(zoo.with_weights(model, w)))  # initial weights = the new ones
                        for repo in repos:
                            vdir = os.path.join(repo, "m", str(2 + r))
                            os.makedirs(vdir, exist_ok=True)
                            with open(os.path.join(vdir, "model.bundle"), "wb") as f:
                                f.write(data)
                        import tritonclient.http as httpclient

                        errs: list[BaseException] = []

                        def reload(u: str, errs: list[BaseException] = errs) -> None:
                            try:
                                httpclient.InferenceServerClient(u, network_timeout=300).load_model("m")
                            except BaseException as e:  # reported below
                                errs.append(e)

                        t0 = time.perf_counter()
                        ts = [threading.Thread(target=reload, args=(u,)) for u in urls]
                        [t.start() for t in ts]
                        [t.join() for t in ts]
                        if errs:
                            raise RuntimeError(f"reload failed: {errs[0]}")
                        note("triton_reload_s", time.perf_counter() - t0)
                print(f"round {r + 1}/{rounds}: {rep.table()}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in samples.items()}
    push = med["fleet_push_s"]
    rows = [
        ("publish (upload objects + manifest)", med["publish_s"], ""),
        ("**fleet push** (status + stage + ACTIVE + activate), 3 servers", push, "1.00"),
        ("  stage, all 3 in parallel", med["fleet_stage_s"], ""),
        ("  activate, all 3 in parallel", med["fleet_activate_s"], ""),
        ("  stage, per server (median)", med["server_stage_s"], ""),
        ("    of which fetch + sha256 verification from S3", med["server_fetch_s"], ""),
        ("  activate, per server (median)", med["server_activate_s"], ""),
        ("3 sequential per-server pushes (`file`)", med["sequential_push_s"], f"{med['sequential_push_s'] / push:.2f}"),
        ("3 Triton reloads (new version folder + load_model, in parallel)", med["triton_reload_s"], f"{med['triton_reload_s'] / push:.2f}"),
    ]
    md = [
        f"# Fleet push benchmark: {nbytes / MiB:.1f} MiB of weights, 3 tritonservers, SeaweedFS, {rounds} round(s), medians",
        "",
        "| what | ms | ÷ fleet push |",
        "|---|---:|---:|",
    ]
    md += [f"| {k} | {v * 1000:.1f} | {ratio} |" for k, v, ratio in rows]
    text = "\n".join(md) + "\n"
    print(text)
    with open(os.path.join(a.out, "bench_fleet.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.out, "bench_fleet.json"), "w") as f:
        json.dump({"weights_bytes": nbytes, "rounds": rounds, "samples": samples, "per_server": per_server}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
