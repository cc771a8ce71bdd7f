"""Update graphs specialized per emptiness pattern (weightbundle.specialize) compute exactly
what the general graph computes, for every pattern, and the updater caches them."""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import weightbundle as wb
from weightbundle import zoo
from weightbundle.convert import retype_update_graph
from weightbundle.specialize import specialize


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(names, {i.name: feed[i.name] for i in s.get_inputs()})))


def _tied() -> wb.RefreshableGraphs:
    """Two update inputs for one tensor (``b`` tied to ``a``), plus a plain weight."""
    rng = np.random.default_rng(2)
    ck = {"a": rng.standard_normal(4).astype(np.float32), "b": None, "w": rng.standard_normal((4, 4)).astype(np.float32)}
    ck["b"] = ck["a"]
    n = helper.make_node
    g = helper.make_graph(
        [n("MatMul", ["x", "w"], ["h"]), n("Mul", ["h", "s1"], ["h2"]), n("Add", ["h2", "s2"], ["y"])],
        "tied",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(ck["w"], "w"), numpy_helper.from_array(ck["a"], "s1"), numpy_helper.from_array(ck["a"], "s2")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return wb.convert(m, checkpoint={"a": ck["a"], "b": ck["a"], "w": ck["w"]}, tied=[["a", "b"]])


GRAPHS = {
    "mlp": lambda: wb.convert(zoo.mlp()),
    "convnet-folded": lambda: wb.convert(zoo.convnet(channels=(3, 8, 16)), fold_bn=True),
    "tied": _tied,
}


def _patterns(names: list[str]) -> list[set[str]]:
    """Every subset for a few inputs; else all, none, each one alone and a fixed sample."""
    if len(names) <= 5:
        return [set(c) for k in range(len(names) + 1) for c in itertools.combinations(names, k)]
    rng = np.random.default_rng(9)
    return [set(names), set()] + [{n} for n in names] + [set(rng.choice(names, len(names) // 2, replace=False)) for _ in range(4)]


@pytest.mark.parametrize("which", sorted(GRAPHS))
def test_every_emptiness_pattern_computes_what_the_general_graph_does(which):
    graphs = GRAPHS[which]()
    rng = np.random.default_rng(4)
    values = {s.name: (rng.standard_normal(s.shape) + (2.0 if "var" in s.name else 0.0)).astype(s.dtype) for s in graphs.sources}
    ifs = sum(n.op_type == "If" for n in graphs.update.graph.node)
    assert ifs, "the general graph decides at run time"
    for sent in _patterns(list(values)):
        feed = {n: (values[n] if n in sent else np.zeros((0,), values[n].dtype)) for n in values}
        special = specialize(graphs.update, {n: (a.shape if a.size else None) for n, a in feed.items()})
        assert not any(n.op_type == "If" for n in special.graph.node), f"{sorted(sent)}: an If left undecided"
        want, got = _run(graphs.update, feed), _run(special, feed)
        assert want.keys() == got.keys()
        for k in want:
            assert want[k].shape == got[k].shape and want[k].tobytes() == got[k].tobytes(), f"{sorted(sent)}: {k} differs"


def test_a_retyped_bfloat16_input_is_specialized_too():
    graphs = wb.convert(zoo.mlp())
    first = graphs.sources[0]
    retyped = retype_update_graph(graphs.update, {first.name: "bfloat16"})
    v = np.random.default_rng(1).standard_normal(first.shape).astype(ml_dtypes.bfloat16)
    feed = {s.name: np.zeros((0,), s.dtype) for s in graphs.sources}
    special = specialize(retyped, {s.name: (first.shape if s.name == first.name else None) for s in graphs.sources})
    bound = dict(feed)
    bound[first.name] = v.view(np.uint16)  # ORT's numpy binding has no bfloat16: bind the 16-bit words typed
    outs = {}
    for label, model in (("general", retyped), ("special", special)):
        s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        io = s.io_binding()
        for i in s.get_inputs():
            a = bound[i.name]
            io.bind_ortvalue_input(
                i.name,
                ort.OrtValue.ortvalue_from_numpy_with_onnx_type(a, TensorProto.BFLOAT16) if i.name == first.name else ort.OrtValue.ortvalue_from_numpy(a),
            )
        for o in s.get_outputs():
            io.bind_output(o.name, "cpu")
        s.run_with_iobinding(io)
        outs[label] = [o.numpy() for o in io.get_outputs()]
    for a, b in zip(outs["general"], outs["special"]):
        assert a.tobytes() == b.tobytes()
    np.testing.assert_array_equal(outs["special"][0], v.astype(np.float32))


def test_a_condition_on_values_stays_a_runtime_if():
    """Only sizes and shapes are known ahead: an If on a tensor's values is left to ORT."""
    then = helper.make_graph([helper.make_node("Identity", ["w"], ["t"])], "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["w"], ["e"])], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    g = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["w"], ["s"], keepdims=0),
            helper.make_node("Constant", [], ["z"], value=numpy_helper.from_array(np.array(0, np.float32))),
            helper.make_node("Greater", ["s", "z"], ["pos"]),
            helper.make_node("If", ["pos"], ["y"], then_branch=then, else_branch=other),
        ],
        "values",
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 12)])
    m.ir_version = 8
    special = specialize(m, {"w": (3,)})
    assert [n.op_type for n in special.graph.node].count("If") == 1
    for w in (np.ones(3, np.float32), -np.ones(3, np.float32)):
        np.testing.assert_array_equal(_run(special, {"w": w})["y"], _run(m, {"w": w})["y"])


def test_branches_that_reuse_a_name_are_left_unspecialized():
    """Two Ifs whose branches define the same local name: inlining both would define it twice."""

    def branch(tag: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node("Identity", ["w"], ["local"])], tag, [], [helper.make_tensor_value_info("local", TensorProto.FLOAT, None)])

    nodes = [helper.make_node("Size", ["w"], ["n"]), helper.make_node("Constant", [], ["z"], value=numpy_helper.from_array(np.array(0, np.int64)))]
    nodes += [helper.make_node("Greater", ["n", "z"], ["has"])]
    nodes += [helper.make_node("If", ["has"], [f"y{k}"], then_branch=branch(f"t{k}"), else_branch=branch(f"e{k}")) for k in (1, 2)]
    g = helper.make_graph(
        nodes,
        "clash",
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, None), helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    assert specialize(m, {"w": (2,)}) is m


def test_the_updater_builds_one_session_per_pattern_and_keeps_the_latest_few():
    from weightbundle import updater

    b = wb.Bundle.load_from_mem(wb.build_bundle(wb.convert(zoo.mlp(sizes=(4, 4, 4, 4, 4, 4)))), wb.RuntimeOptions(prepack=False))
    b.init()
    names = [s.name for s in b.update_inputs]
    assert len(names) > updater.UPDATE_SESSIONS_KEPT
    rng = np.random.default_rng(3)
    new = {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in b.update_inputs}
    b.update(new)
    b.update(new)
    assert len(b._updater._update_sessions) == 1  # the same tensors sent: the same specialized graph
    for n in names:  # one tensor at a time: a pattern each
        b.update({n: new[n] * 2})
    assert len(b._updater._update_sessions) == updater.UPDATE_SESSIONS_KEPT
    x = rng.standard_normal((3, 4)).astype(np.float32)
    want = zoo.ort_run(zoo.with_weights(zoo.mlp(sizes=(4, 4, 4, 4, 4, 4)), {n: a * 2 for n, a in new.items()}), {"x": x})["y"]
    np.testing.assert_allclose(b.infer({"x": x})[0]["y"], want, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(want).max())))
    b.unload()
