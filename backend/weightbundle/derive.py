"""Hoist weight preprocessing out of inference: sources in, derived variables out.

A *source* is a tensor the trainer owns (a state_dict entry, in the trainer's layout).
A *variable* is what the inference graph reads.  Exporters often put preprocessing
of weights into the graph (a Linear weight's Transpose, Slices of a fused
``in_proj_weight``, Casts, BatchNorm folding, ``Identity`` aliases); run at every
inference, or folded by ONNX Runtime at every session build, it costs time.

``hoist`` finds every node that depends only on sources and constants (a closed set
of cheap, deterministic ops) and moves it into the update (and, by value, the init)
graph.  Inference then reads the precomputed variables.  Each variable records the
sources it is derived from (``deps``); an update recomputes every variable one of
whose sources was pushed.  When a variable depends on several sources (Conv+BN
folding, Concat), the store keeps those sources as extra entries (*kept sources*)
so a partial push can recompute it from their current values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ConvertError

# Ops moved out of inference when every input is a source, a constant, or another hoisted
# value: layout changes and cheap elementwise arithmetic, all deterministic.
HOISTABLE = frozenset(
    {
        "Transpose",
        "Identity",
        "Slice",
        "Split",
        "Gather",
        "Reshape",
        "Unsqueeze",
        "Squeeze",
        "Flatten",
        "Cast",
        "Mul",
        "Add",
        "Sub",
        "Div",
        "Concat",
        "Sqrt",
        "Reciprocal",
        "Neg",
        "Expand",
        "Pow",
    }
)


@dataclass
class Plan:
    """What ``hoist`` decided: which values are variables and where they come from."""

    sources: list[str]  # update-graph inputs, in order
    variables: list[str]  # values the inference graph reads (sources read directly or derived)
    kept: list[str]  # sources stored as entries because a multi-source derivation needs them
    deps: dict[str, list[str]]  # derived variable -> the sources it is computed from (source order)
    nodes: list[onnx.NodeProto]  # hoisted nodes, in graph order
    const_nodes: list[onnx.NodeProto]  # constant-only nodes (Constant, shapes...) a derivation may need
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)

    @property
    def entries(self) -> list[str]:
        """Store entries, in table order: sources that are entries, then derived variables."""
        src_entries = [s for s in self.sources if s in self.variables or s in self.kept]
        return src_entries + [v for v in self.variables if v not in self.sources]

    @property
    def derived(self) -> dict[str, list[str]]:
        return {v: self.deps[v] for v in self.variables if v not in self.sources}


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.HasField("g") or len(a.graphs) for a in node.attribute)


def hoist(model: onnx.ModelProto, sources: Sequence[str], enabled: bool = True) -> Plan:
    """Classify ``model``'s nodes; ``sources`` are initializer names (the update inputs)."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    src = list(sources)
    wdep: set[str] = set(src)
    const: set[str] = inits - wdep
    hoisted: list[onnx.NodeProto] = []
    const_nodes: list[onnx.NodeProto] = []
    producer: dict[str, onnx.NodeProto] = {}
    for node in g.node:
        ins = [i for i in node.input if i]
        plain = node.domain in ("", "ai.onnx") and not _has_subgraph(node)
        if enabled and plain and node.op_type in HOISTABLE and ins and all(i in wdep or i in const for i in ins) and any(i in wdep for i in ins):
            hoisted.append(node)
            wdep.update(o for o in node.output if o)
            for o in node.output:
                producer[o] = node
        elif (
            plain
            and node.op_type in HOISTABLE | {"Constant", "Shape", "ConstantOfShape", "Range"}
            and all(i in const for i in ins)
            and not any(i in wdep for i in ins)
        ):
            const_nodes.append(node)
            const.update(o for o in node.output if o)
            for o in node.output:
                producer[o] = node
    hoisted_ids = {id(n) for n in hoisted}
    read: list[str] = []
    for node in g.node:
        if id(node) in hoisted_ids:
            continue
        for i in list(node.input) + [i for a in node.attribute for sg in ([a.g] if a.HasField("g") else list(a.graphs)) for i in _outer_refs(sg)]:
            if i in wdep and i not in read:
                read.append(i)
    for o in g.output:
        if o.name in wdep and o.name not in read:
            read.append(o.name)
    # Variables: sources first (source order), then derived values in graph order.
    order = {n: k for k, n in enumerate(src)}
    node_pos = {o: k for k, n in enumerate(hoisted) for o in n.output}
    variables = sorted(read, key=lambda n: (0, order[n]) if n in order else (1, node_pos[n]))
    deps: dict[str, list[str]] = {}
    for v in variables:
        if v in order:
            deps[v] = [v]
            continue
        seen, stack, found = set(), [v], set()
        while stack:
            x = stack.pop()
            if x in seen:
                continue
            seen.add(x)
            if x in order:
                found.add(x)
            elif x in producer:
                stack.extend(i for i in producer[x].input if i)
        deps[v] = sorted(found, key=order.__getitem__)
    kept = [s for s in src if s not in variables and any(s in d and len(d) > 1 for d in deps.values())]
    unused = [s for s in src if s not in variables and not any(s in d for d in deps.values())]
    if unused:
        raise ConvertError(f"weight(s) {unused[:10]} feed nothing the inference graph reads")
    return Plan(src, variables, kept, deps, hoisted, const_nodes, producer)


def _outer_refs(g: onnx.GraphProto) -> list[str]:
    """Names a subgraph reads (its own node inputs; a superset of outer-scope refs is fine here)."""
    out: list[str] = []
    for n in g.node:
        out.extend(i for i in n.input if i)
        for a in n.attribute:
            for sg in [a.g] if a.HasField("g") else list(a.graphs):
                out.extend(_outer_refs(sg))
    return out


def derivation(plan: Plan, target: str, rename: dict[str, str], prefix: str) -> list[onnx.NodeProto]:
    """Copies of the nodes computing ``target`` from sources (renamed per ``rename``).

    Intermediate values get ``prefix`` so several derivations can live in one graph;
    ``target`` itself keeps the name ``prefix + target``.
    """
    needed: list[onnx.NodeProto] = []
    seen: set[int] = set()

    def visit(name: str) -> None:
        n = plan.producer.get(name)
        if n is None or id(n) in seen:
            return
        seen.add(id(n))
        for i in n.input:
            if i:
                visit(i)
        needed.append(n)

    visit(target)
    out = []
    local = {o for n in needed for o in n.output if o}
    for n in needed:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        c.name = prefix + (n.name or n.output[0])
        del c.input[:]
        c.input.extend(rename.get(i, prefix + i if i in local else i) if i else "" for i in n.input)
        del c.output[:]
        c.output.extend(prefix + o if o else "" for o in n.output)
        out.append(c)
    return out


def constant_inputs(plan: Plan, nodes: Sequence[onnx.NodeProto], produced: set[str]) -> set[str]:
    """Names ``nodes`` read that nothing among them produces (initializers of the source model)."""
    made = set(produced) | {o for n in nodes for o in n.output}
    return {i for n in nodes for i in n.input if i and i not in made}


def evaluate(model: onnx.ModelProto, plan: Plan, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Initial value of every derived variable, computed by ONNX Runtime from ``values`` (sources)."""
    import onnxruntime as ort

    derived = [v for v in plan.variables if v not in plan.sources]
    if not derived:
        return {}
    nodes: list[onnx.NodeProto] = []
    seen: set[str] = set()
    for v in derived:
        for n in derivation(plan, v, {}, ""):
            if n.output[0] not in seen:
                seen.update(n.output)
                nodes.append(n)
    inits = {t.name: t for t in model.graph.initializer}
    need = constant_inputs(plan, nodes, set())
    consts = []
    for name in sorted(need):
        if name in values:
            consts.append(numpy_helper.from_array(np.asarray(values[name]), name))
        elif name in inits:
            consts.append(inits[name])
        else:
            raise ConvertError(f"cannot hoist: {name!r} is neither a source nor a constant")
    probe = helper.make_model(
        helper.make_graph(nodes, "probe", [], [helper.make_tensor_value_info(v, TensorProto.UNDEFINED, None) for v in derived], consts),
        opset_imports=list(model.opset_import),
    )
    # IR < 4 only types initializers that are also graph inputs, so shape inference would
    # leave every derived dtype unknown (the light-zoo ResNet-50 is IR 3).
    probe.ir_version = max(4, min(model.ir_version or 8, 10))
    typed = onnx.shape_inference.infer_shapes(probe)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(typed.graph.value_info) + list(typed.graph.output)}
    del probe.graph.output[:]
    for v in derived:
        if not types.get(v):
            raise ConvertError(f"cannot hoist: the dtype of derived weight {v!r} is unknown")
        probe.graph.output.append(helper.make_tensor_value_info(v, types[v], None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    try:
        outs = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {})
    except Exception as e:
        raise ConvertError(f"cannot compute the derived weights: {e}") from None
    return dict(zip(derived, outs))


def fold_batchnorm(model: onnx.ModelProto, sources: Sequence[str]) -> list[str]:
    """Conv/Gemm followed by an inference BatchNormalization -> one Conv/Gemm with folded weights (in place).

    The folded weight and bias are computed by new nodes from the conv and BatchNorm
    sources, so ``hoist`` moves them into the update graph: a push of any of those
    tensors recomputes the folded pair, and inference runs no BatchNorm.  Only where
    every tensor involved is a source and the conv output feeds nothing else.
    Returns the BatchNorm nodes' names (or outputs) that were folded.
    """
    g = model.graph
    src = set(sources)
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    outputs = {o.name for o in g.output}
    producer = {o: n for n in g.node for o in n.output}
    new_nodes: list[onnx.NodeProto] = []
    folded: list[str] = []
    remove: set[int] = set()
    for bn in g.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1 or any(a.name == "training_mode" and a.i for a in bn.attribute):
            continue
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type not in ("Conv", "Gemm") or consumers.get(bn.input[0], 0) != 1 or bn.input[0] in outputs:
            continue
        attrs = {a.name: a for a in conv.attribute}
        if conv.op_type == "Gemm" and (
            attrs.get("alpha") and attrs["alpha"].f != 1.0 or attrs.get("beta") and attrs["beta"].f != 1.0 or attrs.get("transA") and attrs["transA"].i
        ):
            continue
        w = conv.input[1]
        b = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
        params = list(bn.input[1:5])
        graph_inputs = {i.name for i in g.input} - set(inits)  # IR < 4 lists initializers as inputs too
        # The conv bias may be computed (the dynamo exporter makes a zero bias from the activation's
        # dtype): then the folded bias is computed in inference, the folded weight still in the update.
        if w not in src or (b is not None and b in graph_inputs) or not all(p in src for p in params) or w not in inits:
            continue
        rank = len(inits[w].dims)
        trans_b = conv.op_type == "Gemm" and bool(attrs.get("transB") and attrs["transB"].i)
        axis_shape = [1, -1] if conv.op_type == "Gemm" and not trans_b else [-1] + [1] * (rank - 1)
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        dt = helper.tensor_dtype_to_np_dtype(inits[w].data_type)
        scale, beta, mean, var = params
        p = f"{w}::bn_fold/"  # the folded pair: <conv weight>::bn_fold/weight and .../bias
        g.initializer.extend([numpy_helper.from_array(np.array(eps, dt), p + "eps"), numpy_helper.from_array(np.array(axis_shape, np.int64), p + "shape")])
        n = helper.make_node
        new_nodes += [
            n("Add", [var, p + "eps"], [p + "var_eps"]),
            n("Sqrt", [p + "var_eps"], [p + "std"]),
            n("Div", [scale, p + "std"], [p + "scale"]),
            n("Reshape", [p + "scale", p + "shape"], [p + "scale_r"]),
            n("Mul", [w, p + "scale_r"], [p + "weight"]),
        ]
        if b is not None:
            new_nodes += [
                n("Sub", [b, mean], [p + "centered"]),
                n("Mul", [p + "centered", p + "scale"], [p + "scaled"]),
                n("Add", [p + "scaled", beta], [p + "bias"]),
            ]
        else:
            new_nodes += [n("Mul", [mean, p + "scale"], [p + "shift"]), n("Sub", [beta, p + "shift"], [p + "bias"])]
        x = conv.input[0]
        del conv.input[:]
        conv.input.extend([x, p + "weight", p + "bias"])
        conv.output[0] = bn.output[0]
        remove.add(id(bn))
        folded.append(bn.name or bn.output[0])
    if folded:
        kept = [x for x in g.node if id(x) not in remove]
        del g.node[:]
        g.node.extend(new_nodes + kept)
    return folded
