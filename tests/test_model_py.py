"""model.py (the Triton entry point) with a fake triton_python_backend_utils.

Fast and server-free; the same paths run for real in test_e2e_*.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest

from weightbundle import zoo
import weightbundle as wb
from weightbundle.modelconfig import make_config


class _Tensor:
    def __init__(self, name, arr):
        self._n, self._a = name, arr

    def name(self):
        return self._n

    def as_numpy(self):
        return self._a


class _Request:
    def __init__(self, **tensors):
        self._t = [_Tensor(k, v) for k, v in tensors.items()]

    def inputs(self):
        return self._t


class _Response:
    def __init__(self, output_tensors, error=None):
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors}
        self.error = error


class _Error:
    INVALID_ARG, UNAVAILABLE, ALREADY_EXISTS = "INVALID_ARG", "UNAVAILABLE", "ALREADY_EXISTS"

    def __init__(self, msg, code=None):
        self.msg, self.code = msg, code


class _Family:
    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
    registry: dict = {}

    def __init__(self, name, description, kind):
        self.name = name

    def Metric(self, labels, buckets=None):  # noqa: N802 (Triton's spelling)
        m = _Metric()
        m.buckets = buckets
        _Family.registry[(self.name, tuple(sorted(labels.items())))] = m
        return m


class _Metric:
    def __init__(self):
        self.value = 0.0

    def increment(self, v):
        self.value += v

    def set(self, v):
        self.value = v

    def observe(self, v):
        assert self.buckets, "a histogram needs buckets"
        self.observed = getattr(self, "observed", []) + [v]


class _Logger:
    lines: list = []

    @classmethod
    def log_info(cls, msg):
        cls.lines.append(("info", msg))

    @classmethod
    def log_warn(cls, msg):
        cls.lines.append(("warn", msg))


def _model(tmp_path, monkeypatch, kind: str = "CPU", params: dict | None = None):
    """model.py's TritonPythonModel, initialized as Triton would over an MLP bundle."""
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor, fake.InferenceResponse, fake.TritonError, fake.MetricFamily = _Tensor, _Response, _Error, _Family
    fake.Logger = _Logger
    _Logger.lines = []
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    path = os.path.join(os.path.dirname(wb.__file__), "triton", "model.py")
    spec = importlib.util.spec_from_file_location("wb_triton_model_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setenv("WB_UNIT_SECRET", "s")
    d = tmp_path / "m"
    (d / "1").mkdir(parents=True)
    wb.save_bundle(d / "1" / "model.bundle", wb.build_bundle(wb.convert(zoo.mlp())))
    with wb.Bundle.load_from_file(d / "1" / "model.bundle") as b:
        cfg_text = make_config(b, "m", 0, 1)
    assert 'backend: "weightbundle"' in cfg_text
    cfg = {
        "max_batch_size": 0,
        "parameters": {
            "allow_updates": {"string_value": "true"},
            "update_secret_env": {"string_value": "WB_UNIT_SECRET"},
            "store_root": {"string_value": str(tmp_path)},
            **{k: {"string_value": v} for k, v in (params or {}).items()},
        },
    }
    m = mod.TritonPythonModel()
    m.initialize(
        {
            "model_config": json.dumps(cfg),
            "model_repository": str(d),
            "model_version": "1",
            "model_name": "m",
            "model_instance_kind": kind,
            "model_instance_name": "m_0",
            "model_instance_device_id": "0" if kind == "CPU" else "1",
        }
    )
    return m


@pytest.fixture
def model_py(tmp_path, monkeypatch):
    m = _model(tmp_path, monkeypatch)
    yield m
    m.finalize()


def test_a_gpu_instance_left_on_device_cpu_says_so_and_device_cuda_needs_its_provider(tmp_path, monkeypatch):
    import onnxruntime as ort

    m = _model(tmp_path / "a", monkeypatch, kind="GPU")
    try:
        assert any(level == "info" and "device is 'cpu'" in msg for level, msg in _Logger.lines), _Logger.lines
        out = m.execute([_Request(x=np.ones((2, 16), np.float32))])
        assert out[0].error is None
        assert m.service.bundle.options.device_id == 1  # Triton's model_instance_device_id
    finally:
        m.finalize()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(wb.BundleError, match="onnxruntime-gpu"):
            _model(tmp_path / "b", monkeypatch, kind="GPU", params={"device": "cuda"})


def test_execute_routes_inference_and_commands_and_records_metrics(model_py):
    x = np.ones((2, 16), np.float32)
    ctl = lambda body: np.array([json.dumps(body).encode()], dtype=object)  # noqa: E731
    w = np.zeros((16, 32), np.float32)
    out = model_py.execute(
        [_Request(x=x), _Request(CONTROL=ctl({"op": "update", "secret": "s"}), **{"fc0.weight": w}), _Request(x=x), _Request(CONTROL=ctl({"op": "update"}))]
    )
    assert out[0].error is None and out[0].outputs["WEIGHTS_VERSION"].tolist() == [0]
    np.testing.assert_allclose(out[0].outputs["y"], zoo.ort_run(zoo.mlp(), {"x": x})["y"], rtol=1e-5, atol=1e-6)
    assert json.loads(out[1].outputs["CONTROL_RESULT"][0])["version"] == 1
    np.testing.assert_allclose(out[2].outputs["y"], zoo.ort_run(zoo.with_weights(zoo.mlp(), {"fc0.weight": w}), {"x": x})["y"], rtol=1e-5, atol=1e-6)
    assert out[3].error is not None and "secret" in out[3].error.msg and out[3].error.code == "INVALID_ARG"
    reg = _Family.registry
    applied = [m.value for (name, labels), m in reg.items() if name == "weightbundle_updates_applied_total"]
    rejected = [(dict(labels)["reason"], m.value) for (name, labels), m in reg.items() if name == "weightbundle_updates_rejected_total"]
    assert applied == [1.0] and rejected == [("auth", 1.0)]
    assert [m.value for (name, _), m in reg.items() if name == "weightbundle_weights_version"] == [1]
    [hist] = [m for (name, _), m in reg.items() if name == "weightbundle_update_duration_seconds"]
    assert len(hist.observed) == 1 and hist.observed[0] > 0
    # Version changes reach Triton's log as notes.
    assert any(level == "info" and "update -> weights version 1" in msg for level, msg in _Logger.lines), _Logger.lines
