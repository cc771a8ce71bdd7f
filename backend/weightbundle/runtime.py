"""Load a bundle and run its graphs: the ``aclmdlBundle*`` analogue.

>>> import numpy as np, weightbundle as wb                       # doctest: +SKIP
>>> with wb.Bundle.load_from_file("mlp.bundle") as b:
...     b.execute(b.model_id(1), {})                               # init: variables <- initial values
...     y = b.execute(b.model_id(0), {"x": np.ones((1, 4), np.float32)})
...     b.execute(2, {"w0": np.zeros((4, 4), np.float32), "w1": np.empty((0,), np.float32)})  # w1 kept

Every weight version lives in a ``WeightStore`` as immutable, memory-mapped
files; an inference session is built per version on first use (zero-copy, or a
pre-packed copy when ``prepack=True``), so a running inference is never torn.
"""

from __future__ import annotations

import io
import mmap
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np
import onnx
import onnxruntime as ort

from . import format as fmt
from . import packing
from .convert import UPDATED_SUFFIX, VALID_OUTPUT, init_graph, is_placeholder, retype_update_graph
from .errors import BundleError, FormatError, InputError, NotInitializedError, UnloadedError, UpdateError
from .format import GRAPH_INFERENCE, GRAPH_INIT, GRAPH_UPDATE, VariableSpec
from .store import STAGING, StagedVersion, Version, WeightStore

STAGING_MIN_BYTES = 1 << 20  # below this, the plain write path is as fast and holds no staging blob

_LEVELS = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None  # None dims are dynamic; None shape is unknown rank


@dataclass
class RuntimeOptions:
    """How sessions are built. Measured trade-offs are in the README's performance section.

    prepack=True: each weight version gets a session with ORT's pre-packed copy of the
    MatMul/Conv weights and ``optimization`` applied with the weights known ("all" gives
    Conv+BatchNorm folding and NCHWc, as a baked ORT session has): steady inference at
    baked speed, at the cost of a per-instance copy and ~1 ms/MiB of build time.
    prepack=False: sessions memory-map the store (zero-copy, builds in ~1 ms, slower GEMMs).
    hybrid=True (with prepack): a new version is served at once from a zero-copy session
    while the pre-packed one builds on a background thread, then swapped in; so an update
    is visible after about one memcpy and full speed follows a build later.
    """

    prepack: bool = True
    optimization: str = "all"  # ORT level applied when a version's (pre-packed) session is built
    hybrid: bool = True
    intra_op_threads: int = 0
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    history: int = 1  # previous versions kept for rollback
    staging: bool = True  # keep one pre-allocated staging blob (one model size of tmpfs) for fast updates
    share_packed: bool = True  # prepack: one packed copy per version in the store, mapped by every instance
    store_dir: str | None = None  # shared store directory; None: a private one


def _graph_specs(values: list[onnx.ValueInfoProto]) -> list[TensorSpec]:
    """Signature from the graph itself: no session (and no weights) needed."""
    out = []
    for v in values:
        tt = v.type.tensor_type
        dtype = np.dtype(object) if tt.elem_type == onnx.TensorProto.STRING else onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim) if tt.HasField("shape") else None
        out.append(TensorSpec(v.name, np.dtype(dtype), shape))
    return out


def validate_inputs(specs: list[TensorSpec], inputs: Mapping[str, Any], what: str) -> dict[str, np.ndarray]:
    """Names, dtypes and shapes against a graph signature, with messages that say which."""
    known = {s.name for s in specs}
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise InputError(f"{what}: unknown input(s) {unknown}; expected {sorted(known)}")
    missing = sorted(known - set(inputs))
    if missing:
        raise InputError(f"{what}: missing input(s) {missing}")
    out = {}
    for s in specs:
        a = inputs[s.name]
        if not isinstance(a, np.ndarray):
            raise InputError(f"{what}: input {s.name!r} must be a numpy array, got {type(a).__name__}")
        if a.dtype != s.dtype:
            raise InputError(f"{what}: input {s.name!r} has dtype {a.dtype}, expected {s.dtype}")
        if s.shape is not None and (a.ndim != len(s.shape) or any(w is not None and w != d for w, d in zip(s.shape, a.shape))):
            want = tuple("?" if w is None else w for w in s.shape)
            raise InputError(f"{what}: input {s.name!r} has shape {a.shape}, expected {want}")
        out[s.name] = a
    return out


class Bundle:
    """A loaded bundle. Create with ``load_from_file`` or ``load_from_mem``."""

    def __init__(self, buffer: Any, options: RuntimeOptions | None = None, _owner: Any = None):
        self.options = options or RuntimeOptions()
        if self.options.optimization not in _LEVELS:
            raise ValueError(f"optimization must be one of {sorted(_LEVELS)}")
        self._owner = _owner  # keeps an mmap alive as long as views into it exist
        self._layout = fmt.decode(buffer)
        self._drop_weight_pages()  # the CRC check touched every page; the weights are read from the store
        self._graphs = {gid: self._parse_graph(gid, mv) for gid, mv in self._layout.graphs.items()}
        self.variables: list[VariableSpec] = self._layout.variables  # store entries: what inference reads + kept sources
        self._specs = {v.name: v for v in self.variables}
        self.sources: list[VariableSpec] = self._layout.sources  # update-graph inputs (= variables in 1.0 bundles)
        self._source_specs = {s.name: s for s in self.sources}
        self.derived: dict[str, list[str]] = self._layout.derived
        self.aliases: dict[str, str] = self._layout.aliases  # tied update input -> the source it sets
        self._deps = {v.name: self.derived.get(v.name, [v.name]) for v in self.variables}
        # entries inference reads (placeholders); the rest of the table are kept sources
        self.variables_read = [t.name for t in self._graphs[GRAPH_INFERENCE].graph.initializer if is_placeholder(t)]
        self._check_graphs_match_table()
        self._infer_graph = self._graphs[GRAPH_INFERENCE]  # or the stored source graph, see _new_session
        self._store = (
            WeightStore(self.options.store_dir, self.variables, self.options.history)
            if self.options.store_dir
            else WeightStore.private(self.variables, self.options.history)
        )
        self._owns_store = self.options.store_dir is None
        # A private store must not outlive the process if the caller forgets unload().
        self._finalizer = weakref.finalize(self, WeightStore.destroy, self._store) if self._owns_store else (lambda: None)
        self._lock = threading.Lock()
        self._infer: tuple[int, ort.InferenceSession] | None = None
        self._builder = _Builder(
            self._swap_in, lambda v, e: self._log(f"building version {v.number}'s pre-packed session failed (its zero-copy session keeps serving it): {e!r}")
        )
        self._staging_thread: threading.Thread | None = None
        self._collect_threads: list[threading.Thread] = []  # see activate
        self._staging_map: tuple[int, np.ndarray] | None = None  # (inode, populated mapping) of staging.bin
        self._update_sessions: dict[tuple[tuple[str, str], ...], ort.InferenceSession] = {}
        self._prebuilt: tuple[int, ort.InferenceSession] | None = None  # staged version's session (see stage)
        g = self._graphs[GRAPH_INFERENCE].graph
        consts = {t.name for t in g.initializer}
        self.inputs = _graph_specs([i for i in g.input if i.name not in consts])
        self.outputs = _graph_specs(list(g.output))
        self._unloaded = False
        self._log: Any = lambda message: None  # the serving layer points this at Triton's log

    # -- loading ---------------------------------------------------------------
    @classmethod
    def load_from_file(cls, path: str | os.PathLike, options: RuntimeOptions | None = None) -> "Bundle":
        """Memory-map and validate a bundle file (initial weights are not copied)."""
        try:
            with open(os.fspath(path), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    raise FormatError(f"{os.fspath(path)}: empty file")
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise BundleError(f"cannot open bundle {os.fspath(path)!r}: {e.strerror or e}") from None
        try:
            return cls(memoryview(mm), options, _owner=mm)
        except FormatError as e:
            raise type(e)(f"{os.fspath(path)}: {e}") from None

    @classmethod
    def load_from_mem(cls, buffer: bytes | bytearray | memoryview, options: RuntimeOptions | None = None) -> "Bundle":
        """Load from bytes already in memory; the buffer must stay unchanged while loaded."""
        return cls(buffer, options, _owner=buffer)

    def _parse_graph(self, gid: int, mv: memoryview) -> onnx.ModelProto:
        try:
            m = onnx.ModelProto()
            m.ParseFromString(bytes(mv))
            return m
        except Exception as e:
            raise FormatError(f"graph {gid} is not a valid ONNX model: {e}") from None

    def _check_graphs_match_table(self) -> None:
        table = [(v.name, v.dtype, v.shape) for v in self.variables]
        onnx_dt = lambda t: onnx.helper.tensor_dtype_to_np_dtype(t).name  # noqa: E731
        ph = [(t.name, onnx_dt(t.data_type), tuple(t.dims)) for t in self._graphs[GRAPH_INFERENCE].graph.initializer if is_placeholder(t)]
        # Every placeholder is a table entry; an entry inference does not read is a kept source.
        kept = set(table) - set(ph)
        if set(ph) - set(table) or any(n not in self._source_specs for n, _, _ in kept):
            raise FormatError(f"inference graph variables {sorted(p[0] for p in ph)} disagree with the variable table {sorted(t[0] for t in table)}")
        upd = [i.name for i in self._graphs[GRAPH_UPDATE].graph.input]
        if upd != [s.name for s in self.sources]:
            raise FormatError(f"update graph inputs {upd} disagree with the source table {[s.name for s in self.sources]}")
        if GRAPH_INIT in self._graphs:
            outs = [o.name for o in self._graphs[GRAPH_INIT].graph.output]
            if outs != [v.name for v in self.variables]:
                raise FormatError(f"init graph outputs {outs} disagree with the variable table")

    # -- CANN-style surface -----------------------------------------------------
    @property
    def model_num(self) -> int:
        self._alive()
        return len(self._graphs)

    def model_id(self, index: int) -> int:
        """Graph id at ``index`` (0 inference, 1 init when present, 2 update)."""
        self._alive()
        ids = sorted(self._graphs)
        if not 0 <= index < len(ids):
            raise IndexError(f"model index {index} out of range: this bundle has {len(ids)} graphs {ids}")
        return ids[index]

    @property
    def update_inputs(self) -> list[TensorSpec]:
        """The update graph's inputs in order: name, dtype, shape (CANN: the update model's input descs).

        These are the *sources* (a trainer's state_dict names and layouts); the variables
        inference reads may be derived from them.  An update names these tensors; an
        absent or empty one keeps what it feeds.
        """
        return [TensorSpec(s.name, s.np_dtype, tuple(s.shape)) for s in self.sources]

    @property
    def has_init(self) -> bool:
        self._alive()
        return GRAPH_INIT in self._graphs

    @property
    def version(self) -> int | None:
        """Current weight version: 0 after init, +1 per applied update; None before any."""
        self._alive()
        return self._store.head()

    @property
    def store(self) -> WeightStore:
        self._alive()
        return self._store

    def execute(self, model_id: int, inputs: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Run graph ``model_id``: inference returns outputs; init and update return {}."""
        self._alive()
        inputs = inputs or {}
        if model_id == GRAPH_INFERENCE:
            return self.infer(inputs)[0]
        if model_id == GRAPH_INIT and self.has_init:
            if inputs:
                raise InputError(f"the init graph takes no inputs, got {sorted(inputs)}")
            self.init()
            return {}
        if model_id == GRAPH_UPDATE:
            self.update(inputs)
            return {}
        raise InputError(f"unknown model id {model_id}: this bundle has graphs {sorted(self._graphs)}")

    def unload(self) -> None:
        """Release sessions and the private weight store. Safe to call twice."""
        if self._unloaded:
            return
        self._unloaded = True
        self._builder.stop()
        if self._staging_thread is not None:  # it writes into the store: finish before removing it
            self._staging_thread.join(timeout=30)
        for t in self._collect_threads:  # they touch the store: finish before it goes
            t.join(timeout=30)
        self._infer = None
        self._prebuilt = None
        self._update_sessions.clear()
        if self._owns_store:  # a shared store (options.store_dir) belongs to whoever passed it
            self._finalizer()
        self._layout = None  # type: ignore[assignment]
        if isinstance(self._owner, mmap.mmap):
            try:
                self._owner.close()
            except BufferError:  # a caller still holds a view; the GC closes it later
                pass
        self._owner = None

    def __enter__(self) -> "Bundle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unload()

    def _alive(self) -> None:
        if self._unloaded:
            raise UnloadedError("bundle was unloaded; load it again to use it")

    # -- graphs -----------------------------------------------------------------
    def infer(self, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """Run the inference graph; returns (outputs, the weight version they came from)."""
        self._alive()
        feeds = validate_inputs(self.inputs, inputs, "inference")
        version, sess = self.infer_session()
        try:
            outs = sess.run(None, feeds)
        except Exception as e:  # ORT errors on values (e.g. an out-of-range Gather index)
            raise InputError(f"inference failed: {e}") from None
        return {o.name: a for o, a in zip(self.outputs, outs)}, version

    def init(self, version: int | None = None) -> int:
        """Run the init graph: every variable <- its initial value. Returns the new version
        (``version`` when given: a publisher-chosen number, see ``update``)."""
        self._alive()
        if not self.has_init:
            raise BundleError("this bundle was built without an init graph (--no-init); set weights with an update")
        init = self._graphs[GRAPH_INIT]
        proto = onnx.ModelProto()
        proto.CopyFrom(init)
        rows = {r["name"]: r for r in self._layout.toc["variables"]}
        for t in proto.graph.initializer:  # point external refs at the in-memory weight section
            name = t.name[len("init/") :]
            del t.external_data[:]
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, val in (("location", "weights"), ("offset", rows[name]["offset"]), ("length", rows[name]["nbytes"])):
                t.external_data.add(key=k, value=str(val))
        outs = run_init_graph(proto, self._weight_section(), self._session_options(prepack=False, level="none", housekeeping=True))
        version = self._store.publish({v.name: a for v, a in zip(self.variables, outs)}, op="init", version=version).number
        del outs
        self._drop_weight_pages()  # initial weights are in the store now
        if self.options.staging:
            self._prepare_staging_soon()
        else:
            _release_free_memory()
        return version

    def export(self, version: Version | None = None) -> bytes:
        """A complete, loadable bundle whose initial weights are ``version``'s (default: current)."""
        buf = io.BytesIO()
        self.export_to(buf, version)
        return buf.getvalue()

    def export_to(self, f: BinaryIO, version: Version | None = None) -> int:
        """Stream that bundle into a seekable file (weights go straight from the store's mmaps).

        Same compiled graphs; the init graph is regenerated when this bundle had none.
        """
        self._alive()
        v = version or self._store.current()
        if v is None:
            raise NotInitializedError("no weights to export yet")
        init = self._graphs.get(GRAPH_INIT)
        init_bytes = bytes(self._layout.graphs[GRAPH_INIT]) if init is not None else init_graph(self.variables).SerializeToString()
        graphs = {GRAPH_INFERENCE: bytes(self._layout.graphs[GRAPH_INFERENCE]), GRAPH_INIT: init_bytes, GRAPH_UPDATE: bytes(self._layout.graphs[GRAPH_UPDATE])}
        meta = {k: val for k, val in self._layout.toc.items() if k not in ("graphs", "variables", "weights", "extra")}
        extra = {k: bytes(mv) for k, mv in self._layout.extra.items()}
        return fmt.write(f, graphs, self.variables, {s.name: self._store.array(v, s.name) for s in self.variables}, meta, extra)

    def _drop_weight_pages(self) -> None:
        """Unmap the file's initial-weight pages from this process, so that every instance of
        a model does not keep the bundle's weights resident (they stay in the page cache,
        evictable, until init or export reads them again)."""
        w = self._layout.toc.get("weights") if self._layout else None
        if w and isinstance(self._owner, mmap.mmap):
            start = w["offset"] // mmap.PAGESIZE * mmap.PAGESIZE
            self._owner.madvise(mmap.MADV_DONTNEED, start, w["offset"] + w["length"] - start)

    def _weight_section(self) -> np.ndarray:
        w = self._layout.toc["weights"]
        base = np.frombuffer(self._owner if self._owner is not None else b"", dtype=np.uint8)
        return base[w["offset"] : w["offset"] + w["length"]]

    def check_update(self, inputs: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Validate an update before touching anything: names, castable dtypes, shapes.

        Returns the full feed (absent inputs become empty = keep) and the dtypes that
        need a retyped update graph.
        """
        self._alive()
        specs = self._source_specs
        unknown = sorted(set(inputs) - set(specs))
        if unknown:
            raise UpdateError(f"unknown weight(s) {unknown}; this bundle's update inputs are {list(specs)[:20]}")
        feed, retype = {}, {}
        for name, spec in specs.items():
            a = inputs.get(name)
            if a is None:
                feed[name] = np.empty((0,), spec.np_dtype)
                continue
            if not isinstance(a, np.ndarray):
                raise UpdateError(f"weight {name!r} must be a numpy array, got {type(a).__name__}")
            want = spec.np_dtype
            if a.dtype != want:
                bf16 = a.dtype.name == "bfloat16"  # ml_dtypes: safetensors BF16, cast inside the update graph
                castable = (
                    (a.dtype.kind == want.kind == "f")
                    or (bf16 and want.kind == "f")
                    or (a.dtype.kind in "iu" and want.kind in "iu" and np.can_cast(a.dtype, want))
                )
                if not castable or (a.dtype.name not in fmt.DTYPES and not bf16):
                    raise UpdateError(f"weight {name!r}: dtype {a.dtype} cannot be cast to the variable's dtype {want}")
                retype[name] = a.dtype.name
            if a.size == 0 and 0 in a.shape:
                feed[name] = a
                continue
            if a.shape != spec.shape:
                raise UpdateError(f"weight {name!r}: shape {a.shape} does not match the variable's shape {spec.shape} (send an empty tensor to keep it)")
            feed[name] = a
        return feed, retype

    def load_state_dict(
        self, tensors: Mapping[str, Any], strict: bool = True, require_all: bool = False, expected_version: int | None = None, reject_nonfinite: bool = False
    ) -> dict[str, Any]:
        """Push a whole checkpoint, like torch's ``load_state_dict``: name -> array (or torch tensor).

        Entries that are not update inputs are an error unless ``strict=False``; then they
        are listed under ``ignored``.  ``require_all`` fails when an update input is missing.
        Returns ``{"version", "updated", "ignored", "recomputed"}``.
        """
        from .checkpoint import select_update, to_numpy

        arrays = to_numpy(tensors)
        send, ignored = select_update([s.name for s in self.sources], list(arrays), strict=strict, require_all=require_all)
        version = self.update({n: arrays[n] for n in send}, expected_version=expected_version, reject_nonfinite=reject_nonfinite)
        return {"version": version, "updated": send, "ignored": ignored, "recomputed": self.changed_by(set(send))}

    def changed_by(self, pushed: set[str]) -> list[str]:
        """Store entries an update of ``pushed`` sources recomputes (every entry derived from one)."""
        return [v.name for v in self.variables if pushed.intersection(self._deps[v.name])]

    def update(self, inputs: Mapping[str, np.ndarray], expected_version: int | None = None, reject_nonfinite: bool = False, version: int | None = None) -> int:
        """Apply an update through the update graph, all-or-nothing. Returns the new version.

        ``version``: a publisher-chosen number (must exceed the current one), so that a
        fleet labels the same weights alike; default current + 1.
        """
        return self._through_update_graph(
            inputs, expected_version, reject_nonfinite, lambda feed, retype, changed, ev: self._apply(feed, retype, changed, ev, reject_nonfinite, version)
        )

    def _through_update_graph(
        self,
        inputs: Mapping[str, np.ndarray],
        expected_version: int | None,
        reject_nonfinite: bool,
        sink: Callable[[dict[str, np.ndarray], dict[str, str], list[str], int | None], Any],
    ) -> Any:
        """Check an update and work out what it recomputes; ``sink`` runs the update graph and
        stores the result (``_apply`` publishes it, ``stage`` stages it)."""
        self._alive()
        feed, retype = self.check_update(inputs)
        if reject_nonfinite:  # name the source sent; values that overflow in the cast are caught after it (_check_finite)
            for name, a in feed.items():
                if a.size and a.dtype.kind in "fV" and not np.isfinite(a.astype(np.float32) if a.dtype.kind == "V" else a).all():
                    raise UpdateError(f"weight {name!r} contains NaN or Inf")
                if a.size and a.dtype.name == "bfloat16" and not np.isfinite(a.astype(np.float32)).all():
                    raise UpdateError(f"weight {name!r} contains NaN or Inf")
        # Zero-size sources count as set when named, so a first full update can include them.
        sent = {n for n, a in feed.items() if a.size or (self._source_specs[n].nbytes == 0 and n in inputs)}
        for alias in sorted(sent & set(self.aliases)):  # tied names: one tensor, so both copies must agree
            p = self.aliases[alias]
            if p in sent and not np.array_equal(np.asarray(feed[alias], np.float64), np.asarray(feed[p], np.float64), equal_nan=True):
                raise UpdateError(f"{alias!r} and {p!r} are one tied tensor, but the values sent differ")
        pushed = {self.aliases.get(n, n) for n in sent}
        changed = self.changed_by(pushed)
        # A derived entry needs all its sources: those not pushed are kept sources, read from the
        # current version.  Then reading and publishing must be one step (under the store lock).
        fill = sorted({d for e in changed for d in self._deps[e] if d not in pushed}, key=[s.name for s in self.sources].index)
        if fill:
            with self._store.locked():
                cur = self._store.current()
                if cur is None:
                    raise UpdateError(f"no current value for {fill[:5]}: the first update must set every weight")
                for d in fill:
                    if d not in cur.entries:
                        raise UpdateError(f"source {d!r} is needed to recompute {[e for e in changed if d in self._deps[e]][:5]} but has no stored value")
                    feed[d] = np.asarray(self._store.array(cur, d))
                    retype.pop(d, None)
                return sink(feed, retype, changed, cur.number if expected_version is None else expected_version)
        return sink(feed, retype, changed, expected_version)

    def _apply(
        self,
        feed: dict[str, np.ndarray],
        retype: dict[str, str],
        changed: list[str],
        expected_version: int | None,
        reject_nonfinite: bool = False,
        version: int | None = None,
    ) -> int:
        sess = self._update_session(retype)
        staged = None
        if self.options.staging and sum(self._specs[n].nbytes for n in changed) >= STAGING_MIN_BYTES:
            staged = self._store.claim_staging()
        if staged is not None:
            try:
                self._run_update_into(sess, feed, changed, staged, reject_nonfinite)
            except BaseException:
                self._store.release_staging(staged)
                raise
            version = self._store.publish_staged(staged, changed, op="update", expected_version=expected_version, version=version).number
        else:
            values = self._run_update(sess, feed, changed)
            if reject_nonfinite:
                _check_finite(values)
            version = self._store.publish(values, op="update", expected_version=expected_version, version=version).number
        if self.options.staging:
            self._prepare_staging_soon()
        else:
            _release_free_memory()
        return version

    def stage(
        self,
        inputs: Mapping[str, np.ndarray],
        version: int | None = None,
        reject_nonfinite: bool = False,
        ttl: float = 3600.0,
        op: str = "stage",
        origin: dict | None = None,
    ) -> StagedVersion:
        """Like ``update``, but the result is a *staged* version that serves nothing until
        ``activate(number)``.  Same checks, same sources-to-entries logic and the same update
        graph as ``update`` (``_through_update_graph``); only where the result goes differs.
        """

        def sink(feed: dict[str, np.ndarray], retype: dict[str, str], changed: list[str], _ev: int | None) -> StagedVersion:
            # Entries derived from kept sources were computed from the current version: then
            # this runs under the store lock, so the staged version's base is that version.
            values = self._run_update(self._update_session(retype), feed, changed)
            if reject_nonfinite:
                _check_finite(values)
            return self._store.stage(((n, values.pop(n)) for n in changed), op, version=version, ttl=ttl, origin=origin)

        st = self._through_update_graph(inputs, None, reject_nonfinite, sink)
        try:
            self._prebuild(st)
        except BaseException:
            self._store.abort(st.number)
            raise
        return st

    def _prebuild(self, st: StagedVersion) -> None:
        """Build the staged version's final inference session now, in the stage phase, so
        that activating it swaps a pointer instead of building a session."""
        entries = dict(self._store.version(st.base).entries) if st.base is not None else {}
        entries.update(st.entries)
        v = Version(st.number, st.op, entries, st.time, st.base)
        # The pre-packed copy goes to the store's shared packed files (keyed by number), so the
        # other instances load it after activation instead of packing again.  It maps the
        # staged blob, and the rename at activation keeps that mapping valid.
        sess = self._packed_session(v) if self.options.prepack else self._new_session(v, False, self.options.optimization)
        with self._lock:
            self._prebuilt = (st.number, sess)

    def activate(self, number: int, expected_version: int | None = None) -> Version:
        """Publish staged version ``number`` (see ``WeightStore.activate``) and serve it here at once."""
        self._alive()
        v = self._store.activate(number, expected_version, collect=False)
        old = self._infer
        self.infer_session()
        # Freeing the old version (its blob's pages, its session) does not delay the switch.
        t = threading.Thread(target=self._collect, args=(old,), name="weightbundle-collect", daemon=True)
        self._collect_threads = [x for x in self._collect_threads if x.is_alive()] + [t]
        t.start()
        return v

    def _collect(self, old: Any) -> None:
        del old
        try:
            self._store.collect()
        except Exception:  # noqa: BLE001 - the next publish collects again
            pass

    def staged_versions(self) -> list[StagedVersion]:
        """The store's staged versions; a session built for one that expired meanwhile is dropped."""
        staged = self._store.staged_versions()
        with self._lock:
            if self._prebuilt is not None and self._prebuilt[0] not in {st.number for st in staged}:
                head = self._store.head()
                if head is None or self._prebuilt[0] > head:  # not activated either: it expired
                    self._prebuilt = None
        return staged

    def abort(self, number: int) -> StagedVersion:
        """Drop staged version ``number`` and the session built for it."""
        self._alive()
        st = self._store.abort(number)
        with self._lock:
            if self._prebuilt is not None and self._prebuilt[0] == number:
                self._prebuilt = None
        return st

    @staticmethod
    def _bind_inputs(io: Any, feed: Mapping[str, np.ndarray]) -> None:
        for name, a in feed.items():
            if a.dtype.name == "bfloat16":  # numpy has no bfloat16: hand ORT the raw 16-bit words, typed
                v = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(np.require(a, requirements="C").view(np.uint16), onnx.TensorProto.BFLOAT16)
                io.bind_ortvalue_input(name, v)
            else:
                io.bind_cpu_input(name, np.require(a, requirements="C"))  # (ascontiguousarray makes 0-d arrays 1-d)

    def _run_update(self, sess: ort.InferenceSession, feed: dict[str, np.ndarray], changed: list[str]) -> dict[str, np.ndarray]:
        """Plain path: the update graph's outputs come back as arrays."""
        io = sess.io_binding()
        self._bind_inputs(io, feed)
        names = [o.name for o in sess.get_outputs()]
        for n in names:
            io.bind_output(n, "cpu")
        try:
            sess.run_with_iobinding(io)
        except Exception as e:
            raise UpdateError(f"update graph rejected the update: {e}") from None
        outs = [o.numpy() for o in io.get_outputs()]
        self._check_valid(outs[names.index(VALID_OUTPUT)])
        return {n: outs[names.index(n + UPDATED_SUFFIX)].reshape(self._specs[n].shape) for n in changed}

    def _run_update_into(self, sess: ort.InferenceSession, feed: dict[str, np.ndarray], changed: list[str], path: str, reject_nonfinite: bool = False) -> None:
        """Fast path: bind the update graph's outputs straight into the claimed staging blob."""
        offsets, size = self._store.staging_layout()
        premapped, self._staging_map = self._staging_map, None
        if premapped is not None and premapped[0] == os.stat(path).st_ino:
            mm = premapped[1]  # populated in the background: no page faults on this path
        else:
            mm = np.memmap(path, dtype=np.uint8, mode="r+", shape=(size,))
        try:
            io = sess.io_binding()
            self._bind_inputs(io, feed)
            views = {}
            for v in self.variables:
                out = v.name + UPDATED_SUFFIX
                if v.name in changed and v.nbytes:
                    view = mm[offsets[v.name] : offsets[v.name] + v.nbytes].view(v.np_dtype).reshape(v.shape)
                    views[out] = view
                    io.bind_output(out, "cpu", 0, v.np_dtype, list(v.shape), view.ctypes.data)
                else:
                    io.bind_output(out, "cpu")
            io.bind_output(VALID_OUTPUT, "cpu")
            try:
                sess.run_with_iobinding(io)
            except Exception as e:
                raise UpdateError(f"update graph rejected the update: {e}") from None
            outs = dict(zip([o.name for o in sess.get_outputs()], io.get_outputs()))
            self._check_valid(outs[VALID_OUTPUT].numpy())
            for out, view in views.items():  # ORT normally writes in place; copy if it chose not to
                if outs[out].data_ptr() != view.ctypes.data:
                    np.copyto(view, outs[out].numpy())
            if reject_nonfinite:
                _check_finite({out[: -len(UPDATED_SUFFIX)]: view for out, view in views.items()})
        finally:
            del mm

    def _check_valid(self, valid: np.ndarray) -> None:
        if not valid.all():
            bad = [v.name for v, ok in zip(self.sources, valid) if not ok]
            raise UpdateError(f"update graph rejected the shape of {bad}")

    def _prepare_staging_soon(self) -> None:
        """Allocate the next staging blob on a background thread (never on the update's path)."""
        store = self._store

        def run() -> None:
            try:
                store.prepare_staging()
                self._staging_map = _populated_map(os.path.join(store.path, STAGING))
            except (OSError, ValueError):  # store gone (unload), tmpfs full, or claimed meanwhile: plain path
                pass
            _release_free_memory()

        t = threading.Thread(target=run, name="weightbundle-staging", daemon=True)
        self._staging_thread = t
        t.start()

    def _update_session(self, retype: dict[str, str]) -> ort.InferenceSession:
        key = tuple(sorted(retype.items()))
        sess = self._update_sessions.get(key)
        if sess is None:
            proto = self._graphs[GRAPH_UPDATE]
            if retype:  # same graph, inputs declared with the client's dtype; its Cast nodes convert
                proto = retype_update_graph(proto, retype)
            sess = ort.InferenceSession(
                proto.SerializeToString(), self._session_options(prepack=False, level="basic", housekeeping=True), providers=["CPUExecutionProvider"]
            )
            self._update_sessions[key] = sess
        return sess

    # -- sessions per version -----------------------------------------------------
    def _session_options(self, prepack: bool, level: str, housekeeping: bool = False) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.graph_optimization_level = _LEVELS[level]
        so.log_severity_level = 3
        if housekeeping:
            # Init/update graphs only cast and copy (memory-bound): one thread, and no
            # spinning pool left behind to steal the cores inference needs.
            so.intra_op_num_threads = 1
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        elif self.options.intra_op_threads:
            so.intra_op_num_threads = self.options.intra_op_threads
        so.add_session_config_entry("session.disable_prepacking", "0" if prepack else "1")
        return so

    def _infer_proto_for(self, v: Version) -> onnx.ModelProto:
        """The inference graph with placeholders pointing at version ``v``'s blobs."""
        m = onnx.ModelProto()
        m.CopyFrom(self._infer_graph)
        for t in m.graph.initializer:
            if not is_placeholder(t):
                continue
            del t.external_data[:]
            blob, off = v.entries[t.name]
            for k, val in (("location", blob), ("offset", off), ("length", self._specs[t.name].nbytes)):
                t.external_data.add(key=k, value=str(val))
        return m

    def _new_session(self, v: Version, prepack: bool, level: str) -> ort.InferenceSession:
        so = self._session_options(prepack, level)
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", self._store.path)
        try:
            return ort.InferenceSession(self._infer_proto_for(v).SerializeToString(), so, providers=list(self.options.providers))
        except Exception as e:
            if not all(os.path.exists(os.path.join(self._store.path, b)) for b, _ in v.entries.values()):
                raise _Superseded(v.number) from None  # newer updates collected its blobs meanwhile
            source = self._layout.extra.get("inference_source") if self._layout else None
            if source is not None and self._infer_graph is self._graphs[GRAPH_INFERENCE]:
                # The graph compiled at build time may not load here (another ONNX Runtime
                # version or provider): fall back, once, to the unoptimised graph the bundle keeps.
                self._infer_graph = self._parse_graph(GRAPH_INFERENCE, source)
                return self._new_session(v, prepack, level)
            raise FormatError(f"ONNX Runtime cannot build the inference session: {e}") from None

    def infer_session(self) -> tuple[int, ort.InferenceSession]:
        """(version, session) for the current weights; builds the session on a new version."""
        cur = self._infer
        head = self._store.head()
        if head is None:
            raise NotInitializedError(
                "weights are not initialised yet: run the init graph, or apply a full update first"
                + ("" if self.has_init else " (this bundle has no init graph)")
            )
        if cur is not None and cur[0] == head:
            return cur
        with self._lock:
            for _ in range(100):
                try:
                    return self._session_for_current()
                except _Superseded:
                    continue  # a burst of updates outran the build: take the newest version
            raise BundleError("weights change faster than an inference session can be built")

    def _session_for_current(self) -> tuple[int, ort.InferenceSession]:
        """Caller holds ``self._lock``."""
        v = self._store.current()
        assert v is not None
        if self._prebuilt is not None and self._prebuilt[0] <= v.number:
            built, self._prebuilt = self._prebuilt, None
            if built[0] == v.number and (self._infer is None or self._infer[0] != v.number):
                self._infer = built  # activated a version staged by this instance: its session is ready
        if self._infer is None or self._infer[0] != v.number:
            opts = self.options
            if opts.prepack and opts.hybrid:
                # Serve the new version now from the zero-copy mapping; the fast session follows.
                # Same optimisation level as the final session, so both give the same numbers.
                self._infer = (v.number, self._new_session(v, prepack=False, level=opts.optimization))
                self._builder.request(v)
            elif opts.prepack:
                self._infer = (v.number, self._packed_session(v))
            else:
                self._infer = (v.number, self._new_session(v, False, opts.optimization))
        return self._infer

    def _packed_session(self, v: Version) -> ort.InferenceSession:
        """Version ``v``'s pre-packed session: from the store's shared packed copy (built here
        if no instance has yet), or a private one where sharing is off or unsupported."""
        opts = self.options
        if opts.share_packed and tuple(opts.providers) == ("CPUExecutionProvider",):
            probe = _probe_feeds(self.inputs)
            expected: list[Any] = []
            try:
                path = packing.ensure(
                    self._store.packed_path,
                    v.number,
                    lambda m, d: expected.extend(self._write_packed(v, m, d, probe)),
                    lambda m: self._verify_packed(m, probe, expected),
                )
                sess = self._load_packed(path)
                _release_free_memory()  # ORT packs once more at load to check the file, then frees that copy
                return sess
            except _Superseded:
                raise
            except Exception as e:  # noqa: BLE001 - e.g. an ORT without saved pre-packing: a private copy still serves
                self._log(f"shared pre-packed weights unavailable for version {v.number}, using a private copy: {e}")
        return self._new_session(v, prepack=True, level=opts.optimization)

    def _load_packed(self, model_path: str) -> ort.InferenceSession:
        so = self._session_options(prepack=True, level="none")
        return ort.InferenceSession(model_path, so, providers=list(self.options.providers))

    def _write_packed(self, v: Version, model_path: str, data_name: str, probe: dict[str, np.ndarray] | None) -> list[Any]:
        """Optimize and pre-pack version ``v`` once into ``model_path`` (+ data file); returns
        the builder session's outputs on ``probe`` for ``_verify_packed``."""
        so = self._session_options(prepack=True, level=self.options.optimization)
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", self._store.path)
        so.optimized_model_filepath = model_path
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_name)
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        so.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        try:
            builder = ort.InferenceSession(self._infer_proto_for(v).SerializeToString(), so, providers=["CPUExecutionProvider"])
        except Exception:
            if not all(os.path.exists(os.path.join(self._store.path, b)) for b, _ in v.entries.values()):
                raise _Superseded(v.number) from None
            raise
        return builder.run(None, probe) if probe is not None else []

    def _verify_packed(self, model_path: str, probe: dict[str, np.ndarray] | None, expected: list[Any]) -> None:
        """The packed model must give the builder's exact bytes before anyone may load it."""
        sess = self._load_packed(model_path)
        if probe is not None:
            got = sess.run(None, probe)
            if not all(np.array_equal(a, b, equal_nan=True) for a, b in zip(expected, got)):
                raise BundleError("the saved pre-packed model does not reproduce the builder's outputs")

    def _swap_in(self, v: Version) -> None:
        """Background builder: build version ``v``'s pre-packed session, swap it in if still current."""
        sess = self._packed_session(v)
        with self._lock:
            if self._infer is not None and self._infer[0] == v.number:
                self._infer = (v.number, sess)

    @property
    def fully_optimised(self) -> bool:
        """True when the current version is served by its final (pre-packed) session."""
        return not (self.options.prepack and self.options.hybrid) or self._builder.idle()


def _probe_feeds(specs: list[TensorSpec]) -> dict[str, np.ndarray] | None:
    """A small fixed input for the graph (dynamic dims -> 1), or None when one cannot be made."""
    rng = np.random.default_rng(0)
    feeds = {}
    for s in specs:
        if s.shape is None or s.dtype == np.dtype(object):
            return None
        shape = tuple(1 if d is None else d for d in s.shape)
        if s.dtype.kind == "f":
            feeds[s.name] = rng.standard_normal(shape).astype(s.dtype)
        elif s.dtype.kind in "iub":
            feeds[s.name] = np.zeros(shape, s.dtype)  # index 0 is valid for any Gather/embedding
        else:
            return None
    return feeds


def _check_finite(values: Mapping[str, np.ndarray]) -> None:
    """Refuse NaN/Inf in the values the update graph produced, i.e. *after* the cast to the
    variable's dtype: a float64 1e39 is finite but becomes +inf in a float32 variable."""
    for name, a in values.items():
        if a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
            raise UpdateError(f"weight {name!r} contains NaN or Inf in the variable's dtype {a.dtype} (values out of that dtype's range overflow to Inf)")


def run_init_graph(proto: onnx.ModelProto, section: np.ndarray, so: ort.SessionOptions, in_memory: bool | None = None) -> list[np.ndarray]:
    """Run an init graph whose constants point at location "weights" (offset, length) in ``section``.

    Both paths read the constants in place (no copy of the weight section):
    - an ONNX Runtime with ``add_external_initializers_from_files_in_memory`` (1.32 has it)
      resolves "weights" to the buffer;
    - older ones (1.23 is the newest for Python 3.10) lack it, so the constants become graph
      inputs fed with views of the section. Unlike ``add_initializer`` (whose OrtValues must outlive the session, or ORT crashes), nothing
      must outlive the call: ``run`` holds its feeds only while it runs.
    ``in_memory`` forces a path (tests); None picks by what this ONNX Runtime offers.
    """
    if in_memory is None:
        in_memory = hasattr(so, "add_external_initializers_from_files_in_memory")
    feeds: dict[str, np.ndarray] = {}
    if in_memory:
        so.add_external_initializers_from_files_in_memory(["weights"], [section], [len(section)])
    else:
        proto = _copy(proto)
        g = proto.graph
        kept = []
        for t in g.initializer:
            ext = {e.key: e.value for e in t.external_data}
            if t.data_location != onnx.TensorProto.EXTERNAL or ext.get("location") != "weights":
                kept.append(t)  # inline constants stay constants
                continue
            off, n = int(ext.get("offset", "0")), int(ext["length"])
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            feeds[t.name] = section[off : off + n].view(dtype).reshape(tuple(t.dims))
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        del g.initializer[:]
        g.initializer.extend(kept)
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    return m


def _populated_map(path: str) -> tuple[int, np.ndarray]:
    """Map a file writable with its page tables filled now, not on first touch (~1.4 us/page)."""
    fd = os.open(path, os.O_RDWR)
    try:
        ino, size = os.fstat(fd).st_ino, os.fstat(fd).st_size
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    try:
        mm.madvise(getattr(mmap, "MADV_POPULATE_WRITE", 23))  # Linux >= 5.14
    except OSError:
        arr = np.frombuffer(mm, np.uint8)
        arr[:: mmap.PAGESIZE] = 0  # older kernels: touch every page (contents are overwritten anyway)
    return ino, np.frombuffer(mm, np.uint8)


def _release_free_memory() -> None:
    """Give freed heap back to the OS: after init/updates glibc keeps ~a model size of free arena."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class _Superseded(Exception):
    """A version's blobs were garbage-collected while its session was being built."""


class _Builder:
    """One daemon thread that builds the newest requested session; stale requests are skipped.

    ORT releases the GIL while it builds, so inference goes on meanwhile.  Before a build
    it waits for the version to settle: at least as long as the last build took, and twice
    the last gap between versions.  Under a stream of updates a build would be obsolete
    before it paid off, and on a small machine it would steal the cores that inference
    needs; the zero-copy session serves meanwhile.
    """

    def __init__(self, build: Any, on_error: Any = None):
        self._build = build
        self._on_error = on_error or (lambda v, e: None)
        self._cv = threading.Condition()
        self._want: Version | None = None
        self._busy = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._build_s = 0.05  # duration of the last build
        self._gap_s = float("inf")  # time between the last two requests (versions)
        self._last_request = 0.0

    def request(self, v: Version) -> None:
        with self._cv:
            t = time.monotonic()
            self._gap_s, self._last_request = t - self._last_request, t
            self._want = v
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="weightbundle-session-builder", daemon=True)
                self._thread.start()
            self._cv.notify()

    def idle(self) -> bool:
        with self._cv:
            return self._want is None and not self._busy

    def wait_idle(self, timeout: float = 60.0) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: self._want is None and not self._busy, timeout)

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._want is not None or self._stop)
                if self._stop:
                    return
                v, self._want, self._busy = self._want, None, True
                # Settle: a newer request during the wait replaces this one.
                settle = min(max(self._build_s, 2 * self._gap_s if self._gap_s < 1.0 else 0.0), 2.0)
                if self._cv.wait_for(lambda: self._want is not None or self._stop, timeout=settle):
                    self._busy = False
                    continue
            t0 = time.perf_counter()
            try:
                self._build(v)
            except Exception as e:  # noqa: BLE001 - the zero-copy session keeps serving this version correctly
                self._on_error(v, e)
            finally:
                with self._cv:
                    self._build_s = min(max(time.perf_counter() - t0, 0.01), 2.0)
                    self._busy = False
                    self._cv.notify_all()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
            t = self._thread
        if t is not None:
            t.join(timeout=60)
