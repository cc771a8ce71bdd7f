#!/usr/bin/env python3
"""Serve model_repository/mlp on a real tritonserver and change its weights while it serves.

Steps: start tritonserver (127.0.0.1, free ports) -> infer -> push a weight update with
tritonclient -> infer again (answer and WEIGHTS_VERSION changed) -> roll back -> stop.
"""

from __future__ import annotations

import json
import os
import secrets
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from weightbundle.tritonserver import TritonServer

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "model_repository")


def control(body: dict) -> httpclient.InferInput:
    # CONTROL: one JSON string. The model batches (max_batch_size 8), so shape [1, 1].
    c = httpclient.InferInput("CONTROL", [1, 1], "BYTES")
    c.set_data_from_numpy(np.array([[json.dumps(body).encode()]], dtype=object))
    return c


def main() -> int:
    secret = secrets.token_hex(16)  # the model reads it from $WEIGHTBUNDLE_SECRET (config: update_secret_env)
    features = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 16)
    with TritonServer(REPO, env=dict(os.environ, WEIGHTBUNDLE_SECRET=secret)) as srv:
        print(f"tritonserver ready: HTTP {srv.http_url}, gRPC {srv.grpc_url}, metrics {srv.metrics_url}")
        http = httpclient.InferenceServerClient(srv.http_url)
        grpc = grpcclient.InferenceServerClient(srv.grpc_url)

        def infer(tag: str) -> np.ndarray:
            x = httpclient.InferInput("features", list(features.shape), "FP32")
            x.set_data_from_numpy(features)
            r = http.infer("mlp", [x])
            g = grpcclient.InferInput("features", list(features.shape), "FP32")
            g.set_data_from_numpy(features)
            rg = grpc.infer("mlp", [g])
            assert np.array_equal(r.as_numpy("scores"), rg.as_numpy("scores"))  # HTTP and gRPC agree
            print(f"{tag:<28} scores={np.round(r.as_numpy('scores')[0], 4)}  WEIGHTS_VERSION={int(r.as_numpy('WEIGHTS_VERSION')[0, 0])}")
            return r.as_numpy("scores")

        before = infer("initial weights:")

        # A weight update is just a request: CONTROL + the tensors to replace, named as in
        # `weightbundle inspect`. Weights not sent are kept. Batching model: leading dim 1.
        new_w = np.random.default_rng(42).standard_normal((64, 4)).astype(np.float32)
        w = httpclient.InferInput("fc2.weight", [1, 64, 4], "FP32")
        w.set_data_from_numpy(new_w[None])
        r = http.infer("mlp", [control({"op": "update", "secret": secret}), w])
        print(f"update acknowledged:         {r.as_numpy('CONTROL_RESULT')[0, 0].decode()}")
        after = infer("after update:")

        r = http.infer("mlp", [control({"op": "rollback", "secret": secret})])
        print(f"rollback acknowledged:       {r.as_numpy('CONTROL_RESULT')[0, 0].decode()}")
        back = infer("after rollback:")

        http.close()
        grpc.close()
    # allclose, not array_equal: the first inference of a version runs on its zero-copy session and later
    # ones on the pre-packed session, whose GEMM kernels may round differently in the last bit.
    ok = not np.allclose(before, after) and np.allclose(before, back, rtol=1e-5, atol=1e-6)
    print("OK: the answer changed with the update and came back with the rollback, no reload." if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
