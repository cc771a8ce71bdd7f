"""Turn an ONNX model into weight-refreshable graphs (the CANN
``aclgrphConvertToWeightRefreshableGraphs`` analogue), and compile the
inference graph once so loading never re-optimises it.

Variables are represented in every graph as *placeholder initializers*: a
TensorProto with the variable's name, dtype and dims but ``data_location =
EXTERNAL`` and no data.  The runtime points them at the current weight version
(memory-mapped files) when it builds a session, so the graph bytes never hold
weights and no optimiser can bake a variable's value into the graph.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .control import validate_names
from .errors import BundleError, ConvertError
from .format import DTYPES, VariableSpec

VARIABLE_LOCATION = "weightbundle:variable"  # external_data location that marks a placeholder
UPDATED_SUFFIX = "__updated"  # update graph: output "<name>__updated" carries the new value
VALID_OUTPUT = "__valid__"  # update graph: bool[n_vars], False where an input has the wrong shape
UPDATE_OPSET = 17

# Inputs that are operator *parameters* (shapes, bounds, scales, indices...), not learned data.
# ORT constant-folds and fuses these, and shape inference needs some of them constant, so the
# default weight rule never turns them into variables (NOTES §4).  Index sets per op type.
PARAM_INPUTS: dict[str, frozenset[int]] = {
    op: frozenset(ix)
    for op, ix in {
        "Clip": (1, 2), "Resize": (1, 2, 3), "Upsample": (1,), "Pad": (1, 2, 3), "Reshape": (1,),
        "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "ConstantOfShape": (0,), "Range": (0, 1, 2),
        "TopK": (1,), "Squeeze": (1,), "Unsqueeze": (1,), "Split": (1,), "OneHot": (1, 2),
        "Pow": (1,), "Dropout": (1, 2), "Trilu": (1,), "CumSum": (1,), "QuantizeLinear": (1, 2),
        "DequantizeLinear": (1, 2), "ReduceSum": (1,), "ReduceMean": (1,), "ReduceMax": (1,),
        "ReduceMin": (1,), "ReduceProd": (1,), "ReduceL2": (1,), "NonMaxSuppression": (2, 3, 4),
        "RoiAlign": (1, 2), "Gather": (1,), "GatherElements": (1,), "GatherND": (1,), "ScatterND": (1,),
        "Where": (0,), "CenterCropPad": (1,), "Col2Im": (1, 2),
    }.items()
}

_ONNX_TO_NAME = {helper.np_dtype_to_tensor_dtype(dt): n for n, dt in DTYPES.items()}
_NAME_TO_ONNX = {v: k for k, v in _ONNX_TO_NAME.items()}
_FLOATS = {TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE}


@dataclass
class RefreshableGraphs:
    """The three graphs of a bundle plus the variable table they share.

    Unpacks like the CANN result: ``infer, init, update = convert(model)``.
    ``update`` takes one input per variable, in ``variables`` order.
    """

    infer: onnx.ModelProto
    init: onnx.ModelProto
    update: onnx.ModelProto
    variables: list[VariableSpec]

    def __iter__(self) -> Iterator[onnx.ModelProto]:
        return iter((self.infer, self.init, self.update))


def _load(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        return m
    try:
        return onnx.load(os.fspath(model))
    except Exception as e:  # onnx raises DecodeError, OSError, ...
        raise ConvertError(f"cannot read ONNX model {os.fspath(model)!r}: {e}") from None


def _uses(graph: onnx.GraphProto) -> Iterable[tuple[str, int, str]]:
    """(op_type, input index, name) for every node input, subgraphs included."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            yield node.op_type, i, name
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _uses(sub)


def default_weights(model: onnx.ModelProto) -> list[str]:
    """The default rule: floating-point initializers of rank >= 1 used only as data.

    Scalars (epsilons, GELU constants, attention scales) and operator parameters
    (see ``PARAM_INPUTS``) stay constants; pass ``weights=`` to override.
    """
    used_as_param: set[str] = set()
    used: set[str] = set()
    for op, i, name in _uses(model.graph):
        used.add(name)
        if i in PARAM_INPUTS.get(op, ()):
            used_as_param.add(name)
    return [
        t.name
        for t in model.graph.initializer
        if t.data_type in _FLOATS and len(t.dims) >= 1 and t.name in used and t.name not in used_as_param
    ]


def _select(model: onnx.ModelProto, weights: Sequence[str] | None) -> list[str]:
    inits = {t.name: t for t in model.graph.initializer}
    if weights is None:
        names = default_weights(model)
        if not names:
            raise ConvertError("the model has no floating-point initializers to turn into weights; pass weights=[...]")
        return names
    names = list(weights)
    if not names:
        raise ConvertError("weights is empty: name at least one initializer (or pass None for the default rule)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConvertError(f"duplicate weight name(s): {dup}")
    known = {v.name for v in model.graph.input} | {o for n in model.graph.node for o in n.output}
    for n in names:
        if n not in inits:
            where = "a graph input or node output, not an initializer" if n in known else "not in the model"
            raise ConvertError(f"weight {n!r} is {where}")
        if inits[n].data_type not in _ONNX_TO_NAME:
            raise ConvertError(f"weight {n!r} has ONNX dtype {TensorProto.DataType.Name(inits[n].data_type)}, which weightbundle cannot refresh")
    return names


def make_placeholder(spec: VariableSpec) -> TensorProto:
    t = TensorProto(name=spec.name, data_type=_NAME_TO_ONNX[spec.dtype], dims=list(spec.shape))
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=VARIABLE_LOCATION)
    return t


def is_placeholder(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL and any(e.key == "location" and e.value == VARIABLE_LOCATION for e in t.external_data)


def convert(model: onnx.ModelProto | str | os.PathLike, weights: Sequence[str] | None = None) -> RefreshableGraphs:
    """Split ``model`` into inference, init and update graphs sharing variables.

    >>> graphs = convert("mlp.onnx")                      # doctest: +SKIP
    >>> [v.name for v in graphs.variables]                # update-graph input order
    """
    m = _load(model)
    names = _select(m, weights)
    inits = {t.name: t for t in m.graph.initializer}
    specs: list[VariableSpec] = []
    initial: list[TensorProto] = []
    for n in names:
        t = inits[n]
        specs.append(VariableSpec(n, _ONNX_TO_NAME[t.data_type], tuple(int(d) for d in t.dims)))
        initial.append(t)

    # Inference graph: variable initializers become placeholders; old-style models that
    # also list initializers as graph inputs lose that input so a variable is never fed.
    infer = onnx.ModelProto()
    infer.CopyFrom(m)
    chosen = set(names)
    kept = [t for t in infer.graph.initializer if t.name not in chosen]
    del infer.graph.initializer[:]
    infer.graph.initializer.extend(kept + [make_placeholder(s) for s in specs])
    inputs = [i for i in infer.graph.input if i.name not in chosen]
    del infer.graph.input[:]
    infer.graph.input.extend(inputs)
    consts = {t.name for t in infer.graph.initializer}
    try:  # every name that ends up in config.pbtxt or in a request must be one Triton can carry
        validate_names([i.name for i in inputs if i.name not in consts] + [o.name for o in infer.graph.output], "inference input/output")
        validate_names(names, "weight")
    except BundleError as e:
        raise ConvertError(str(e)) from None

    return RefreshableGraphs(infer, _init_graph(specs, initial), update_graph(specs), specs)


def _init_graph(specs: Sequence[VariableSpec], initial: Sequence[TensorProto]) -> onnx.ModelProto:
    """No inputs; one output per variable holding its initial value (CANN: Assign(var, const))."""
    consts, nodes, outputs = [], [], []
    for s, t in zip(specs, initial):
        c = TensorProto()
        c.CopyFrom(t)
        c.name = f"init/{s.name}"
        consts.append(c)
        nodes.append(helper.make_node("Identity", [c.name], [s.name], name=f"init/{s.name}/assign"))
        outputs.append(helper.make_tensor_value_info(s.name, _NAME_TO_ONNX[s.dtype], list(s.shape)))
    g = helper.make_graph(nodes, "weightbundle_init", [], outputs, consts)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", UPDATE_OPSET)], producer_name="weightbundle")


def init_graph(specs: Sequence[VariableSpec]) -> onnx.ModelProto:
    """The init graph as stored in a bundle: its constants point at the weight section."""
    consts = []
    for s in specs:
        t = TensorProto(name=f"init/{s.name}", data_type=_NAME_TO_ONNX[s.dtype], dims=list(s.shape))
        t.data_location = TensorProto.EXTERNAL
        t.external_data.add(key="location", value="weights")
        consts.append(t)
    return _init_graph(specs, consts)


def update_graph(specs: Sequence[VariableSpec], input_dtypes: dict[str, str] | None = None) -> onnx.ModelProto:
    """One input per variable (any rank, so an empty tensor is legal).

    Per variable: an empty input yields an empty ``<name>__updated`` (keep); otherwise the
    input is cast to the variable's dtype and reshaped, and its shape is checked against
    the variable's: a mismatch yields False in ``__valid__`` and no value.  ``input_dtypes``
    retypes inputs (the Cast node does the conversion) for clients sending another float type.
    """
    BOOL = TensorProto.BOOL
    c = lambda name, arr: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(arr), name))  # noqa: E731
    nodes, inputs, outputs, valid = [], [], [], []
    for s in specs:
        n, T = s.name, _NAME_TO_ONNX[s.dtype]
        p = f"update/{n}/"
        in_T = _NAME_TO_ONNX[(input_dtypes or {}).get(n, s.dtype)]
        # Unknown rank, as in CANN, so an empty "keep" tensor of any shape is legal. ONNX Runtime
        # accepts this; onnx.checker, which wants a shape on top-level inputs, does not.
        inputs.append(helper.make_tensor_value_info(n, in_T, None))
        out, ok = n + UPDATED_SUFFIX, p + "ok"
        empty_T = numpy_helper.from_array(np.zeros((0,), DTYPES[s.dtype]), p + "empty")
        keep = helper.make_graph(
            [helper.make_node("Constant", [], [p + "keep_v"], value=empty_T), c(p + "keep_ok", np.array(True))],
            p + "keep", [], [helper.make_tensor_value_info(p + "keep_v", T, [0]), helper.make_tensor_value_info(p + "keep_ok", BOOL, [])])
        # Shape check: compare Shape(x)++[1] with shape++[1] only when ranks agree
        # (the appended 1 keeps Equal well-defined for rank-0 variables).
        same_shape = helper.make_graph(
            [c(p + "one", np.array([1], np.int64)), c(p + "want", np.array(list(s.shape) + [1], np.int64)),
             helper.make_node("Shape", [n], [p + "sh"]), helper.make_node("Concat", [p + "sh", p + "one"], [p + "sh1"], axis=0),
             helper.make_node("Equal", [p + "sh1", p + "want"], [p + "eq"]), helper.make_node("Cast", [p + "eq"], [p + "eqi"], to=TensorProto.INT32),
             helper.make_node("ReduceMin", [p + "eqi"], [p + "min"], keepdims=0), c(p + "i1", np.array(1, np.int32)),
             helper.make_node("Equal", [p + "min", p + "i1"], [p + "shape_ok"])],
            p + "same_shape", [], [helper.make_tensor_value_info(p + "shape_ok", BOOL, [])])
        wrong_rank = helper.make_graph([c(p + "false", np.array(False))], p + "wrong_rank", [], [helper.make_tensor_value_info(p + "false", BOOL, [])])
        assign = helper.make_graph(
            [helper.make_node("Cast", [n], [p + "cast"], to=T), c(p + "shape", np.array(s.shape, np.int64)),
             helper.make_node("Reshape", [p + "cast", p + "shape"], [p + "assign_v"])],
            p + "assign", [], [helper.make_tensor_value_info(p + "assign_v", T, list(s.shape))])
        reject = helper.make_graph([helper.make_node("Constant", [], [p + "reject_v"], value=empty_T)], p + "reject", [],
                                   [helper.make_tensor_value_info(p + "reject_v", T, [0])])
        check = helper.make_graph(
            [helper.make_node("Shape", [n], [p + "shape_of"]), helper.make_node("Size", [p + "shape_of"], [p + "rank"]),
             c(p + "want_rank", np.array(len(s.shape), np.int64)), helper.make_node("Equal", [p + "rank", p + "want_rank"], [p + "rank_ok"]),
             helper.make_node("If", [p + "rank_ok"], [p + "chk_ok"], then_branch=same_shape, else_branch=wrong_rank),
             helper.make_node("If", [p + "chk_ok"], [p + "chk_v"], then_branch=assign, else_branch=reject)],
            p + "check", [], [helper.make_tensor_value_info(p + "chk_v", T, None), helper.make_tensor_value_info(p + "chk_ok", BOOL, [])])
        nodes += [
            helper.make_node("Size", [n], [p + "size"]), c(p + "zero", np.array(0, np.int64)),
            helper.make_node("Equal", [p + "size", p + "zero"], [p + "is_empty"]),
            helper.make_node("If", [p + "is_empty"], [out, ok], then_branch=keep, else_branch=check, name=p + "if_empty"),
            c(p + "axes", np.array([0], np.int64)), helper.make_node("Unsqueeze", [ok, p + "axes"], [p + "ok1"]),
        ]
        outputs.append(helper.make_tensor_value_info(out, T, None))
        valid.append(p + "ok1")
    nodes.append(helper.make_node("Concat", valid, [VALID_OUTPUT], axis=0))
    outputs.append(helper.make_tensor_value_info(VALID_OUTPUT, BOOL, [len(specs)]))
    g = helper.make_graph(nodes, "weightbundle_update", inputs, outputs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", UPDATE_OPSET)], producer_name="weightbundle")


def variables_as_inputs(infer: onnx.ModelProto) -> onnx.ModelProto:
    """Placeholders -> typed graph inputs, so an optimiser sees values it cannot fold."""
    m = onnx.ModelProto()
    m.CopyFrom(infer)
    ph = [t for t in m.graph.initializer if is_placeholder(t)]
    kept = [t for t in m.graph.initializer if not is_placeholder(t)]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    m.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in ph)
    return m


def compile_inference(infer: onnx.ModelProto, specs: Sequence[VariableSpec], level: str = "extended") -> onnx.ModelProto:
    """Optimise the inference graph once with ONNX Runtime ("compile once").

    Variables are graph inputs during optimisation, so fusions that would bake a
    variable's current value (e.g. Conv+BatchNorm folding) cannot happen; fusions
    of structure (GELU, LayerNorm, attention, MatMul+Add...) do.
    """
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
    src = variables_as_inputs(infer)
    with tempfile.TemporaryDirectory(prefix="weightbundle-compile-") as d:
        out = os.path.join(d, "optimized.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = levels[level]
        so.optimized_model_filepath = out
        so.log_severity_level = 3
        try:
            ort.InferenceSession(src.SerializeToString(), so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ConvertError(f"ONNX Runtime cannot load the inference graph: {e}") from None
        opt = onnx.load(out)
    wanted = {s.name: s for s in specs}
    ins = [i for i in opt.graph.input if i.name not in wanted]
    del opt.graph.input[:]
    opt.graph.input.extend(ins)
    opt.graph.initializer.extend(make_placeholder(s) for s in specs)
    return opt
