"""Load a bundle and run its graphs: the ``aclmdlBundle*`` analogue.

>>> import numpy as np, weightbundle as wb                       # doctest: +SKIP
>>> with wb.Bundle.load_from_file("mlp.bundle") as b:
...     b.execute(b.model_id(1), {})                               # init: variables <- initial values
...     y = b.execute(b.model_id(0), {"x": np.ones((1, 4), np.float32)})
...     b.execute(2, {"w0": np.zeros((4, 4), np.float32), "w1": np.empty((0,), np.float32)})  # w1 kept

Every weight version lives in a ``WeightStore`` as immutable, memory-mapped
files; an inference session is built per version (zero-copy, or a pre-packed copy
when ``prepack=True``), so a running inference is never torn.  ``init``, ``update``
and ``activate`` return with the new version's session built; a version another
instance published to a shared store gets its session on the next inference here.
"""

from __future__ import annotations

import fnmatch
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
from .convert import init_graph, is_placeholder, point_at
from .device import StaleView
from .errors import BundleError, FormatError, InputError, NotInitializedError, UnloadedError
from .format import GRAPH_INFERENCE, GRAPH_INIT, GRAPH_UPDATE, VariableSpec
from .sessions import LEVELS, PIN_MAX_HOT, SessionCache, session_options
from .store import StagedVersion, Version, WeightStore
from .updater import Updater, changed_by


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
    hybrid=True (with prepack): a new version is served at once from a first session while
    the shared pre-packed copy is built or loaded on a background thread, then swapped in.
    That first session is zero-copy: it builds in ~1 ms, but its GEMMs are slower and sum
    in another order, so its last bits can differ from the packed copy's.
    deterministic=True packs it privately instead, exactly as the shared copy is packed
    (~50 ms per 64 MiB, on the update's path): one version, one answer.
    compile_once=True: the graph is optimized once, at the first session build; every later
    version's session loads the optimized graph at level "none" with its weights re-laid
    (NCHWc blocks, folded transposes) by numpy, so a version costs no optimizer run.  Where
    the optimizer does arithmetic on weights (e.g. an unfolded BatchNorm: build with
    ``fold_bn``), each version is optimized as before.
    pin_hot_weights=True (hybrid, not deterministic, CPU): after a partial update (the recent
    versions changed at most half the bytes), serve from one session that packs the weights
    they left alone and takes the changed ones as inputs, fed from the store on each run;
    later versions changing only those reuse it, with no session build, until a version
    settles and is packed whole.  Only the changed layers run on unpacked weights (their
    last bits may differ from the packed session's, as zero-copy's do).  A settled stream
    leaves a standby pin for the same weights; ``pin_weights`` names them ahead, so that
    even the first stream after a load is pinned from its first update.
    device="cuda" (needs onnxruntime-gpu): device-resident weights (``device``): one CUDA
    session per load with the variables as inputs bound to device buffers; a new version
    copies the variables it changed into standby buffers and swaps, with no session build.
    The CPU options above (prepack, hybrid, compile_once, pins) do not apply there.
    resident=True runs that machinery on the CPU too: a test vehicle, not a faster mode
    (a private copy of the weights per instance, GEMMs on unpacked weights).
    """

    prepack: bool = True
    optimization: str = "all"  # ORT level applied when a version's (pre-packed) session is built
    hybrid: bool = True
    deterministic: bool = False  # hybrid: one version, one answer (see above)
    intra_op_threads: int = 0
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    history: int = 1  # previous versions kept for rollback
    staging: bool = True  # after an update, keep one pre-allocated staging blob (one model size of tmpfs) for the next
    staging_idle_seconds: float = 60.0  # drop that blob after this long without an update (0: keep it)
    share_packed: bool = True  # prepack: one packed copy per version in the store, mapped by every instance
    history_on_disk: bool = True  # move blobs only older versions (rollback) read to the disk-backed folder
    compile_once: bool = True  # optimize the graph once per load and re-lay each version's weights (``compiled``)
    pin_hot_weights: bool = True  # after partial updates, one session for the versions that change the same weights (see above)
    pin_weights: tuple[str, ...] = ()  # update inputs (names, fnmatch patterns) streams change: a standby pin for them from load on
    store_dir: str | None = None  # shared store directory; None: a private one
    device: str = "cpu"  # "cuda": inference on the GPU, weights device-resident (``device``); set by a CUDA first provider too
    device_id: int = 0  # which GPU, with device="cuda"
    resident: bool | None = None  # device-resident weights (one session, updates copied in); None: with device="cuda" only

    def __post_init__(self) -> None:
        if self.providers and self.providers[0] == "CUDAExecutionProvider":
            self.device = "cuda"

    @property
    def device_resident(self) -> bool:
        return self.resident if self.resident is not None else self.device == "cuda"

    @property
    def ort_device(self) -> str:
        """ONNX Runtime's name for where device-resident weights live."""
        return "cuda" if self.device == "cuda" else "cpu"

    def session_providers(self) -> list[Any]:
        """Execution providers (with options) for the device-resident session."""
        if self.device != "cuda":
            return list(self.providers)
        # deterministic: cuDNN's heuristic picks the same convolution algorithm in every
        # instance; the exhaustive search (ORT's default) times them and may pick another.
        cuda = {"device_id": str(self.device_id), "cudnn_conv_algo_search": "HEURISTIC" if self.deterministic else "EXHAUSTIVE"}
        return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]


def _call(ref: "weakref.ref[Bundle]", method: str, *args: Any) -> Any:
    """``ref().method(*args)``, or None once the bundle is gone."""
    b = ref()
    return None if b is None else getattr(b, method)(*args)


def _release_private(store: WeightStore, builder: Any, updater: Updater) -> None:
    """What a private store's bundle leaves: stop the threads that write into the store, then remove it."""
    builder.stop()
    updater.settle()
    WeightStore.destroy(store)


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
    """A loaded bundle. Create with ``load_from_file`` or ``load_from_mem``.

    A facade: it owns the decoded file, its graphs and the weight store, runs init and
    export, and delegates updates to an ``Updater`` (updater.py) and inference sessions
    to a ``SessionCache`` (sessions.py).
    """

    def __init__(self, buffer: Any, options: RuntimeOptions | None = None, _owner: Any = None):
        self.options = options or RuntimeOptions()
        if self.options.optimization not in LEVELS:
            raise ValueError(f"optimization must be one of {sorted(LEVELS)}")
        if self.options.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.options.device!r}")
        if self.options.device == "cuda" and hasattr(ort, "preload_dlls"):
            try:  # CUDA and cuDNN from their pip packages (nvidia-*), where the system has none
                ort.preload_dlls()
            except Exception:  # noqa: BLE001 - the session build says what is missing
                pass
        if self.options.device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BundleError(
                "device 'cuda' needs an ONNX Runtime with the CUDA execution provider (onnxruntime-gpu, installed in place of onnxruntime); "
                f"this one offers {ort.get_available_providers()}"
            )
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
        pinned = self._pinned_entries(self.options.pin_weights)  # checked before the store exists: an error leaves nothing behind
        self._store = (
            WeightStore(self.options.store_dir, self.variables, self.options.history)
            if self.options.store_dir
            else WeightStore.private(self.variables, self.options.history)
        )
        self._owns_store = self.options.store_dir is None
        self._collect_threads: list[threading.Thread] = []  # see activate
        g = self._graphs[GRAPH_INFERENCE].graph
        consts = {t.name for t in g.initializer}
        self.inputs = _graph_specs([i for i in g.input if i.name not in consts])
        self.outputs = _graph_specs(list(g.output))
        self._unloaded = False
        self._log: Any = lambda message, level="warn": None  # the serving layer points this at Triton's log
        self._updater = Updater(self.options, self._store, self._graphs[GRAPH_UPDATE], self.variables, self.sources, self.aliases, self._deps)
        me = weakref.ref(self)  # the session cache must not keep this bundle alive (see the finalizer)
        self._sessions = SessionCache(
            self.options,
            self._store,
            self._graphs[GRAPH_INFERENCE],
            lambda: _call(me, "_source_graph"),
            self._specs,
            self.inputs,
            GRAPH_INIT in self._graphs,
            lambda message, level="warn": _call(me, "_log", message, level),  # late-bound: serving replaces _log after load
            self._updater.retire,
            pinned,
        )
        # A private store must not outlive the process if the caller forgets unload(); the
        # background threads go first, or a pack in flight would write its files after it.
        self._finalizer = weakref.finalize(self, _release_private, self._store, self._sessions.builder, self._updater) if self._owns_store else (lambda: None)

    def _pinned_entries(self, patterns: tuple[str, ...]) -> frozenset[str]:
        """``pin_weights``: the weights inference reads that updates of the matching update
        inputs (names or fnmatch patterns) recompute.  (Pins are a CPU-provider path: with
        other providers the names are checked and then unused.)"""
        if not patterns:
            return frozenset()
        o = self.options
        if not (o.prepack and o.hybrid and o.pin_hot_weights and not o.deterministic):
            raise BundleError("pin_weights needs pinned sessions: prepack, hybrid and pin_hot_weights on, deterministic off")
        if not (o.share_packed and o.compile_once):
            raise BundleError("pin_weights needs share_packed and compile_once on: its standby pin loads over the shared packed copy")
        names = [s.name for s in self.sources] + list(self.aliases)
        pushed: set[str] = set()
        for p in patterns:
            hit = fnmatch.filter(names, p)
            if not hit:
                raise BundleError(f"pin_weights: {p!r} matches no update input of this bundle (they are {names[:8]}{' ...' if len(names) > 8 else ''})")
            pushed.update(self.aliases.get(n, n) for n in hit)
        read = set(self.variables_read)
        entries = frozenset(changed_by(self.variables, self._deps, pushed)) & read
        if not entries:
            raise BundleError(f"pin_weights: {sorted(pushed)[:8]} set no weight the inference graph reads")
        share = sum(self._specs[n].nbytes for n in entries) / max(1, sum(self._specs[n].nbytes for n in read))
        if share > PIN_MAX_HOT:
            raise BundleError(f"pin_weights: the weights matched are {share:.0%} of the bytes inference reads; a pinned session pays up to {PIN_MAX_HOT:.0%}")
        return entries

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

    def _source_graph(self) -> onnx.ModelProto | None:
        """The unoptimised inference graph the bundle keeps, if any (see SessionCache._new_session)."""
        source = self._layout.extra.get("inference_source") if self._layout else None
        return None if source is None else self._parse_graph(GRAPH_INFERENCE, source)

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
        self._sessions.close()  # stops the background builder first: it reads the store
        self._updater.close()  # its staging thread writes into the store: finish before removing it
        for t in self._collect_threads:  # they touch the store: finish before it goes
            t.join(timeout=30)
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
        for _ in range(100):
            version, sess, weights = self._sessions.infer_session()
            run = {**feeds, **weights} if weights else feeds  # a pinned session: the weights a stream changes are inputs
            t0 = time.perf_counter()
            try:
                outs = sess.run(None, run)
                break
            except StaleView:
                continue  # device-resident: a newer version is overwriting this view's buffers; serve that one
            except Exception as e:  # ORT errors on values (e.g. an out-of-range Gather index)
                raise InputError(f"inference failed: {e}") from None
        else:
            raise BundleError("weights change faster than an inference can start")
        self._updater.last_infer_s = time.perf_counter() - t0
        if not self._updater.answered.is_set():  # the after-publish work may start (Updater.after_publish)
            self._updater.answered.set()
        return {o.name: a for o, a in zip(self.outputs, outs)}, version

    def infer_session(self) -> tuple[int, ort.InferenceSession]:
        """(version, session) for the current weights; builds the session on a new version.
        A pinned session (``pin_hot_weights``) also takes weights as inputs: use ``infer``."""
        served = self._sessions.infer_session()
        return served.version, served.session

    @property
    def fully_optimised(self) -> bool:
        """True when the current version is served by its final (pre-packed) session."""
        return self._sessions.fully_optimised

    def init(self, version: int | None = None) -> int:
        """Run the init graph: every variable <- its initial value. Returns the new version
        (``version`` when given: a publisher-chosen number, see ``update``), ready to serve."""
        self._alive()
        if not self.has_init:
            raise BundleError("this bundle was built without an init graph (--no-init); set weights with an update")
        init = self._graphs[GRAPH_INIT]
        proto = onnx.ModelProto()
        proto.CopyFrom(init)
        rows = {r["name"]: r for r in self._layout.toc["variables"]}
        for t in proto.graph.initializer:  # point external refs at the in-memory weight section
            row = rows[t.name[len("init/") :]]
            point_at(t, "weights", row["offset"], row["nbytes"])
        outs = run_init_graph(proto, self._weight_section(), session_options(self.options, prepack=False, level="none", housekeeping=True))
        version = self._store.publish({v.name: a for v, a in zip(self.variables, outs)}, op="init", version=version).number
        del outs
        self._drop_weight_pages()  # initial weights are in the store now
        self._updater.after_publish(stage_next=False)
        return self._ready(version)

    def _ready(self, version: int) -> int:
        """Build the session that serves the store's head now, so that no inference waits for it.

        Best effort: ``version`` is published already and the caller must hear so.  A failure
        here (e.g. another instance's newer update collected it meanwhile) is logged, and the
        next inference builds the session again.
        """
        self._sessions.pending = version  # not acknowledged yet: inferences meanwhile may get the version before (device)
        try:
            self._sessions.infer_session()
        except Exception as e:  # noqa: BLE001 - see above
            self._log(f"building the inference session for weights version {version} failed (the next inference tries again): {e!r}")
        finally:
            self._sessions.pending = None
        self._updater.served.set()
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
        return fmt.write(f, graphs, self.variables, self._store.arrays(v, [s.name for s in self.variables]), meta, extra)

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

    def check_update(self, inputs: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Validate an update before touching anything: names, castable dtypes, shapes.

        Returns the full feed (absent inputs become empty = keep) and the dtypes that
        need a retyped update graph.
        """
        self._alive()
        return self._updater.check_update(inputs)

    def changed_by(self, pushed: set[str]) -> list[str]:
        """Store entries an update of ``pushed`` sources recomputes (every entry derived from one)."""
        return self._updater.changed_by(pushed)

    def update(self, inputs: Mapping[str, np.ndarray], expected_version: int | None = None, reject_nonfinite: bool = False, version: int | None = None) -> int:
        """Apply an update through the update graph, all-or-nothing. Returns the new version.

        ``version``: a publisher-chosen number (must exceed the current one), so that a
        fleet labels the same weights alike; default current + 1.  Returns once the new
        version's session is built, ready to serve.
        """
        self._alive()
        return self._ready(self._updater.update(inputs, expected_version, reject_nonfinite, version))

    def update_direct(
        self,
        specs: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
        fill: Callable[[dict[str, np.ndarray]], None],
        expected_version: int | None = None,
        reject_nonfinite: bool = False,
        version: int | None = None,
    ) -> int | None:
        """``update`` for values a reader writes itself: ``fill`` gets one writable view per
        name, inside the store's staging blob, and fills it (``pread`` from a checkpoint, say),
        so the bytes are copied once.  ``specs``: each name's (dtype, shape).  Returns None,
        having changed nothing, where this does not apply (a derived or retyped weight, no
        staging blob ready): then read the values and call ``update``.
        """
        self._alive()
        number = self._updater.update_direct(specs, fill, expected_version, reject_nonfinite, version)
        return None if number is None else self._ready(number)

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
        graph as ``update``; only where the result goes differs.  The staged version's
        session is built now, so that activating it swaps a pointer.
        """
        self._alive()
        st = self._updater.stage(inputs, version, reject_nonfinite, ttl, op, origin)
        try:
            self._sessions.prebuild(st)
        except BaseException:
            self._store.abort(st.number)
            raise
        return st

    def activate(self, number: int, expected_version: int | None = None) -> Version:
        """Publish staged version ``number`` (see ``WeightStore.activate``) and serve it here at once."""
        self._alive()
        v = self._store.activate(number, expected_version, collect=False)
        old = self._sessions.current
        self._ready(v.number)  # the session prebuilt at stage: a pointer swap
        # Freeing the old version (its blob's pages, its session) does not delay the switch.
        t = threading.Thread(target=self._collect, args=(old,), name="weightbundle-collect", daemon=True)
        self._collect_threads = [x for x in self._collect_threads if x.is_alive()] + [t]
        t.start()
        return v

    def _collect(self, old: Any) -> None:
        del old
        try:
            self._store.collect()
            if self.options.history_on_disk:
                self._store.evict_history()
        except Exception:  # noqa: BLE001 - the next publish collects again
            pass

    def staged_versions(self) -> list[StagedVersion]:
        """The store's staged versions; a session built for one that expired meanwhile is dropped."""
        staged = self._store.staged_versions()
        self._sessions.drop_expired_prebuilt({st.number for st in staged})
        return staged

    def abort(self, number: int) -> StagedVersion:
        """Drop staged version ``number`` and the session built for it."""
        self._alive()
        st = self._store.abort(number)
        self._sessions.drop_prebuilt(number)
        return st


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
