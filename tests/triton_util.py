"""Helpers for end-to-end tests against a real tritonserver (see weightbundle.tritonserver)."""

from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import numpy as np
import onnx

import weightbundle as wb
from weightbundle.modelconfig import make_config
from weightbundle.tritonserver import TritonServer

SECRET = "e2e-secret-value"
SECRET_ENV = "WEIGHTBUNDLE_E2E_SECRET"


def make_repo(root: str, name: str, model: onnx.ModelProto, *, max_batch_size: int = 0, instances: int = 1, include_init: bool = True, **params: str) -> str:
    """A model repository folder with one weightbundle model at version 1."""
    d = os.path.join(root, name)
    os.makedirs(os.path.join(d, "1"), exist_ok=True)
    path = os.path.join(d, "1", "model.bundle")
    wb.save_bundle(path, wb.build_bundle(wb.convert(model), include_init=include_init))
    params = {"allow_updates": "true", "update_secret_env": SECRET_ENV, **params}
    with wb.Bundle.load_from_file(path) as b:
        text = make_config(b, name, max_batch_size, instances, parameters=params)
    with open(os.path.join(d, "config.pbtxt"), "w") as f:
        f.write(text)
    return root


@contextmanager
def running(repo: str, **kw: Any) -> Iterator[TritonServer]:
    env = dict(os.environ, **{SECRET_ENV: SECRET})
    kw.setdefault("log_file", os.path.join(os.path.dirname(os.path.abspath(repo)), f"tritonserver-{os.path.basename(repo)}-{uuid.uuid4().hex[:6]}.log"))
    srv = TritonServer(repo, env=env, **kw)
    try:
        srv.start(timeout=90)
    except Exception:
        print(srv.log_tail(80))
        srv.stop()
        raise
    try:
        yield srv
    finally:
        srv.stop()


def control(mod: Any, body: Mapping[str, Any], batching: bool) -> Any:
    arr = np.array([json.dumps(body).encode()], dtype=object).reshape((1, 1) if batching else (1,))
    i = mod.InferInput("CONTROL", list(arr.shape), "BYTES")
    i.set_data_from_numpy(arr)
    return i


def tensor(mod: Any, name: str, arr: np.ndarray) -> Any:
    from tritonclient.utils import np_to_triton_dtype

    i = mod.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
    i.set_data_from_numpy(arr)
    return i


def result(r: Any) -> dict[str, Any]:
    return json.loads(r.as_numpy("CONTROL_RESULT").reshape(-1)[0])


def version(r: Any) -> int:
    return int(r.as_numpy("WEIGHTS_VERSION").reshape(-1)[0])
