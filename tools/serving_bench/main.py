"""The command: run every measurement in one go and write the report."""

from __future__ import annotations


import argparse
import json
import os
import secrets
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
from .common import ROOT, Artifact, Resources, SECRET_ENV, http_client, log, machine, now, other_load
from .inference import p2_inprocess, p2_triton
from .memory import p3, p3_summary
from .report import markdown, plot, strip_samples, targets
from .under_load import p4
from .update_latency import P1Server


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few repetitions (< 60 s): for CI")
    ap.add_argument("--out", default=None, help="output folder (default tools/out; tools/out/quick with --quick)")
    ap.add_argument("--n", type=int, default=None, help="layer width (default 2048; 128 with --quick)")
    ap.add_argument("--layers", default=None, help="P1 layer counts, comma-separated (default 1,4,16 = 16/64/256 MiB; 1,4 with --quick)")
    ap.add_argument("--reps", type=int, default=None, help="P1 rounds (default 5; 2 with --quick)")
    ap.add_argument("--p4-seconds", type=float, default=None, help="P4 seconds per condition (default 15; 1 with --quick)")
    args = ap.parse_args(argv)

    q = args.quick
    cfg = {
        "quick": q,
        "n": args.n or (128 if q else 2048),
        "layers": [int(v) for v in (args.layers or ("1,4" if q else "1,4,16")).split(",")],
        "batch": 8 if q else 32,
        "p1_reps": args.reps or (2 if q else 5),
        "p2_requests": 40 if q else 300,
        "p2_block": 10 if q else 25,
        "p3_instances": (1, 4),
        "p4_seconds": args.p4_seconds or (1.0 if q else 15.0),
        "p4_clients": 8,
        "p4_period": 0.1,
        "p4_instances": 2,
    }
    mid_layers = 4 if 4 in cfg["layers"] else cfg["layers"][0]
    out_dir = Path(args.out or (ROOT / "tools" / "out" / ("quick" if q else ""))).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    print(f"command: {command}", flush=True)

    def on_term(signum, frame):  # SIGTERM cleans up like Ctrl-C
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() else None
    res = Resources()
    t_all = now()
    R: dict[str, Any] = {"command": command, "cwd": os.getcwd(), "config": cfg}
    try:
        R["load_before"] = other_load()
        work = res.tempdir("wb-bench-")
        secret = secrets.token_hex(16)
        env = dict(os.environ, **{SECRET_ENV: secret})
        log(f"building models {cfg['layers']} x ({cfg['n']}x{cfg['n']})")
        arts = [Artifact(cfg["n"], Lr, work) for Lr in cfg["layers"]]
        mid = next(a for a in arts if a.layers == mid_layers)
        x = np.random.default_rng(1).standard_normal((cfg["batch"], cfg["n"])).astype(np.float32)

        os.sync()  # ~1 GB just written: let writeback finish before anything is timed

        log("P2 in-process")
        R["p2_inprocess"] = p2_inprocess(mid, x, cfg["p2_requests"], cfg["p2_block"])
        log("P2 through Triton")
        R["p2_triton"], s2 = p2_triton(res, mid, env, x, cfg["p2_requests"], cfg["p2_block"])
        mc = http_client(s2.http_url)
        R["machine"] = machine(mc.get_server_metadata().get("version"))
        mc.close()
        s2_stop = res.stop_server_async(s2)

        s1 = P1Server(res, arts, env, secret)
        try:
            s2_stop.join()
            R["p1_server_start_s"] = s1.start_s
            log("P1 update latency")
            R["p1"] = s1.p1(cfg["p1_reps"])
        finally:
            s1_stop = s1.stop_async()

        log("P3 memory")
        R["p3_model"] = mid.label
        R["p3_weight_bytes"] = mid.nbytes
        tiny = None if q else Artifact(128, 4, work)
        R["p3"] = p3(res, mid, env, secret, x, cfg["p3_instances"], parallel=q, pending=s1_stop, tiny=tiny)
        R["p3_summary"] = p3_summary(R["p3"], cfg["p3_instances"], mid.nbytes)

        log("P4 under load")
        R["p4_model"] = mid.label
        R["p4"] = p4(res, mid, env, secret, x, cfg["p4_seconds"], cfg["p4_clients"], cfg["p4_period"], cfg["p4_instances"])
        R["load_after"] = other_load()
        R["total_s"] = now() - t_all
        R["targets"] = targets(R)
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
        res.close()
        return 130
    except BaseException:
        for s in list(res.servers):
            print(f"--- tail of {s.log_path}:\n{s.log_tail(30)}", file=sys.stderr)
        raise
    finally:
        res.close()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)

    R["leaks"] = res.leaks()
    md = markdown(R)
    md += (
        "\nleak check: nothing left (servers, temp repositories, stores, shm regions, files)\n"
        if not R["leaks"]
        else f"\n**leak check: left behind: {R['leaks']}**\n"
    )
    print(md)
    (out_dir / "results.md").write_text(md)
    with open(out_dir / "results.json", "w") as f:
        json.dump(strip_samples(R), f, indent=1)
    png = plot(R, str(out_dir / "update_latency.png"))
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}" + (f", {png}" if png else " (no plot: matplotlib missing)"))
    return 1 if R["leaks"] else 0
