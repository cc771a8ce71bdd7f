"""Compile once: optimize the inference graph one time per load, then only re-lay weights.

ONNX Runtime's optimizer (level "all") rewrites a graph *and* its weights: NCHWc blocking
reorders and pads every Conv filter, constant folding transposes them.  Re-running it for
every new weight version costs about what a reload costs (ResNet-50: ~0.5 s).  But for the
graphs we serve, each optimized weight is a pure re-layout of one variable: a pad, a
reshape into blocks and a transpose, i.e. a gather.  ``learn`` finds those gathers once by
optimizing the graph with probe weights whose values encode where each element came from
(its index, its tensor); ``CompiledGraph.session`` then builds a version's session from the
optimized graph at level "none", with the weights re-laid by numpy, at memcpy speed.

The probes are checked, not trusted: the optimized graph must be the same for the probes
and for the real weights, and replaying the learned layouts on the real weights must give
the optimizer's own bytes.  Anything else (an optimizer that does arithmetic on weights,
such as folding an unfused BatchNorm) raises ``NotCompilable`` and the caller keeps
optimizing per version.

>>> cg = learn(proto, weights, level="all", scratch=tmpdir)          # doctest: +SKIP
>>> sess = cg.session(weights, ort.SessionOptions(), ["CPUExecutionProvider"])   # doctest: +SKIP
"""

from __future__ import annotations

import functools
import itertools
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

from .convert import point_at

LEVELS = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_EXACT = 1 << 24  # float32 holds every integer up to here: the largest probe-encodable tensor
_BLOCKS = (4, 8, 16, 32, 64)  # block sizes layout transforms use (MLAS NCHWc: 8 or 16)
_PLACEHOLDER = "weightbundle-compiled"  # external location of a relaid weight; the data comes from OrtValues


_PARALLEL_BYTES = 8 << 20  # re-layouts at least this large use the two-thread pool


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(2, thread_name_prefix="weightbundle-relay")


class NotCompilable(Exception):
    """The optimizer does more than re-lay weights here; optimize each version instead."""


@dataclass(frozen=True)
class Layout:
    """How an optimized initializer is made from one variable ``source``.

    Either pad -> reshape(``split``) -> transpose(``perm``), or, where no such form was
    found, a flat gather ``index`` into ``[0] + source.ravel()`` (0 = padding).
    """

    source: str
    shape: tuple[int, ...]  # the optimized initializer's dims
    padded: tuple[int, ...] = ()
    split: tuple[int, ...] = ()
    perm: tuple[int, ...] = ()
    index: np.ndarray | None = None

    @property
    def identity(self) -> bool:
        return self.index is None and self.perm == tuple(range(len(self.perm))) and self.split == self.padded and self.padded == self.shape

    def apply(self, src: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The optimized initializer for variable value ``src`` (written into ``out`` if given)."""
        out = np.empty(self.shape, src.dtype) if out is None else out
        if self.index is not None:
            np.take(np.concatenate([np.zeros(1, src.dtype), src.ravel()]), self.index, out=out.reshape(-1))
            return out
        if self.padded != src.shape:
            p = np.zeros(self.padded, src.dtype)
            p[tuple(slice(0, d) for d in src.shape)] = src
            src = p
        np.copyto(out.reshape([self.split[i] for i in self.perm]), src.reshape(self.split).transpose(self.perm))
        return out


@dataclass
class CompiledGraph:
    """The inference graph optimized once, plus how each version's weights are re-laid for it."""

    model: onnx.ModelProto  # optimized; every weight-derived initializer is an external placeholder
    layouts: dict[str, Layout]  # optimized initializer name -> how to make it

    def __post_init__(self) -> None:
        self._bytes = self.model.SerializeToString()

    def relaid(self, weights: Mapping[str, np.ndarray], only: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The optimized initializers (all, or ``only``) for ``weights``; identity layouts
        return the array itself.  Large re-layouts run on two threads (numpy lets go of the
        GIL while it copies): ResNet-50's 53 filters, 90 MiB, took 26 instead of 31-36 ms."""
        names = list(self.layouts if only is None else only)
        src = {n: np.asarray(weights[self.layouts[n].source]) for n in names}
        out = {n: src[n].reshape(self.layouts[n].shape) for n in names if self.layouts[n].identity}
        todo = sorted((n for n in names if n not in out), key=lambda n: -src[n].nbytes)
        apply = lambda n: self.layouts[n].apply(src[n])  # noqa: E731
        if len(todo) > 1 and (os.cpu_count() or 1) > 1 and sum(src[n].nbytes for n in todo) >= _PARALLEL_BYTES:
            out.update(zip(todo, _pool().map(apply, todo)))
        else:
            out.update((n, apply(n)) for n in todo)
        return {n: out[n] for n in names}

    def session(
        self,
        weights: Mapping[str, np.ndarray],
        so: ort.SessionOptions,
        providers: Sequence[str],
        files: Mapping[str, tuple[str, int]] | None = None,
        anchor: str | None = None,
        fed: frozenset[str] = frozenset(),
    ) -> ort.InferenceSession:
        """A session for ``weights`` (variable name -> array) over the optimized graph, with no
        graph optimization.

        ``files`` gives, per variable, where its bytes already lie (file name and offset in
        the folder ``session.model_external_initializers_file_folder_path`` of ``so``):
        weights whose layout is the identity then point there, and ORT maps the file with no
        copy.  Re-laid weights, and every weight without a file, are handed over as
        OrtValues.  With ``anchor`` (a file that exists in that folder) ORT uses them in
        place (``add_initializer``; ResNet-50: 8 instead of 33-78 ms, no second copy): it
        checks only that an external initializer's file exists, so their placeholders point
        at the anchor, and the session keeps the arrays alive.  Without one, or with an ORT
        where that does not hold (``in_place_works``), ORT copies them at load
        (``add_external_initializers``).

        ``fed``: variables whose optimized initializers become graph inputs instead, fed on
        every run with ``fed_inputs`` (a pinned session, see sessions.py).
        """
        so.graph_optimization_level = LEVELS["none"]
        files = files or {}
        inputs = self.fed_names(fed)
        layouts = {n: lay for n, lay in self.layouts.items() if n not in inputs}
        placed = {n: files[lay.source] for n, lay in layouts.items() if lay.identity and lay.source in files}
        arrays = self.relaid(weights, [n for n in layouts if n not in placed])
        arrays = {n: np.require(a, requirements="C") for n, a in arrays.items()}
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()]
        in_place = anchor is not None and bool(arrays) and in_place_works()
        model_bytes = self._bytes
        if placed or in_place or inputs:
            model = onnx.ModelProto()
            model.CopyFrom(self.model)
            as_inputs(model, inputs)
            for t in model.graph.initializer:
                if t.name in placed:
                    point_at(t, *placed[t.name], weights[self.layouts[t.name].source].nbytes)
                elif in_place and t.name in arrays:
                    point_at(t, str(anchor), 0, arrays[t.name].nbytes)
            model_bytes = model.SerializeToString()
        if in_place:
            for name, value in zip(arrays, values):
                so.add_initializer(name, value)
            sess = ort.InferenceSession(model_bytes, so, providers=list(providers))
            sess._weightbundle_arrays = (values, arrays)  # ORT reads them, does not own them
            return sess
        if arrays:  # ORT copies these into the graph at load; ours are dropped once it has
            so.add_external_initializers(list(arrays), values)
        return ort.InferenceSession(model_bytes, so, providers=list(providers))

    def fed_names(self, fed: frozenset[str]) -> list[str]:
        """The optimized initializers made from variables ``fed``."""
        return [n for n, lay in self.layouts.items() if lay.source in fed]

    def fed_inputs(self, weights: Mapping[str, np.ndarray], fed: frozenset[str]) -> dict[str, np.ndarray]:
        """What a session built with ``fed`` is fed, per run, for ``weights`` (the variables
        ``fed``): identity layouts are the arrays themselves, no copy."""
        return {n: np.require(a, requirements="C") for n, a in self.relaid(weights, self.fed_names(fed)).items()}


def as_inputs(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """Turn initializers ``names`` of ``model`` into graph inputs (same name, dtype, dims):
    ORT then packs nothing for them and reads whatever each run feeds."""
    if not names:
        return
    want = set(names)
    g = model.graph
    moved = [t for t in g.initializer if t.name in want]
    kept = [t for t in g.initializer if t.name not in want]
    del g.initializer[:]
    g.initializer.extend(kept)
    g.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in moved)


@functools.cache
def in_place_works() -> bool:
    """Does this ONNX Runtime use an ``add_initializer`` value in place of an external
    initializer whose file exists but holds other bytes?  (1.32: yes; checked, not assumed.)"""
    value = np.arange(4, dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="weightbundle-probe-") as d:
        with open(os.path.join(d, "anchor"), "wb") as f:
            f.write(b"\0")
        w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
        point_at(w, "anchor", 0, value.nbytes)
        g = onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["w"], ["y"])], "probe", [], [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [w]
        )
        model = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=8)
        so = ort.SessionOptions()
        so.log_severity_level = 4
        so.graph_optimization_level = LEVELS["none"]  # as in ``session``: an optimizer would read the file
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", d)
        held = ort.OrtValue.ortvalue_from_numpy(value)  # ORT keeps a pointer, not a reference
        so.add_initializer("w", held)
        try:
            out = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {})[0]
        except Exception:  # noqa: BLE001 - this ORT checks more: copy instead
            return False
        finally:
            del so
        del held
    return bool(np.array_equal(out, value))


def learn(
    proto: onnx.ModelProto,
    weights: Mapping[str, np.ndarray],
    level: str = "all",
    scratch: tuple[str | None, str] = (None, "weightbundle-compile-"),
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> CompiledGraph:
    """Optimize ``proto`` (whose initializers named in ``weights`` are placeholders) once and
    learn how its weights are re-laid.  ``weights`` are real values: the result is verified
    against the optimizer's output on them.  ``scratch`` (folder, name prefix) holds the
    optimizer's output meanwhile, about three model sizes.  Raises ``NotCompilable``."""
    names = list(weights)
    real = {n: np.asarray(weights[n]) for n in names}
    consts = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer if t.name not in real and t.data_location != TensorProto.EXTERNAL}
    with tempfile.TemporaryDirectory(prefix=scratch[1], dir=scratch[0]) as tmp:
        opt = _Optimizer(proto, level, tmp, providers)
        r_model, r_vals = opt.run(real, "real")

        def unchanged(n: str, a: np.ndarray) -> bool:
            return (n in real and _same(a, real[n])) or (n in consts and _same(a, consts[n]))

        if all(unchanged(n, a) for n, a in r_vals.items()):  # no weight re-laid (an MLP): no probes needed
            layouts = {n: Layout(n, a.shape, a.shape, a.shape, tuple(range(a.ndim))) for n, a in r_vals.items() if n in real}
            return CompiledGraph(_with_placeholders(r_model, layouts, r_vals), layouts)
        bad = [n for n in names if real[n].dtype != np.float32 or real[n].size >= _EXACT]
        if bad:
            raise NotCompilable(f"weights {bad[:3]} are not float32 tensors of < 2^24 elements, so their layouts cannot be probed")
        index = {n: np.arange(1, real[n].size + 1, dtype=np.float32).reshape(real[n].shape) for n in names}
        a_model, a_vals = opt.run(index, "index")
        del index
        ident = {n: np.full(real[n].shape, -(i + 1), np.float32) for i, n in enumerate(names)}
        b_model, b_vals = opt.run(ident, "tensor")
        del ident
    if not (_structure(a_model) == _structure(b_model) == _structure(r_model)):
        raise NotCompilable("the optimizer builds a different graph for probe weights than for the real ones")
    layouts = {}
    found: dict[tuple, Layout] = {}  # (source shape, shape) -> a layout seen: most tensors share a few
    for n, r in r_vals.items():
        a, b = a_vals.get(n), b_vals.get(n)
        if a is None or b is None:
            raise NotCompilable(f"optimized initializer {n!r} exists only for the real weights")
        if _same(a, b) and _same(a, r):
            continue  # a constant of the graph, not made from weights: stays in the model
        lay = _layout_of(n, a, b, names, real, found)
        if not _same(lay.apply(real[lay.source]), r):
            raise NotCompilable(f"optimized initializer {n!r} is not a re-layout of {lay.source!r}")
        layouts[n] = lay
    return CompiledGraph(_with_placeholders(r_model, layouts, r_vals), layouts)


class _Optimizer:
    """ORT's optimizer on ``proto`` with given weight values: the optimized graph and the
    values of its initializers."""

    def __init__(self, proto: onnx.ModelProto, level: str, tmp: str, providers: Sequence[str]):
        self._bytes = proto.SerializeToString()
        self._level, self._tmp, self._providers = level, tmp, list(providers)

    def run(self, values: Mapping[str, np.ndarray], tag: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        so = ort.SessionOptions()
        so.graph_optimization_level = LEVELS[self._level]
        so.log_severity_level = 3  # the "hardware specific optimizations" warning: we optimize on the serving machine
        so.add_session_config_entry("session.disable_prepacking", "1")  # only the saved graph is wanted, not a packed copy
        path = os.path.join(self._tmp, f"{tag}.onnx")
        so.optimized_model_filepath = path
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{tag}.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "0")
        names = list(values)
        ovs = [ort.OrtValue.ortvalue_from_numpy(np.require(values[n], requirements="C")) for n in names]
        so.add_external_initializers(names, ovs)
        try:
            ort.InferenceSession(self._bytes, so, providers=self._providers)
        except Exception as e:  # noqa: BLE001 - the caller falls back to optimizing per version
            raise NotCompilable(f"ONNX Runtime cannot optimize the graph: {e}") from None
        m = onnx.load(path, load_external_data=False)
        return m, {t.name: _read(t, self._tmp) for t in m.graph.initializer}


def _read(t: TensorProto, folder: str) -> np.ndarray:
    if t.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    ext = {e.key: e.value for e in t.external_data}
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    n = int(np.prod(t.dims, dtype=np.int64))
    with open(os.path.join(folder, ext["location"]), "rb") as f:
        f.seek(int(ext.get("offset", "0")))
        return np.frombuffer(f.read(n * dtype.itemsize), dtype).reshape(tuple(t.dims)).copy()


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _structure(m: onnx.ModelProto) -> list[bytes]:
    g = m.graph
    return [n.SerializeToString() for n in g.node] + [v.SerializeToString() for v in list(g.input) + list(g.output)]


def _layout_of(name: str, a: np.ndarray, b: np.ndarray, names: list[str], real: Mapping[str, np.ndarray], found: dict[tuple, Layout]) -> Layout:
    """Read a layout off the probes: ``b`` says which tensor each element came from (-id-1,
    0 for padding), ``a`` which element of it (index+1)."""
    if a.dtype != np.float32 or np.any(a != np.round(a)) or np.any(b != np.round(b)) or np.any((a == 0) != (b == 0)):
        raise NotCompilable(f"optimized initializer {name!r} is computed from weights, not re-laid")
    ids = np.unique(b[b != 0])
    if len(ids) != 1 or not 1 <= -int(ids[0]) <= len(names):
        raise NotCompilable(f"optimized initializer {name!r} mixes several weights")
    source = names[-int(ids[0]) - 1]
    index = a.astype(np.int64).reshape(-1)
    if index.min(initial=0) < 0 or index.max(initial=0) > real[source].size:
        raise NotCompilable(f"optimized initializer {name!r} reads outside {source!r}")
    key = (real[source].shape, a.shape)
    seen = found.get(key)
    if seen is not None and _matches(seen, real[source].shape, index):
        return Layout(source, seen.shape, seen.padded, seen.split, seen.perm, seen.index)
    lay = _find_transpose(source, real[source].shape, tuple(a.shape), index)
    if lay is None:
        lay = Layout(source, tuple(a.shape), index=index.astype(np.int32 if real[source].size < 2**31 else np.int64))
    found[key] = lay
    return lay


def _matches(lay: Layout, src: tuple[int, ...], index: np.ndarray) -> bool:
    if lay.index is not None:
        return bool(np.array_equal(lay.index, index))
    if int(np.prod(lay.padded, dtype=np.int64)) != index.size:
        return False
    # a fixed sample of positions first (each candidate costs O(sample)), then all of them
    pos = np.concatenate([np.arange(min(64, index.size)), np.linspace(0, index.size - 1, 256).astype(np.int64)])
    if not np.array_equal(_source_index(lay, src, pos), index[pos]):
        return False
    every = np.arange(1, int(np.prod(src, dtype=np.int64)) + 1, dtype=np.int64).reshape(src)
    return bool(np.array_equal(lay.apply(every).reshape(-1), index))


def _source_index(lay: Layout, src: tuple[int, ...], pos: np.ndarray) -> np.ndarray:
    """For output positions ``pos``: 1 + the flat source index they read, 0 for padding."""
    out_shape = [lay.split[i] for i in lay.perm]
    coords = np.unravel_index(pos, out_shape)
    split_coords: list[Any] = [None] * len(lay.split)
    for j, i in enumerate(lay.perm):
        split_coords[i] = coords[j]
    padded_coords = np.unravel_index(np.ravel_multi_index(split_coords, lay.split), lay.padded)
    inside = np.all([c < d for c, d in zip(padded_coords, src)], axis=0)
    flat = np.ravel_multi_index([np.minimum(c, d - 1) for c, d in zip(padded_coords, src)], src)
    return np.where(inside, flat + 1, 0)


def _find_transpose(source: str, src: tuple[int, ...], shape: tuple[int, ...], index: np.ndarray) -> Layout | None:
    """Find pad -> split axes into blocks -> transpose that gives ``index``; None if none does.

    Tries plain transposes, then every choice of blocked axes (one block size, padded to a
    multiple of it) with the outer parts in order and the block parts last in any order:
    the shape of NCHWc filter reorders (OIHW -> O/b I/b H W i o) and their kin.
    """
    rank = len(src)
    candidates: list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = []
    if rank <= 5:
        candidates += [(src, src, perm) for perm in itertools.permutations(range(rank))]
    for bs in _BLOCKS:
        for k in range(1, min(rank, 3) + 1):
            for axes in itertools.combinations(range(rank), k):
                padded = tuple(-(-d // bs) * bs if i in axes else d for i, d in enumerate(src))
                split: list[int] = []
                outer, inner = [], []
                for i, d in enumerate(padded):
                    outer.append(len(split))
                    if i in axes:
                        split += [d // bs, bs]
                        inner.append(len(split) - 1)
                    else:
                        split.append(d)
                candidates += [(padded, tuple(split), tuple(outer) + order) for order in itertools.permutations(inner)]
    for padded, split_t, perm in candidates:
        lay = Layout(source, shape, padded, split_t, perm)
        if _matches(lay, src, index):
            return lay
    return None


def _with_placeholders(m: onnx.ModelProto, layouts: Mapping[str, Layout], values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """The optimized model with every weight-made initializer's data left out (supplied per
    session by ``add_external_initializers``) and every other one inline."""
    out = onnx.ModelProto()
    out.CopyFrom(m)
    for t in out.graph.initializer:
        if t.name in layouts:
            point_at(t, _PLACEHOLDER, 0, values[t.name].nbytes)
        else:
            t.CopyFrom(numpy_helper.from_array(values[t.name], t.name))
    return out
