"""Bundle core, part 1: ``weightbundle.convert`` (issue 2, item 1).

What is checked here: the default weight rule, an explicit ``weights=`` list, the
errors that name their culprit, the shape of the three graphs (placeholders in the
inference graph, a runnable init graph, a real update graph with cast + shape check)
and the variable order contract (variables order == update graph input order).
Running the graphs inside a loaded bundle is tested in test_runtime.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from weightbundle import zoo
import weightbundle as wb
from weightbundle.convert import PARAM_INPUTS, UPDATED_SUFFIX, VALID_OUTPUT, is_placeholder

ALL_MODELS = {k: v for k, v in zoo.MODELS.items() if k != "mlp_fp16"}

EXPECTED_DEFAULT = {
    "mlp": ["fc0.weight", "fc0.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"],
    "convnet": [
        "conv0.weight",
        "conv0.bias",
        "bn0.scale",
        "bn0.shift",
        "bn0.mean",
        "bn0.var",
        "conv1.weight",
        "conv1.bias",
        "bn1.scale",
        "bn1.shift",
        "bn1.mean",
        "bn1.var",
        "head.weight",
        "head.bias",
    ],
    "attention": ["embed.weight", "ln.gamma", "ln.beta", "q.weight", "k.weight", "v.weight", "o.weight"],
    "with_int_initializers": ["w", "b"],
    # the tiny config: 2 layers; scalar/int64 constants (attention scale, Gelu, reshape shapes) are not weights
    "transformer_encoder": ["embed.weight", "pos.weight", "embed.ln.gamma", "embed.ln.beta"]
    + [
        f"layer{i}.{n}"
        for i in range(2)
        for n in (
            *(f"attn.{t}.{p}" for t in "qkvo" for p in ("weight", "bias")),
            "attn.ln.gamma",
            "attn.ln.beta",
            "ffn.fc1.weight",
            "ffn.fc1.bias",
            "ffn.fc2.weight",
            "ffn.fc2.bias",
            "ffn.ln.gamma",
            "ffn.ln.beta",
        )
    ],
}


def _session(m: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _small_model(nodes, inputs, outputs, inits: dict[str, np.ndarray], ir_version: int = 8) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "t", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = ir_version
    onnx.checker.check_model(m)
    return m


def _f32(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


# ---------------------------------------------------------------------------------------------
# default weight rule
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_default_rule_on_test_models(name):
    m = ALL_MODELS[name]()
    g = wb.convert(m)
    assert [v.name for v in g.variables] == EXPECTED_DEFAULT[name]
    assert wb.default_weights(m) == EXPECTED_DEFAULT[name]
    inits = zoo.initializers(m)
    for v in g.variables:
        assert v.dtype == inits[v.name].dtype.name
        assert v.shape == inits[v.name].shape
        assert v.nbytes == inits[v.name].nbytes


def test_default_rule_keeps_non_weights_constant():
    """int64 shape/index initializers, Clip bounds and scalar float constants stay constants."""
    m = zoo.with_int_initializers()
    g = wb.convert(m)
    names = {v.name for v in g.variables}
    assert names == {"w", "b"}
    consts = {t.name: t for t in g.infer.graph.initializer if not is_placeholder(t)}
    orig = zoo.initializers(m)
    for n in ("shape", "idx", "clip_min", "clip_max"):
        assert n in consts, f"{n} must stay a constant of the inference graph"
        np.testing.assert_array_equal(numpy_helper.to_array(consts[n]), orig[n])

    a = zoo.attention()
    ga = wb.convert(a)
    assert "scale" not in {v.name for v in ga.variables}  # scalar float constant
    assert "perm_shape" not in {v.name for v in ga.variables}  # int64
    consts = {t.name for t in ga.infer.graph.initializer if not is_placeholder(t)}
    assert "scale" in consts


@pytest.mark.parametrize(
    "op, n_inputs, param_index",
    [("Pow", 2, 1), ("Dropout", 3, 1), ("ReduceSum", 2, 1), ("Clip", 3, 1), ("Clip", 3, 2), ("Where", 3, 0)],
)
def test_param_inputs_are_never_default_weights(op, n_inputs, param_index):
    """A rank>=1 float initializer at a PARAM_INPUTS position is an operator parameter, not a weight."""
    assert param_index in PARAM_INPUTS[op]
    m = zoo.mlp()
    # Build a dummy node use: the rule looks at uses only, so we append an extra consumer node.
    extra = onnx.ModelProto()
    extra.CopyFrom(m)
    p = numpy_helper.from_array(np.array([1.0], np.float32), "param")
    extra.graph.initializer.append(p)
    ins = ["y"] * n_inputs
    ins[param_index] = "param"
    extra.graph.node.append(helper.make_node(op, ins, ["param_out"]))
    assert "param" not in wb.default_weights(extra)


def test_float_initializer_used_as_data_and_as_param_stays_constant():
    # "e" is the Pow exponent (a parameter) and also added as data: it must stay a constant.
    m = _small_model(
        [
            helper.make_node("Pow", ["x", "e"], ["p"]),
            helper.make_node("Add", ["p", "e"], ["y"]),
        ],
        [_f32("x", [2, 3])],
        [_f32("y", [2, 3])],
        {"e": np.array([2.0, 2.0, 2.0], np.float32)},
    )
    assert wb.default_weights(m) == []
    with pytest.raises(wb.ConvertError):
        wb.convert(m)  # nothing to convert under the default rule


def test_unused_and_scalar_initializers_are_not_default_weights():
    m = _small_model(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Mul", ["m", "s"], ["y"])],
        [_f32("x", [1, 3])],
        [_f32("y", [1, 3])],
        {"w": np.eye(3, dtype=np.float32), "s": np.array(0.5, np.float32), "unused": np.ones(3, np.float32), "i": np.arange(3, dtype=np.int64)},
    )
    assert wb.default_weights(m) == ["w"]


def test_float64_and_float16_initializers_are_default_weights():
    m = _small_model(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [3])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [3])],
        {"w": np.ones(3, np.float64)},
    )
    g = wb.convert(m)
    assert [(v.name, v.dtype) for v in g.variables] == [("w", "float64")]
    g16 = wb.convert(zoo.mlp(dtype=np.float16))
    assert {v.dtype for v in g16.variables} == {"float16"}


def test_no_float_initializers_raises():
    m = _small_model([helper.make_node("Relu", ["x"], ["y"])], [_f32("x", [3])], [_f32("y", [3])], {})
    with pytest.raises(ValueError, match="weights="):
        wb.convert(m)


# ---------------------------------------------------------------------------------------------
# explicit weights=
# ---------------------------------------------------------------------------------------------
def test_explicit_weights_subset_and_order():
    m = zoo.mlp()
    names = ["fc2.bias", "fc0.weight"]
    g = wb.convert(m, weights=names)
    assert [v.name for v in g.variables] == names
    assert [i.name for i in g.update.graph.input] == names
    assert [o.name for o in g.init.graph.output] == names
    ph = [t.name for t in g.infer.graph.initializer if is_placeholder(t)]
    assert sorted(ph) == sorted(names)
    consts = {t.name: numpy_helper.to_array(t) for t in g.infer.graph.initializer if not is_placeholder(t)}
    orig = zoo.initializers(m)
    for n in set(orig) - set(names):  # the others stay constants with their values
        np.testing.assert_array_equal(consts[n], orig[n])


def test_explicit_weights_can_name_non_default_initializers():
    """weights= overrides the rule: a scalar Clip bound and an int64 index may be variables."""
    m = zoo.with_int_initializers()
    g = wb.convert(m, weights=["w", "clip_max", "idx"])
    specs = {v.name: v for v in g.variables}
    assert specs["clip_max"].shape == () and specs["clip_max"].dtype == "float32"
    assert specs["idx"].dtype == "int64" and specs["idx"].shape == (3,)


def test_convert_accepts_a_path(tmp_path):
    m = zoo.mlp()
    p = tmp_path / "mlp.onnx"
    onnx.save(m, str(p))
    g1, g2 = wb.convert(str(p)), wb.convert(p)
    assert [v.name for v in g1.variables] == [v.name for v in g2.variables] == EXPECTED_DEFAULT["mlp"]


def test_convert_bad_path_raises_convert_error(tmp_path):
    with pytest.raises(wb.ConvertError, match="nope.onnx"):
        wb.convert(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\xff\xff not a model")
    with pytest.raises(ValueError):
        wb.convert(bad)


def test_convert_does_not_mutate_the_input_model():
    m = zoo.convnet()
    before = m.SerializeToString()
    wb.convert(m)
    wb.convert(m, weights=["head.weight"])
    assert m.SerializeToString() == before


@pytest.mark.parametrize(
    "weights, culprit",
    [
        (["fc0.weight", "nope"], "nope"),  # unknown name
        (["fc1.bias", "fc0.weight", "fc1.bias"], "fc1.bias"),  # duplicate
        (["mm0"], "mm0"),  # a node output, not an initializer
        (["h1"], "h1"),  # another node output
        (["x"], "'x'"),  # a graph input, not an initializer
        (["y"], "'y'"),  # the graph output (also a node output)
    ],
)
def test_bad_weight_names_raise_value_error_naming_the_culprit(weights, culprit):
    with pytest.raises(wb.ConvertError) as ei:
        wb.convert(zoo.mlp(), weights=weights)
    assert isinstance(ei.value, ValueError)
    assert isinstance(ei.value, wb.BundleError)
    assert culprit in str(ei.value)


def test_node_output_and_graph_input_messages_say_not_an_initializer():
    with pytest.raises(ValueError, match="not an initializer"):
        wb.convert(zoo.mlp(), weights=["mm0"])
    with pytest.raises(ValueError, match="not an initializer"):
        wb.convert(zoo.mlp(), weights=["x"])
    with pytest.raises(ValueError, match="not in the model"):
        wb.convert(zoo.mlp(), weights=["nope"])
    with pytest.raises(ValueError, match="duplicate"):
        wb.convert(zoo.mlp(), weights=["fc0.bias", "fc0.bias"])


@pytest.mark.parametrize("empty", [[], ()])
def test_empty_weight_list_raises(empty):
    with pytest.raises(ValueError, match="empty"):
        wb.convert(zoo.mlp(), weights=empty)


def test_old_style_model_listing_initializers_as_inputs():
    """IR<4 models also list initializers as graph inputs; a variable must not stay an input."""
    m = zoo.mlp()
    m.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in m.graph.initializer)
    g = wb.convert(m)
    assert [i.name for i in g.infer.graph.input] == ["x"]
    x = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    data = wb.build_bundle(g)
    with wb.Bundle.load_from_mem(data) as b:
        b.init()
        np.testing.assert_allclose(b.execute(0, {"x": x})["y"], zoo.ort_run(zoo.mlp(), {"x": x})["y"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the three graphs
# ---------------------------------------------------------------------------------------------
def test_unpacks_like_cann():
    g = wb.convert(zoo.mlp())
    infer, init, update = g
    assert infer is g.infer and init is g.init and update is g.update
    assert isinstance(g, wb.RefreshableGraphs)


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_inference_graph_holds_placeholders_not_weights(name):
    m = ALL_MODELS[name]()
    g = wb.convert(m)
    by_name = {t.name: t for t in g.infer.graph.initializer}
    total_weight_bytes = sum(v.nbytes for v in g.variables)
    for v in g.variables:
        t = by_name[v.name]
        assert is_placeholder(t)
        assert not t.raw_data and not t.float_data and not t.double_data and not t.int64_data
        assert tuple(t.dims) == v.shape
        assert helper.tensor_dtype_to_np_dtype(t.data_type).name == v.dtype
    # the graph bytes no longer contain the weights; each placeholder carries its own
    # external-data entry (~35 bytes), which shows next to the tiny transformer's small weights
    assert len(g.infer.SerializeToString()) < len(m.SerializeToString()) - total_weight_bytes + 1024 + 64 * len(g.variables)
    assert {i.name for i in g.infer.graph.input} == {i.name for i in m.graph.input}
    assert [o.name for o in g.infer.graph.output] == [o.name for o in m.graph.output]


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_init_graph_yields_initial_values(name):
    m = ALL_MODELS[name]()
    g = wb.convert(m)
    assert len(g.init.graph.input) == 0
    assert [o.name for o in g.init.graph.output] == [v.name for v in g.variables]
    onnx.checker.check_model(g.init)
    outs = _session(g.init).run(None, {})
    orig = zoo.initializers(m)
    for v, a in zip(g.variables, outs):
        assert a.dtype == orig[v.name].dtype
        assert a.tobytes() == orig[v.name].tobytes()


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_update_graph_inputs_follow_variable_order(name):
    g = wb.convert(ALL_MODELS[name]())
    assert [i.name for i in g.update.graph.input] == [v.name for v in g.variables]
    outs = [o.name for o in g.update.graph.output]
    assert outs == [v.name + UPDATED_SUFFIX for v in g.variables] + [VALID_OUTPUT]


def test_graphs_pass_the_onnx_checker():
    """Init and inference graphs are plain valid ONNX. The update graph declares its inputs with
    unknown rank (as CANN does, so any empty tensor is legal), which only onnx.checker objects to:
    with ranks filled in, the rest of it must check clean."""
    g = wb.convert(zoo.mlp())
    onnx.checker.check_model(g.init)
    from weightbundle.convert import variables_as_inputs

    onnx.checker.check_model(variables_as_inputs(g.infer))
    upd = onnx.ModelProto()
    upd.CopyFrom(g.update)
    specs = {v.name: v for v in g.variables}
    for vi in list(upd.graph.input) + list(upd.graph.output):
        name = vi.name.replace("__updated", "")
        rank = len(specs[name].shape) if name in specs else 1
        vi.type.tensor_type.shape.dim.extend(onnx.TensorShapeProto.Dimension(dim_param=f"{name}_{i}") for i in range(rank))
    onnx.checker.check_model(upd)


def test_update_graph_is_a_real_graph():
    """Run the update graph with ORT directly: empty keeps, full replaces, wrong shape is flagged."""
    m = zoo.mlp()
    g = wb.convert(m)
    ops = {n.op_type for n in g.update.graph.node}
    assert "If" in ops  # empty / shape branches, not a bare Identity copy
    text = g.update.SerializeToString()
    assert b"Cast" in text and b"Shape" in text
    sess = _session(g.update)
    specs = g.variables
    rng = np.random.default_rng(5)
    new = {v.name: rng.standard_normal(v.shape).astype(np.float32) for v in specs}

    # all empty: every output empty, all valid
    outs = sess.run(None, {v.name: np.empty((0,), np.float32) for v in specs})
    assert all(o.size == 0 for o in outs[:-1])
    assert outs[-1].tolist() == [True] * len(specs)

    # all full: outputs equal inputs
    outs = sess.run(None, new)
    for v, o in zip(specs, outs):
        np.testing.assert_array_equal(o, new[v.name])
    assert outs[-1].all()

    # one wrong shape (same rank), one wrong rank: flagged False, the rest valid
    bad = dict(new)
    bad["fc0.weight"] = np.zeros((16, 31), np.float32)
    bad["fc1.bias"] = np.zeros((4, 8), np.float32)
    outs = sess.run(None, bad)
    flags = dict(zip([v.name for v in specs], outs[-1].tolist()))
    assert flags == {v.name: v.name not in ("fc0.weight", "fc1.bias") for v in specs}


def test_update_graph_casts_to_the_variable_dtype():
    from weightbundle.convert import update_graph

    g = wb.convert(zoo.mlp(dtype=np.float16))
    retyped = update_graph(g.variables, {v.name: "float64" for v in g.variables})
    sess = _session(retyped)
    rng = np.random.default_rng(3)
    feed = {v.name: rng.standard_normal(v.shape) for v in g.variables}
    outs = sess.run(None, feed)
    for v, o in zip(g.variables, outs):
        assert o.dtype == np.float16
        np.testing.assert_array_equal(o, feed[v.name].astype(np.float16))


def test_rank0_variable_update_graph():
    g = wb.convert(zoo.with_int_initializers(), weights=["clip_max"])
    sess = _session(g.update)
    out, valid = sess.run(None, {"clip_max": np.array(1.25, np.float32)})
    assert valid.tolist() == [True] and out.shape == () and float(out) == 1.25
    out, valid = sess.run(None, {"clip_max": np.array([1.25], np.float32)})  # rank 1 for a rank-0 var
    assert valid.tolist() == [False]
    out, valid = sess.run(None, {"clip_max": np.empty((0,), np.float32)})
    assert valid.tolist() == [True] and out.size == 0
