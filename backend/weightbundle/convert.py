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
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

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
# IR version of opset 17. make_model would stamp the installed onnx's newest IR (14 for onnx 1.23),
# which older ONNX Runtimes refuse (1.23, the newest for Python 3.10, loads up to IR 11).
GRAPH_IR_VERSION = 8

# Inputs that are operator *parameters* (shapes, bounds, scales, indices...), not learned data.
# ORT constant-folds and fuses these, and shape inference needs some of them constant, so the
# default weight rule never turns them into variables (docs/bundle-format.md, "Which initializers become variables").  Index sets per op type.
PARAM_INPUTS: dict[str, frozenset[int]] = {
    op: frozenset(ix)
    for op, ix in {
        "Clip": (1, 2),
        "Resize": (1, 2, 3),
        "Upsample": (1,),
        "Pad": (1, 2, 3),
        "Reshape": (1,),
        "Expand": (1,),
        "Tile": (1,),
        "Slice": (1, 2, 3, 4),
        "ConstantOfShape": (0,),
        "Range": (0, 1, 2),
        "TopK": (1,),
        "Squeeze": (1,),
        "Unsqueeze": (1,),
        "Split": (1,),
        "OneHot": (1, 2),
        "Pow": (1,),
        "Dropout": (1, 2),
        "Trilu": (1,),
        "CumSum": (1,),
        "QuantizeLinear": (1, 2),
        "DequantizeLinear": (1, 2),
        "ReduceSum": (1,),
        "ReduceMean": (1,),
        "ReduceMax": (1,),
        "ReduceMin": (1,),
        "ReduceProd": (1,),
        "ReduceL2": (1,),
        "NonMaxSuppression": (2, 3, 4),
        "RoiAlign": (1, 2),
        "Gather": (1,),
        "GatherElements": (1,),
        "GatherND": (1,),
        "ScatterND": (1,),
        "Where": (0,),
        "CenterCropPad": (1,),
        "Col2Im": (1, 2),
    }.items()
}

_ONNX_TO_NAME = {helper.np_dtype_to_tensor_dtype(dt): n for n, dt in DTYPES.items()}
_NAME_TO_ONNX = {v: k for k, v in _ONNX_TO_NAME.items()}
_FLOATS = {TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE}


@dataclass
class RefreshableGraphs:
    """The three graphs of a bundle plus the tables they share.

    Unpacks like the CANN result: ``infer, init, update = convert(model)``.
    ``update`` takes one input per *source*, in ``sources`` order; ``variables`` are the
    store entries (what inference reads, plus kept sources); ``derived`` maps each
    derived variable to the sources it is computed from.  Without hoisting, sources
    and variables are the same list.
    """

    infer: onnx.ModelProto
    init: onnx.ModelProto
    update: onnx.ModelProto
    variables: list[VariableSpec]
    sources: list[VariableSpec] = field(default_factory=list)
    derived: dict[str, list[str]] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)  # checkpoint recovery: what matched how
    aliases: dict[str, str] = field(default_factory=dict)  # tied name -> the source it is one tensor with

    def __post_init__(self) -> None:
        if not self.sources:
            self.sources = list(self.variables)

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
    return [t.name for t in model.graph.initializer if t.data_type in _FLOATS and len(t.dims) >= 1 and t.name in used and t.name not in used_as_param]


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


def point_at(t: TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``t`` external data at ``location`` (a file, or a name a session resolves), in place."""
    t.ClearField("raw_data")
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", offset), ("length", length)):
        t.external_data.add(key=k, value=str(v))


def make_placeholder(spec: VariableSpec) -> TensorProto:
    t = TensorProto(name=spec.name, data_type=_NAME_TO_ONNX[spec.dtype], dims=list(spec.shape))
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=VARIABLE_LOCATION)
    return t


def is_placeholder(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL and any(e.key == "location" and e.value == VARIABLE_LOCATION for e in t.external_data)


def split_identity_aliases(model: onnx.ModelProto, weights: set[str] | None = None) -> list[str]:
    """Deduplicated parameters become separate initializers (in place); returns their names.

    The TorchScript exporter merges parameters that were equal at export time into one
    initializer plus ``Identity(kept) -> other_name`` nodes.  Each alias gets its own
    copy, so pushing one parameter never changes another.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    made, keep_nodes = [], []
    for node in g.node:
        src = node.input[0] if node.op_type == "Identity" and node.input else None
        if (
            src in inits
            and (weights is None or src in weights)
            and node.output[0] not in outputs
            and node.output[0] not in inits
            and inits[src].data_type in _FLOATS
        ):
            t = TensorProto()
            t.CopyFrom(inits[src])
            t.name = node.output[0]
            g.initializer.append(t)
            inits[t.name] = t
            made.append(t.name)
        else:
            keep_nodes.append(node)
    if made:
        del g.node[:]
        g.node.extend(keep_nodes)
    return made


def convert(
    model: onnx.ModelProto | str | os.PathLike,
    weights: Sequence[str] | None = None,
    *,
    checkpoint: Mapping[str, Any] | str | os.PathLike | None = None,
    tied: Sequence[Sequence[str]] | None = None,
    hoist: bool = True,
    fold_bn: bool | None = None,
) -> RefreshableGraphs:
    """Split ``model`` into inference, init and update graphs sharing variables.

    ``checkpoint`` (name -> array, torch tensors, or a safetensors path) names the tensors
    the model was exported from: each initializer is matched to them by value, so
    anonymous or transposed exports get the trainer's names and layouts as update
    inputs (see ``checkpoint.recover``).  ``tied`` lists groups of checkpoint names that
    are one tensor in the trainer (tied weights).  ``hoist`` moves weight preprocessing
    (Transpose, Slice, Cast, ...) from inference into the update graph.  ``fold_bn`` folds
    Conv/Gemm+BatchNormalization into derived weights the update graph recomputes (default:
    on with a checkpoint; otherwise ONNX Runtime folds them at each session build, as before).

    >>> graphs = convert("mlp.onnx")                      # doctest: +SKIP
    >>> [v.name for v in graphs.sources]                  # update-graph input order
    """
    from . import derive

    m = _load(model)
    report: dict[str, Any] = {}
    if checkpoint is not None:
        if weights is not None:
            raise ConvertError("pass either weights= or checkpoint=, not both: with a checkpoint, its tensors are the weights")
        from .checkpoint import recover

        names, report = recover(m, checkpoint, tied=tied)
    else:
        if hoist:
            split_identity_aliases(m, None if weights is None else set(weights))
        names = _select(m, weights)
    if hoist and (fold_bn if fold_bn is not None else checkpoint is not None):
        derive.fold_batchnorm(m, names)  # Conv/Gemm+BN: the update graph recomputes the folded pair
    plan = derive.hoist(m, names, enabled=hoist)
    inits = {t.name: t for t in m.graph.initializer}
    source_values = {n: numpy_helper.to_array(inits[n]) for n in names}
    sources = [VariableSpec(n, _ONNX_TO_NAME[inits[n].data_type], tuple(int(d) for d in inits[n].dims)) for n in names]
    # Tied names (one tensor in the trainer, e.g. an embedding and its output projection) are
    # extra update inputs that set the same source, so a whole state_dict pushes as is.
    aliases = {a: p for a, p in report.get("tied", {}).items() if p in source_values}
    by_name = {s.name: s for s in sources}
    sources += [VariableSpec(a, by_name[p].dtype, by_name[p].shape) for a, p in aliases.items()]
    derived_values = derive.evaluate(m, plan, source_values)
    specs: list[VariableSpec] = []
    initial: list[TensorProto] = []
    for n in plan.entries:
        if n in source_values:
            t = inits[n]
        else:
            a = derived_values[n]
            if a.dtype.name not in DTYPES:
                raise ConvertError(f"derived weight {n!r} has dtype {a.dtype}, which weightbundle cannot store")
            t = numpy_helper.from_array(np.ascontiguousarray(a), n)
        specs.append(VariableSpec(n, _ONNX_TO_NAME[t.data_type], tuple(int(d) for d in t.dims)))
        initial.append(t)

    # Inference graph: hoisted nodes and sources leave; what inference reads becomes
    # placeholders.  Old-style models that also list initializers as graph inputs lose
    # that input so a variable is never fed.
    infer = onnx.ModelProto()
    infer.CopyFrom(m)
    read = set(plan.variables)
    hoisted = {id(n) for n in plan.nodes}
    gone = set(names) | read
    kept_nodes = [n for n, orig in zip(infer.graph.node, m.graph.node) if id(orig) not in hoisted]
    del infer.graph.node[:]
    infer.graph.node.extend(kept_nodes)
    # Constants only hoisted nodes read (BN-fold epsilons, reshape targets) leave too: an
    # IR < 4 model may not hold an initializer that no node reads.
    hoisted_reads = {i for n in plan.nodes for i in n.input}
    still_read = {name for _, _, name in _uses(infer.graph)}
    gone |= hoisted_reads - still_read
    kept = [t for t in infer.graph.initializer if t.name not in gone]
    del infer.graph.initializer[:]
    infer.graph.initializer.extend(kept + [make_placeholder(s) for s in specs if s.name in read])
    inputs = [i for i in infer.graph.input if i.name not in gone]
    del infer.graph.input[:]
    infer.graph.input.extend(inputs)
    consts = {t.name for t in infer.graph.initializer}
    try:  # every name that ends up in config.pbtxt or in a request must be one Triton can carry
        validate_names([i.name for i in inputs if i.name not in consts] + [o.name for o in infer.graph.output], "inference input/output")
        validate_names([sp.name for sp in sources], "weight")  # update inputs: what config.pbtxt and requests carry
    except BundleError as e:
        raise ConvertError(str(e)) from None
    if plan.nodes or aliases or len(specs) != len(sources) or any(a.name != b.name for a, b in zip(specs, sources)):
        update = hoisted_update_graph(m, plan, sources, specs, aliases)
    else:
        update = update_graph(specs)
    return RefreshableGraphs(infer, _init_graph(specs, initial), update, specs, sources, plan.derived, report, aliases)


def hoisted_update_graph(
    model: onnx.ModelProto, plan: Any, sources: Sequence[VariableSpec], entries: Sequence[VariableSpec], aliases: Mapping[str, str] | None = None
) -> onnx.ModelProto:
    """Update graph whose inputs are sources and whose outputs are store entries.

    Each source is checked as in ``update_graph`` (empty = keep).  A source entry is
    its checked value; a derived entry is computed, inside an ``If``, only when every
    source it depends on is non-empty (the runtime feeds the current value of kept
    sources that a partial push did not send), else it is empty (keep).
    """
    from .derive import constant_inputs, derivation

    nodes, inputs, outputs, valid = [], [], [], []
    aliases = dict(aliases or {})
    own = {s.name: f"update/{s.name}/value" + ("_own" if s.name in aliases.values() else "") for s in sources}
    for s in sources:
        inputs.append(helper.make_tensor_value_info(s.name, _NAME_TO_ONNX[s.dtype], None))
        block, ok1 = source_block(s, own[s.name])
        nodes += block
        valid.append(ok1)
    value = {s.name: own[s.name] for s in sources if s.name not in aliases}
    for s in sources:  # a tied source takes its own input if sent, else its alias's (the runtime checks both agree)
        if s.name not in aliases.values():
            continue
        cur = own[s.name]
        for k, a in enumerate(n for n, p in aliases.items() if p == s.name):
            p = f"update/{s.name}/tie{k}/"
            T = _NAME_TO_ONNX[s.dtype]
            take = helper.make_graph([helper.make_node("Identity", [cur], [p + "own"])], p + "own_g", [], [helper.make_tensor_value_info(p + "own", T, None)])
            alt = helper.make_graph(
                [helper.make_node("Identity", [own[a]], [p + "alias"])], p + "alias_g", [], [helper.make_tensor_value_info(p + "alias", T, None)]
            )
            nodes += [
                helper.make_node("Size", [cur], [p + "size"]),
                helper.make_node("Constant", [], [p + "zero"], value=numpy_helper.from_array(np.array(0, np.int64), "z")),
                helper.make_node("Greater", [p + "size", p + "zero"], [p + "has"]),
                helper.make_node("If", [p + "has"], [p + "merged"], then_branch=take, else_branch=alt),
            ]
            cur = p + "merged"
        value[s.name] = cur
    inits = {t.name: t for t in model.graph.initializer}
    consts: dict[str, TensorProto] = {}
    src_names = {s.name for s in sources}
    for e in entries:
        T = _NAME_TO_ONNX[e.dtype]
        out = e.name + UPDATED_SUFFIX
        if e.name in src_names:
            nodes.append(helper.make_node("Identity", [value[e.name]], [out], name=f"update/{e.name}/assign"))
        else:
            p = f"derive/{e.name}/"
            deps = plan.deps[e.name]
            body = derivation(plan, e.name, value, p)
            for name in constant_inputs(plan, body, set(value.values())):
                if name in inits:
                    consts[name] = inits[name]
                else:
                    raise ConvertError(f"cannot hoist {e.name!r}: {name!r} is neither a source nor a constant")
            body.append(helper.make_node("Identity", [p + e.name], [p + "out"]))
            conds = []
            for d in deps:
                nodes += [
                    helper.make_node("Size", [value[d]], [p + d + "/size"]),
                    helper.make_node("Constant", [], [p + d + "/zero"], value=numpy_helper.from_array(np.array(0, np.int64), "z")),
                    helper.make_node("Greater", [p + d + "/size", p + d + "/zero"], [p + d + "/has"]),
                ]
                conds.append(p + d + "/has")
            cond = conds[0]
            for k, c2 in enumerate(conds[1:]):
                nodes.append(helper.make_node("And", [cond, c2], [p + f"all{k}"]))
                cond = p + f"all{k}"
            then = helper.make_graph(body, p + "compute", [], [helper.make_tensor_value_info(p + "out", T, None)])
            empty = numpy_helper.from_array(np.zeros((0,), DTYPES[e.dtype]), p + "empty")
            keep = helper.make_graph(
                [helper.make_node("Constant", [], [p + "keep_v"], value=empty)], p + "keep", [], [helper.make_tensor_value_info(p + "keep_v", T, [0])]
            )
            nodes.append(helper.make_node("If", [cond], [out], then_branch=then, else_branch=keep, name=p + "if"))
        outputs.append(helper.make_tensor_value_info(out, T, None))
    nodes.append(helper.make_node("Concat", valid, [VALID_OUTPUT], axis=0))
    outputs.append(helper.make_tensor_value_info(VALID_OUTPUT, TensorProto.BOOL, [len(sources)]))
    g = helper.make_graph(nodes, "weightbundle_update", inputs, outputs, list(consts.values()))
    opset = max([o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] + [UPDATE_OPSET])
    ops = [helper.make_opsetid("", opset)]
    # The IR its opset needs, not the installed onnx's newest (see GRAPH_IR_VERSION).
    ir = max(GRAPH_IR_VERSION, helper.find_min_ir_version_for(ops, ignore_unknown=True))
    return helper.make_model(g, opset_imports=ops, producer_name="weightbundle", ir_version=ir)


def retype_update_graph(update: onnx.ModelProto, input_dtypes: Mapping[str, str]) -> onnx.ModelProto:
    """The same update graph with some inputs declared in another dtype (its Cast nodes convert).

    ONNX Runtime's CPU kernels for Size/Shape/Reshape lack bfloat16, so a bfloat16 input is
    first cast to the source's dtype by one added Cast node (still inside the graph).
    """
    m = onnx.ModelProto()
    m.CopyFrom(update)
    bf16: dict[str, str] = {}
    for i in m.graph.input:
        if i.name in input_dtypes:
            dt = input_dtypes[i.name]
            if dt == "bfloat16":
                bf16[i.name] = i.name + "/from_bfloat16"
                to = i.type.tensor_type.elem_type
                m.graph.node.insert(0, helper.make_node("Cast", [i.name], [bf16[i.name]], to=to, name=i.name + "/cast_bfloat16"))
                i.type.tensor_type.elem_type = TensorProto.BFLOAT16
            else:
                i.type.tensor_type.elem_type = _NAME_TO_ONNX[dt]
    if bf16:
        _rename_inputs(m.graph, bf16, skip_first=len(bf16))
    return m


def _rename_inputs(g: onnx.GraphProto, names: Mapping[str, str], skip_first: int = 0) -> None:
    """Rename node inputs (subgraphs included) from ``names``; the first ``skip_first`` nodes are left alone."""
    for k, node in enumerate(g.node):
        if k >= skip_first:
            for j, x in enumerate(node.input):
                if x in names:
                    node.input[j] = names[x]
        for a in node.attribute:
            for sg in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                _rename_inputs(sg, names)


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
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", UPDATE_OPSET)], producer_name="weightbundle", ir_version=GRAPH_IR_VERSION)


def init_graph(specs: Sequence[VariableSpec]) -> onnx.ModelProto:
    """The init graph as stored in a bundle: its constants point at the weight section."""
    consts = []
    for s in specs:
        t = TensorProto(name=f"init/{s.name}", data_type=_NAME_TO_ONNX[s.dtype], dims=list(s.shape))
        t.data_location = TensorProto.EXTERNAL
        t.external_data.add(key="location", value="weights")
        consts.append(t)
    return _init_graph(specs, consts)


def source_block(s: VariableSpec, out: str) -> tuple[list[onnx.NodeProto], str]:
    """Update-graph nodes for one input ``s``: ``out`` is empty (keep) or the checked, cast value.

    Returns the nodes and the name of its bool[1] validity flag.
    """
    BOOL = TensorProto.BOOL
    c = lambda name, arr: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(arr), name))  # noqa: E731
    n, T = s.name, _NAME_TO_ONNX[s.dtype]
    p = f"update/{n}/"
    ok = p + "ok"
    empty_T = numpy_helper.from_array(np.zeros((0,), DTYPES[s.dtype]), p + "empty")
    keep = helper.make_graph(
        [helper.make_node("Constant", [], [p + "keep_v"], value=empty_T), c(p + "keep_ok", np.array(True))],
        p + "keep",
        [],
        [helper.make_tensor_value_info(p + "keep_v", T, [0]), helper.make_tensor_value_info(p + "keep_ok", BOOL, [])],
    )
    # Shape check: compare Shape(x)++[1] with shape++[1] only when ranks agree
    # (the appended 1 keeps Equal well-defined for rank-0 variables).
    same_shape = helper.make_graph(
        [
            c(p + "one", np.array([1], np.int64)),
            c(p + "want", np.array(list(s.shape) + [1], np.int64)),
            helper.make_node("Shape", [n], [p + "sh"]),
            helper.make_node("Concat", [p + "sh", p + "one"], [p + "sh1"], axis=0),
            helper.make_node("Equal", [p + "sh1", p + "want"], [p + "eq"]),
            helper.make_node("Cast", [p + "eq"], [p + "eqi"], to=TensorProto.INT32),
            helper.make_node("ReduceMin", [p + "eqi"], [p + "min"], keepdims=0),
            c(p + "i1", np.array(1, np.int32)),
            helper.make_node("Equal", [p + "min", p + "i1"], [p + "shape_ok"]),
        ],
        p + "same_shape",
        [],
        [helper.make_tensor_value_info(p + "shape_ok", BOOL, [])],
    )
    wrong_rank = helper.make_graph([c(p + "false", np.array(False))], p + "wrong_rank", [], [helper.make_tensor_value_info(p + "false", BOOL, [])])
    assign = helper.make_graph(
        [
            helper.make_node("Cast", [n], [p + "cast"], to=T),
            c(p + "shape", np.array(s.shape, np.int64)),
            helper.make_node("Reshape", [p + "cast", p + "shape"], [p + "assign_v"]),
        ],
        p + "assign",
        [],
        [helper.make_tensor_value_info(p + "assign_v", T, list(s.shape))],
    )
    reject = helper.make_graph(
        [helper.make_node("Constant", [], [p + "reject_v"], value=empty_T)], p + "reject", [], [helper.make_tensor_value_info(p + "reject_v", T, [0])]
    )
    check = helper.make_graph(
        [
            helper.make_node("Shape", [n], [p + "shape_of"]),
            helper.make_node("Size", [p + "shape_of"], [p + "rank"]),
            c(p + "want_rank", np.array(len(s.shape), np.int64)),
            helper.make_node("Equal", [p + "rank", p + "want_rank"], [p + "rank_ok"]),
            helper.make_node("If", [p + "rank_ok"], [p + "chk_ok"], then_branch=same_shape, else_branch=wrong_rank),
            helper.make_node("If", [p + "chk_ok"], [p + "chk_v"], then_branch=assign, else_branch=reject),
        ],
        p + "check",
        [],
        [helper.make_tensor_value_info(p + "chk_v", T, None), helper.make_tensor_value_info(p + "chk_ok", BOOL, [])],
    )
    nodes = [
        helper.make_node("Size", [n], [p + "size"]),
        c(p + "zero", np.array(0, np.int64)),
        helper.make_node("Equal", [p + "size", p + "zero"], [p + "is_empty"]),
        helper.make_node("If", [p + "is_empty"], [out, ok], then_branch=keep, else_branch=check, name=p + "if_empty"),
        c(p + "axes", np.array([0], np.int64)),
        helper.make_node("Unsqueeze", [ok, p + "axes"], [p + "ok1"]),
    ]
    return nodes, p + "ok1"


def update_graph(specs: Sequence[VariableSpec], input_dtypes: dict[str, str] | None = None) -> onnx.ModelProto:
    """One input per variable (any rank, so an empty tensor is legal).

    Per variable: an empty input yields an empty ``<name>__updated`` (keep); otherwise the
    input is cast to the variable's dtype and reshaped, and its shape is checked against
    the variable's: a mismatch yields False in ``__valid__`` and no value.  ``input_dtypes``
    retypes inputs (the Cast node does the conversion) for clients sending another float type.
    """
    nodes, inputs, outputs, valid = [], [], [], []
    for s in specs:
        in_T = _NAME_TO_ONNX[(input_dtypes or {}).get(s.name, s.dtype)]
        # Unknown rank, as in CANN, so an empty "keep" tensor of any shape is legal. ONNX Runtime
        # accepts this; onnx.checker, which wants a shape on top-level inputs, does not.
        inputs.append(helper.make_tensor_value_info(s.name, in_T, None))
        block, ok1 = source_block(s, s.name + UPDATED_SUFFIX)
        nodes += block
        outputs.append(helper.make_tensor_value_info(s.name + UPDATED_SUFFIX, _NAME_TO_ONNX[s.dtype], None))
        valid.append(ok1)
    nodes.append(helper.make_node("Concat", valid, [VALID_OUTPUT], axis=0))
    outputs.append(helper.make_tensor_value_info(VALID_OUTPUT, TensorProto.BOOL, [len(specs)]))
    g = helper.make_graph(nodes, "weightbundle_update", inputs, outputs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", UPDATE_OPSET)], producer_name="weightbundle", ir_version=GRAPH_IR_VERSION)


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
