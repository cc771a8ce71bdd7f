"""Smoke subset: one update, one rollback and one commit through a real tritonserver.

Fast (one server start, one explicit reload), so CI runs it on every Python the README
names (``pytest -m smoke``); the full suite covers the same commands in depth on the main one.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from weightbundle import zoo
from triton_util import SECRET, control, make_repo, result, running, tensor, version

pytestmark = [pytest.mark.e2e, pytest.mark.smoke]
MODEL = zoo.mlp()
TOL = dict(rtol=1e-5, atol=1e-6)


def test_update_rollback_commit_through_tritonserver(tmp_path):
    repo = str(tmp_path / "repo")
    make_repo(repo, "mlp", MODEL, max_batch_size=8)  # batching: every input has a leading batch dim of 1
    x = np.random.default_rng(5).standard_normal((3, 16)).astype(np.float32)
    new = {"fc0.weight": np.random.default_rng(6).standard_normal((16, 32)).astype(np.float32), "fc2.bias": np.full(8, 3.0, np.float32)}
    before = zoo.ort_run(MODEL, {"x": x})["y"]
    after = zoo.ort_run(zoo.with_weights(MODEL, new), {"x": x})["y"]
    assert not np.allclose(before, after, **TOL)

    def ctl(mod, op, **fields):
        return control(mod, {"op": op, "secret": SECRET, **fields}, True)

    with running(repo, model_control_mode="explicit", load_models=["mlp"]) as srv:
        http = httpclient.InferenceServerClient(srv.http_url)
        grpc = grpcclient.InferenceServerClient(srv.grpc_url)
        try:

            def infer(c, mod):
                r = c.infer("mlp", [tensor(mod, "x", x)])
                return r.as_numpy("y"), version(r)

            y, v = infer(http, httpclient)
            assert v == 0
            np.testing.assert_allclose(y, before, **TOL)

            # update over HTTP: the next answer (over either protocol) uses the new weights
            r = http.infer("mlp", [ctl(httpclient, "update", expected_version=0)] + [tensor(httpclient, n, a[None]) for n, a in new.items()])
            assert result(r)["version"] == 1 and sorted(result(r)["updated"]) == sorted(new)
            for c, mod in ((http, httpclient), (grpc, grpcclient)):
                y, v = infer(c, mod)
                assert v == 1
                np.testing.assert_allclose(y, after, **TOL)

            # rollback over gRPC: the initial answer comes back, as a new version
            r = grpc.infer("mlp", [ctl(grpcclient, "rollback", expected_version=1)])
            assert result(r)["version"] == 2 and result(r)["restored"] == "rollback to 0"
            y, v = infer(http, httpclient)
            assert v == 2
            np.testing.assert_allclose(y, before, **TOL)

            # update again, then commit: a new version folder that serves those weights after a reload
            http.infer("mlp", [ctl(httpclient, "update")] + [tensor(httpclient, n, a[None]) for n, a in new.items()])
            r = http.infer("mlp", [ctl(httpclient, "commit", expected_version=3)])
            folder = result(r)["model_version_folder"]
            assert folder == 2 and os.path.isfile(os.path.join(repo, "mlp", str(folder), "model.bundle"))
            http.unload_model("mlp")
            http.load_model("mlp")  # default version policy: the newest folder, i.e. the commit
            y, v = infer(http, httpclient)
            assert v == 0  # a fresh weight history, starting from the committed weights
            np.testing.assert_allclose(y, after, **TOL)
        finally:
            http.close()
            grpc.close()
