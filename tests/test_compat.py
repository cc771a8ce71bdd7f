"""Portability across the ONNX Runtime / onnx versions the supported Pythons get (issue 13).

Python 3.10's newest ONNX Runtime (1.23) has no in-memory external initializers and loads
ONNX IR up to 11; the init graph then runs through its fallback path, and the generated
graphs must not carry the installed onnx's newest IR. Both paths are checked here on
whatever ONNX Runtime is installed, so the suite on 3.11+ also covers the 3.10 path.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from weightbundle import zoo
import weightbundle as wb
from weightbundle import runtime
from weightbundle.convert import GRAPH_IR_VERSION
from weightbundle.format import GRAPH_INIT, GRAPH_UPDATE

MODELS = {k: v for k, v in zoo.MODELS.items() if k != "attention"}
HAS_IN_MEMORY = hasattr(ort.SessionOptions(), "add_external_initializers_from_files_in_memory")


def _initial(model: onnx.ModelProto, b: wb.Bundle) -> dict[str, np.ndarray]:
    inits = zoo.initializers(model)
    return {v.name: np.asarray(inits[v.name], v.np_dtype) for v in b.variables}


def _current(b: wb.Bundle) -> dict[str, np.ndarray]:
    v = b.store.current()
    return {s.name: np.array(b.store.array(v, s.name)) for s in b.variables}


@pytest.fixture(params=["fallback", "in_memory"])
def init_path(request, monkeypatch):
    """Force one init path for Bundle.init (the in-memory one only where ONNX Runtime has it)."""
    if request.param == "in_memory" and not HAS_IN_MEMORY:
        pytest.skip(f"onnxruntime {ort.__version__} has no add_external_initializers_from_files_in_memory")
    real = runtime.run_init_graph
    monkeypatch.setattr(runtime, "run_init_graph", lambda proto, section, so: real(proto, section, so, in_memory=request.param == "in_memory"))
    return request.param


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("source", ["file", "mem"])
def test_init_paths_give_the_initial_weights_exactly(name, source, init_path, tmp_path):
    model = MODELS[name]()
    data = wb.build_bundle(wb.convert(model))
    path = os.path.join(tmp_path, "m.bundle")
    wb.save_bundle(path, data)
    # load_from_file maps the file read-only: the fallback's feeds are views of that mapping
    b = wb.Bundle.load_from_file(path) if source == "file" else wb.Bundle.load_from_mem(data)
    try:
        assert b.init() == 0
        want, got = _initial(model, b), _current(b)
        for n in want:
            assert got[n].dtype == want[n].dtype and got[n].shape == want[n].shape, n
            assert got[n].tobytes() == want[n].tobytes(), n
        x = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
        if name == "mlp":  # and the session built on those weights answers like ORT on the original
            ref = zoo.ort_run(model, {"x": x})["y"]
            np.testing.assert_allclose(b.execute(0, {"x": x})["y"], ref, rtol=1e-5, atol=1e-6 * float(np.abs(ref).max()))
    finally:
        b.unload()


def test_fallback_leaves_the_stored_init_graph_untouched():
    """The fallback rewrites a copy: the bundle's own init graph (used again by reset) keeps its constants."""
    b = wb.Bundle.load_from_mem(wb.build_bundle(wb.convert(zoo.mlp())))
    try:
        before = b._graphs[GRAPH_INIT].SerializeToString()
        b.init()
        proto = onnx.ModelProto()
        proto.CopyFrom(b._graphs[GRAPH_INIT])
        first = _current(b)
        so = ort.SessionOptions()
        outs = runtime.run_init_graph(_pointed(b, proto), b._weight_section(), so, in_memory=False)
        assert b._graphs[GRAPH_INIT].SerializeToString() == before
        for v, a in zip(b.variables, outs):
            assert a.tobytes() == first[v.name].tobytes()
        assert b.init() == 1 and all(_current(b)[n].tobytes() == a.tobytes() for n, a in first.items())
    finally:
        b.unload()


def _pointed(b: wb.Bundle, proto: onnx.ModelProto) -> onnx.ModelProto:
    """The init graph with its constants pointed at the weight section, as Bundle.init does."""
    rows = {r["name"]: r for r in b._layout.toc["variables"]}
    for t in proto.graph.initializer:
        name = t.name[len("init/") :]
        del t.external_data[:]
        t.data_location = onnx.TensorProto.EXTERNAL
        for k, val in (("location", "weights"), ("offset", rows[name]["offset"]), ("length", rows[name]["nbytes"])):
            t.external_data.add(key=k, value=str(val))
    return proto


def test_generated_graphs_declare_the_ir_of_their_opset():
    """Not the installed onnx's newest IR, which older ONNX Runtimes refuse to load."""
    b = wb.Bundle.load_from_mem(wb.build_bundle(wb.convert(zoo.mlp())))
    try:
        for gid in (GRAPH_INIT, GRAPH_UPDATE):
            assert b._graphs[gid].ir_version == GRAPH_IR_VERSION, gid
        # a retyped update graph is generated at run time: it loads too
        v = b.init()
        assert b.update({"fc0.bias": np.ones(32, np.float64)}) == v + 1
        assert b._graphs[GRAPH_UPDATE].ir_version == GRAPH_IR_VERSION
    finally:
        b.unload()


def test_update_graph_with_derived_variables_declares_a_loadable_ir():
    """Folding BatchNorm makes derived variables and an update graph on the model's own opset."""
    model = zoo.convnet()
    data = wb.build_bundle(wb.convert(model, fold_bn=True))
    b = wb.Bundle.load_from_mem(data)
    try:
        ir = b._graphs[GRAPH_UPDATE].ir_version
        assert GRAPH_IR_VERSION <= ir <= 10, ir  # ONNX Runtime 1.21 (the floor) loads up to IR 10
        v = b.init()
        src = [s for s in b.update_inputs if s.dtype.kind == "f"][0]
        assert b.update({src.name: np.zeros(src.shape, src.dtype)}) == v + 1
    finally:
        b.unload()


# ---- model.py refuses a stub that misreads numpy (Triton 2.51's stubs under numpy 2) ---------------
class _StubTensor:
    """A pb_utils.Tensor stand-in; ``garble`` mimics the faulty stub: arrays built from a
    pointer (as inputs are) read every element from the first one's address."""

    garble = False

    def __init__(self, name, arr):
        self._a = np.asarray(arr)

    def as_numpy(self):
        return self._a

    @classmethod
    def from_dlpack(cls, name, src):
        a = src.as_numpy()
        return cls(name, np.full_like(a, a.reshape(-1)[0]) if cls.garble else a.copy())


def _load_model_py(monkeypatch):
    import importlib.util
    import sys
    import types

    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor = _StubTensor
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    path = os.path.join(os.path.dirname(wb.__file__), "triton", "model.py")
    spec = importlib.util.spec_from_file_location("wb_triton_model_numpy_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("garble", [False, True])
def test_model_py_refuses_a_stub_that_misreads_numpy(monkeypatch, garble):
    mod = _load_model_py(monkeypatch)
    monkeypatch.setattr(_StubTensor, "garble", garble)
    if not garble:
        mod._check_stub_reads_numpy()
        return
    with pytest.raises(RuntimeError, match=r"misreads numpy .* reads back as \[1\.0, 1\.0, 1\.0, 1\.0\].*numpy<2"):
        m = mod.TritonPythonModel()
        m.initialize({"model_config": "{}"})  # refused before it reads its config or bundle
