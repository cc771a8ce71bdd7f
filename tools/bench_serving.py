#!/usr/bin/env python
"""Serving benchmark: weight updates through a real Triton vs a Triton reload.

Not a test: it measures, prints markdown tables, writes ``results.json`` (every raw
sample) and ``update_latency.png`` into ``--out``.  All figures come from ONE run on
one machine; repetitions are interleaved (the order rotates every round) so a noisy
machine shifts a ratio's numerator and denominator alike; reported values are medians.

Model: ``weightbundle.zoo.big_mlp``, L x (n x n) FP32 MatMul+Relu, no bias (n=2048: 16 MiB per
layer), batch-32 input, no Triton batching (max_batch_size 0), ``intra_op_threads`` left at 0
(ORT's default with one instance; with several, the CPUs divided among them).

The measurements (``tools/serving_bench/``, one module each; the report labels them P1-P4):

P1  update latency (``update_latency``), 16/64/256 MiB of weights (L = 1/4/16), full updates.  Time from the
    client call until the next inference response (a 1-row probe) reports the new
    version.  Transports: ``request`` (tensors in the HTTP body), ``shm`` (WeightClient:
    weights copied into the client's /dev/shm region, which the server reads), ``shm-staged``
    (weights already in the region: the producer-writes-into-shm case), ``file``
    (safetensors in an allowlisted /tmp dir; the client's file write is reported apart).
    Each for the backend modes in MODES: prepack=true (the default; hybrid where the
    backend has it), prepack=true hybrid=false, prepack=false.  Before every visit the
    server is left to go idle (background session builds, staging allocation).  Beside
    them: Triton's own reload of a plain python-backend model (ORT, baked initializers)
    of the same graph: write a new version folder, explicit ``load_model``, until the new
    version answers; and the memcpy floor, ``np.copyto`` of the same bytes into a
    pre-faulted buffer (median of 3 per visit).
P2  steady-state inference (``inference``): through Triton, on a server of its own (our backend prepack
    true/false vs the plain python-backend model; p50 of N sequential requests,
    interleaved blocks), and in-process (``Bundle.infer`` vs an ORT session on the
    original model).
P3  memory (``memory``; ``tools/bench_memory.py`` runs it alone) with 1 and 4 instances: RSS/PSS/anon of the tritonserver process tree, and
    /dev/shm bytes (weight store, python-backend regions), idle and after one full update;
    an "overhead probe" (same backend, tiny weights) separates per-process overhead from
    weight copies.
P4  under load (``under_load``): 8 client threads inferring for ~15 s (2 instances) while an update of one
    layer is pushed via shm every 100 ms (or back to back when an update takes longer), vs
    the same without updates (phases interleaved): p50/p99, failed requests, torn
    responses (output != the reference for the version the response reports; references
    precomputed in-process with ONNX Runtime).

    python tools/bench_serving.py            # full: about 5-6 minutes on 2 cores
    python tools/bench_serving.py --quick    # tiny model, < 60 s: keeps this script from rotting

Cleans up every server, temp repository, shm region and file it made, on Ctrl-C too.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/: the serving_bench package

from serving_bench.common import SECRET_ENV, Artifact, Resources  # noqa: E402  (re-exported for tools/bench_memory.py)
from serving_bench.main import main  # noqa: E402
from serving_bench.memory import p3, p3_summary  # noqa: E402

__all__ = ["SECRET_ENV", "Artifact", "Resources", "main", "p3", "p3_summary"]

if __name__ == "__main__":
    sys.exit(main())
