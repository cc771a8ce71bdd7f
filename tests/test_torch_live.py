"""Live PyTorch check (issue 9): export a fresh model, build, train 3 steps, push the state_dict.

Skips when torch is not installed; the fixture tests (test_trainer.py) cover the same
paths on committed exports, so CI never needs torch.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch",
    reason="torch is not installed (pip install torch==2.13.0, the CPU wheel): "
    "the live export check is skipped; tests/test_trainer.py covers the same paths on fixtures",
)

import weightbundle as wb  # noqa: E402
from weightbundle.torch import export, state_dict  # noqa: E402

_spec = importlib.util.spec_from_file_location("make_torch_fixtures", os.path.join(os.path.dirname(__file__), "..", "tools", "make_torch_fixtures.py"))
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)


@pytest.mark.parametrize("how", ["helper", "torchscript_default", "dynamo_default"])
@pytest.mark.parametrize("name", ["transformer", "tied", "convnet"])
def test_train_three_steps_and_push(name, how, tmp_path):
    if how == "dynamo_default" and importlib.util.find_spec("onnxscript") is None:
        pytest.skip("the dynamo exporter needs onnxscript")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(7)
    m = fx.MODELS[name]()
    with torch.no_grad():
        fx._randomize_bn(m, g)
    m.eval()
    x = fx._example(name, g)
    path = str(tmp_path / "m.onnx")
    if how == "helper":
        export(m, (x,), path)
        graphs = wb.convert(path, checkpoint=state_dict(m))
    else:
        torch.onnx.export(
            m,
            (x,),
            path,
            input_names=["x"],
            output_names=["y"],
            dynamo=how == "dynamo_default",
            **({} if how == "dynamo_default" else {"dynamic_axes": {"x": {0: "batch"}}}),
        )
        graphs = wb.convert(path, checkpoint=m.state_dict())  # torch tensors as they are; tied names share storage
    with wb.Bundle.load_from_mem(wb.build_bundle(graphs)) as b:
        b.init()
        fx._train(m, name, g)
        with torch.no_grad():
            want = m(x).numpy()
        r = b.load_state_dict(m.state_dict(), strict=False)  # torch tensors accepted directly
        assert all(n.endswith("num_batches_tracked") for n in r["ignored"]), r["ignored"]
        got = b.infer({"x": x.numpy()})[0]["y"]
    scale = max(float(np.abs(want).max()), 1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)
