"""Memory only: weight copies resident in a real tritonserver (bench_serving's P3, on its own).

    .venv/bin/python tools/bench_memory.py            # 64 MiB MLP, 1 and 4 instances (~2 min)

For each mode (default pre-packed, zero-copy ``prepack=false``, a plain baked python-backend
model) it starts one server per instance count, measures the tritonserver process tree
(PSS: anonymous + file-backed) plus the server's /dev/shm, idle and after one update,
subtracts a tiny-weights probe's per-process overhead, and reports weight copies.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_serving as bs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2048, help="layer width (default %(default)s: 4 layers = 64 MiB)")
    a = ap.parse_args(argv)
    res = bs.Resources()
    try:
        work = res.tempdir("wb-bench-mem-")
        secret = secrets.token_hex(16)
        env = dict(os.environ, **{bs.SECRET_ENV: secret})
        model, tiny = bs.Artifact(a.n, 4, work), bs.Artifact(128, 4, work)
        x = np.random.default_rng(1).standard_normal((32, a.n)).astype(np.float32)
        summary = bs.p3_summary(bs.p3(res, model, env, secret, x, (1, 4), parallel=False, tiny=tiny), (1, 4), model.nbytes)
    finally:
        res.close()
    print(f"\nweight copies resident ({model.nbytes / 2**20:.0f} MiB of weights; command: {' '.join(sys.argv)})\n")
    print("| mode | x4 idle | store | file-backed | anon | each extra instance | x4 after one update |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, d in summary.items():
        r = d.get("resident_x4")
        if not r:
            continue
        growth = d.get("update_growth_x4", {}).get("total_copies")
        after = "" if growth is None else f"{r['total_copies'] + growth:.2f}"
        print(
            f"| {kind} | {r['total_copies']:.2f} | {r['store_copies']:.2f} | {r['file_copies']:.2f} | {r['anon_copies']:.2f} | "
            f"{d['weight_copies_est']:.2f} | {after} |"
        )
    return 1 if res.leaks() else 0


if __name__ == "__main__":
    sys.exit(main())
