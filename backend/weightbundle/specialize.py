"""Specialize an update graph for one update: which inputs are empty is known before it runs.

An update graph decides per source, at run time, whether to keep or assign it (``If`` on
``Size == 0``), checks the shape (more ``If``s), and computes each derived entry only when
all its sources are set (another ``If``).  ONNX Runtime pays for every ``If`` it runs
(a subgraph frame each) and copies the value out of each branch: for ResNet-50 with BN
folding, 373 ``If``s and ~3,300 nodes took ~100 ms of an update whose copies need ~30.

Before the graph runs, the updater already knows each input's emptiness, and has checked
every non-empty input's shape and dtype (``Updater.check_update``).  ``specialize`` uses
that to evaluate the conditions ahead of time and inline the branch each ``If`` would
take, then drops what no output needs.  The result computes the same outputs for every
feed with that emptiness pattern: only conditions are evaluated here, never a weight.
Anything it cannot decide stays as it was, so a graph it does not understand still runs.

>>> g = specialize(update_graph, {"w": (4, 4), "b": None})   # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Ops evaluated when every input is known: the condition and shape-check arithmetic of
# update graphs.  Known values are small (flags, shapes, empty constants), never weights.
_EVAL: dict[str, Callable[..., np.ndarray | None]] = {
    "Identity": lambda n, x: x,
    "Size": lambda n, x: np.array(x.size, np.int64),
    "Shape": lambda n, x: np.array(x.shape, np.int64),
    "Equal": lambda n, a, b: np.equal(a, b),
    "Greater": lambda n, a, b: np.greater(a, b),
    "Less": lambda n, a, b: np.less(a, b),
    "And": lambda n, a, b: np.logical_and(a, b),
    "Or": lambda n, a, b: np.logical_or(a, b),
    "Not": lambda n, x: np.logical_not(x),
    "Concat": lambda n, *xs: np.concatenate(xs, axis=_attr(n, "axis", 0)),
    "Cast": lambda n, x: x.astype(helper.tensor_dtype_to_np_dtype(_attr(n, "to", 1))),
    "ReduceMin": lambda n, x: np.min(x, keepdims=bool(_attr(n, "keepdims", 1))) if x.size else None,
    "Unsqueeze": lambda n, x, axes: np.expand_dims(x, tuple(int(a) for a in axes)),
}


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(helper.get_attribute_value(a))
    return default


class _Known:
    """What is known about values: a full value (small), or only a shape (weights)."""

    def __init__(self) -> None:
        self.value: dict[str, np.ndarray] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.size: dict[str, int] = {}

    def set_value(self, name: str, v: np.ndarray) -> None:
        self.value[name] = v
        self.set_shape(name, tuple(v.shape))

    def set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        self.shape[name] = shape
        self.size[name] = math.prod(shape)


def specialize(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...] | None]) -> onnx.ModelProto:
    """``model`` specialized for inputs of these shapes; ``None`` = empty (keep).

    Every input must be named.  Non-empty shapes must be the ones the update will bind
    (the caller has checked them).  Returns a new model; ``model`` is not changed.
    """
    known = _Known()
    for name, shape in shapes.items():
        if shape is None:
            known.size[name] = 0  # its shape may be (0,), (0, 3), ...: only the size is fixed
        else:
            known.set_shape(name, tuple(shape))
    nodes = _live(_fold(list(model.graph.node), known), [o.name for o in model.graph.output], known.value)
    produced = [x for n in nodes for x in n.output if x]
    if len(produced) != len(set(produced)) or set(produced) & set(shapes):
        return model  # inlined branches reuse a name (legal in separate subgraphs): run it unspecialized
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    read = set().union(*(_reads(n) for n in nodes)) if nodes else set()
    inits = [t for t in out.graph.initializer if t.name in read]
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    return out


def _constant(name: str, v: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(v), name))


def _fold(nodes: list[onnx.NodeProto], known: _Known) -> list[onnx.NodeProto]:
    """Nodes left after evaluating what is known (into ``known.value``, no node) and
    inlining decided ``If``s, in order."""
    kept: list[onnx.NodeProto] = []
    for node in nodes:
        if node.op_type == "Constant" and not node.input:
            v = _constant_value(node)
            if v is None:
                kept.append(node)
            else:
                known.set_value(node.output[0], v)
            continue
        if node.op_type == "If" and node.input[0] in known.value:
            branch = "then_branch" if bool(np.asarray(known.value[node.input[0]]).reshape(-1)[0]) else "else_branch"
            g = next(a.g for a in node.attribute if a.name == branch)
            kept += _fold(list(g.node), known)
            for inner, outer in zip([o.name for o in g.output], node.output):
                if inner in known.value:
                    known.set_value(outer, known.value[inner])
                else:
                    kept.append(helper.make_node("Identity", [inner], [outer], name=f"{outer}/inlined"))
                    _propagate(known, inner, outer)
            continue
        fn = _EVAL.get(node.op_type)
        if fn is not None and len(node.output) == 1:
            v = _evaluate(node, fn, known)
            if v is not None:
                known.set_value(node.output[0], v)
                continue
        _infer_shape(node, known)
        kept.append(node)
    return kept


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
    return None


def _evaluate(node: onnx.NodeProto, fn: Callable[..., np.ndarray | None], known: _Known) -> np.ndarray | None:
    """The node's output if its inputs are known enough, else None (left to ONNX Runtime)."""
    ins = list(node.input)
    if node.op_type == "Size" and ins[0] in known.size:
        return np.array(known.size[ins[0]], np.int64)
    if node.op_type == "Shape" and ins[0] in known.shape and not node.attribute:
        return np.array(known.shape[ins[0]], np.int64)
    if not all(x in known.value for x in ins if x):
        return None
    try:
        v = fn(node, *[known.value[x] for x in ins if x])
    except (ValueError, TypeError, IndexError):  # let ONNX Runtime raise its own error
        return None
    return None if v is None else np.asarray(v)


def _propagate(known: _Known, src: str, dst: str) -> None:
    if src in known.value:
        known.set_value(dst, known.value[src])
    elif src in known.shape:
        known.set_shape(dst, known.shape[src])
    elif src in known.size:
        known.size[dst] = known.size[src]


def _infer_shape(node: onnx.NodeProto, known: _Known) -> None:
    """Shapes through the ops that carry a weight unchanged, so later ``Size``s fold."""
    if node.op_type in ("Identity", "Cast") and node.input:
        _propagate(known, node.input[0], node.output[0])
    elif node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in known.value:
        target = [int(d) for d in known.value[node.input[1]].reshape(-1)]
        if all(d > 0 for d in target) and known.size.get(node.input[0]) == math.prod(target):
            known.set_shape(node.output[0], tuple(target))


def _live(nodes: list[onnx.NodeProto], outputs: list[str], values: Mapping[str, np.ndarray]) -> list[onnx.NodeProto]:
    """The nodes ``outputs`` need, in order (names read inside subgraphs count), after one
    ``Constant`` per evaluated value still read."""
    need = set(outputs)
    keep: list[onnx.NodeProto] = []
    for node in reversed(nodes):
        if need.intersection(node.output):
            keep.append(node)
            need.update(_reads(node))
    made = {x for n in keep for x in n.output}
    consts = [_constant(name, values[name]) for name in sorted(need - made) if name in values]
    return consts + keep[::-1]


def _reads(node: onnx.NodeProto) -> set[str]:
    names = {x for x in node.input if x}
    for a in node.attribute:
        for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            for n in g.node:
                names |= _reads(n)
    return names
