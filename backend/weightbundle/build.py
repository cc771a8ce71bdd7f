"""Compile refreshable graphs into bundle bytes, and write them safely."""

from __future__ import annotations

import os

import numpy as np
from onnx import numpy_helper

from . import __version__
from .convert import RefreshableGraphs, compile_inference, init_graph, is_placeholder
from .fsutil import atomic_write
from .format import GRAPH_INFERENCE, GRAPH_INIT, GRAPH_UPDATE, encode


def build_bundle(graphs: RefreshableGraphs, include_init: bool = True, optimize: str | None = "extended") -> bytes:
    """Bundle bytes: compiled inference graph, optional init graph + initial weights, update graph.

    ``include_init=False`` leaves out the init graph and the initial weights (the file
    shrinks by their size); such a bundle serves only after its first full update.
    ``optimize=None`` stores the inference graph unoptimised.
    """
    import onnxruntime as ort

    read = {t.name for t in graphs.infer.graph.initializer if is_placeholder(t)}  # kept sources are no placeholders
    infer = compile_inference(graphs.infer, [v for v in graphs.variables if v.name in read], optimize) if optimize else graphs.infer
    out: dict[int, bytes] = {GRAPH_INFERENCE: infer.SerializeToString(), GRAPH_UPDATE: graphs.update.SerializeToString()}
    initial = None
    if include_init:  # the data moves to the aligned weight section; the graph keeps references
        values = {t.name[len("init/") :]: numpy_helper.to_array(t) for t in graphs.init.graph.initializer}
        initial = {v.name: np.asarray(values[v.name], v.np_dtype) for v in graphs.variables}
        out[GRAPH_INIT] = init_graph(graphs.variables).SerializeToString()
    meta = {
        "producer": f"weightbundle {__version__}",
        "compiled": {"onnxruntime": ort.__version__, "level": optimize or "none", "provider": "CPUExecutionProvider"},
        # format 1.1: update inputs (sources) and the derivations hoisted out of inference
        "sources": [
            {"name": s.name, "dtype": s.dtype, "shape": list(s.shape), **({"alias_of": graphs.aliases[s.name]} if s.name in graphs.aliases else {})}
            for s in graphs.sources
        ],
        "derived": dict(graphs.derived),
    }
    return encode(out, graphs.variables, initial, meta, extra={"inference_source": graphs.infer.SerializeToString()} if optimize else None)


def save_bundle(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` atomically and durably: temp file in the same folder, fsync, rename.

    A crash leaves either the old file or the new one, never a half-written bundle.
    """
    atomic_write(os.fspath(path), data, durable=True)
