"""Inference sessions per weight version: built when a version becomes the head, pre-packed, swapped in.

A ``SessionCache`` serves one bundle's inference graph from whatever version is the
store's head.  How a version's session is built follows ``RuntimeOptions``: zero-copy
(placeholders memory-map the store's blobs), pre-packed (ORT's packed copy, shared
between instances through ``packing``), or hybrid (a zero-copy session at once, or a
private pre-packed one with ``deterministic``; the shared pre-packed one is built or
loaded by ``_Builder`` on a background thread and swapped in).  A running
inference keeps the session it started with, so it is never torn.

With ``compile_once`` the graph is optimized only for the first version (``compiled``);
every session after that loads the optimized graph with no optimizer run.

Under a stream of updates no version lives long enough to be packed, and zero-copy
GEMMs are ~2x slower.  But a *partial* update changes a few weights, and a stream of them
the same few.  So after one, the builder first *pins* a session: it packs the variables
the recent versions left alone and takes the ones they changed ("hot") as graph inputs.
Every later version that differs from the pinned one only in hot variables is served by
that same session, its hot weights fed on each run straight from the store's mapping: no
build at all.  Once a version settles, its fully packed session replaces the pin.

A pin is loaded over the store's shared packed copy of the version last packed
(``packing``) where there is one: the packed pages are those every instance maps already,
so a pin costs no private copy.  And when a stream settles, a *standby* pin with the same
hot variables is loaded over the new packed copy, so the next stream that changes the same
weights is pinned from its first version: no zero-copy session, no build.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple

import numpy as np
import onnx
import onnxruntime as ort

from . import compiled, packing
from .compiled import LEVELS
from .device import DeviceWeights
from .convert import is_placeholder, point_at
from .errors import BundleError, FormatError, NotInitializedError, UpdateError
from .format import VariableSpec
from .memory import release_free_memory
from .store import LOCK_FILE, StagedVersion, Version, WeightStore

if TYPE_CHECKING:  # runtime.py imports this module
    from .runtime import RuntimeOptions, TensorSpec


STREAM_GAP_S = 1.0  # versions closer than this form a stream (settling waits for twice the gap)
HOT_WINDOW_S = 2.0  # the hot variables: those changed by the versions seen in this window (at least the last two)
PIN_MAX_HOT = 0.5  # pin only when the hot variables are at most this share of the bytes inference reads


class Served(NamedTuple):
    """What serves a version: its session, and the weights fed on each run (a pinned session's; else none)."""

    version: int
    session: ort.InferenceSession
    feeds: Mapping[str, np.ndarray]


@dataclass
class _Pin:
    """A session holding version ``base``'s weights packed, except variables ``fed``, which it takes as inputs."""

    session: ort.InferenceSession
    base: Mapping[str, tuple[str, int]]  # the store entries (blob, offset) of the variables it holds
    fed: frozenset[str]
    compiled: compiled.CompiledGraph | None  # the once-optimized graph it was built from: fed inputs are re-laid for it
    shared: bool = False  # over the store's shared packed copy (else it packed a private one)
    used: bool = False  # it served a version (a standby pin that never did is not renewed)


def session_options(options: RuntimeOptions, prepack: bool, level: str, housekeeping: bool = False) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.log_severity_level = 3
    if housekeeping:
        # Init/update graphs only cast and copy (memory-bound): one thread, and no
        # spinning pool left behind to steal the cores inference needs.
        so.intra_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # No arena: an update's outputs (the plain path) would stay in the cached update
        # session's arena, one model size per instance that applied an update (measured).
        so.enable_cpu_mem_arena = False
    elif options.intra_op_threads:
        so.intra_op_num_threads = options.intra_op_threads
    so.add_session_config_entry("session.disable_prepacking", "0" if prepack else "1")
    return so


class SessionCache:
    """The session serving the current version, the staged version's prebuilt one, and the
    background builder of pre-packed sessions.  ``Bundle`` owns one and delegates to it."""

    def __init__(
        self,
        options: RuntimeOptions,
        store: WeightStore,
        graph: onnx.ModelProto,
        source_graph: Callable[[], onnx.ModelProto | None],
        specs: Mapping[str, VariableSpec],
        inputs: list[TensorSpec],
        has_init: bool,
        log: Callable[..., None],  # log(message, level='warn'|'info')
        retire: Callable[[Any], None] | None = None,
        declared: frozenset[str] = frozenset(),
    ):
        self.options = options
        self._store = store
        self._compiled_graph = graph
        self._infer_graph = graph  # or the bundle's unoptimised source graph, see _new_session
        self._source_graph = source_graph  # parsed only when the compiled graph does not load
        self._specs = specs
        self.inputs = inputs
        self.has_init = has_init
        self._log = log
        self._retire = retire  # frees a replaced session off the update's path (Updater.retire)
        self._lock = threading.Lock()
        self.current: Served | None = None
        self.prebuilt: Served | None = None  # staged version's session (see prebuild)
        self._read = [t.name for t in graph.graph.initializer if is_placeholder(t)]  # the variables inference reads
        self._compiled: compiled.CompiledGraph | None = None
        self._compile_tried = False
        self._compile_lock = threading.Lock()
        self._pin: _Pin | None = None
        self._packed_base: Version | None = None  # the version whose shared packed copy this instance loaded last
        self._said_private = False
        self._declared = declared  # pin_weights: what a standby pin feeds when no stream taught otherwise
        self._seen: Version | None = None  # the last version this cache served, for ``_recent``
        self._recent: deque[tuple[float, frozenset[str]]] = deque(maxlen=64)  # (when, variables changed) per new version
        self._device: DeviceWeights | None = None  # device-resident weights (``device``), built on first use
        self.pending: int | None = None  # the version this process published and is making ready (Bundle._ready)
        pins = options.prepack and options.hybrid and not options.deterministic and options.pin_hot_weights
        self.builder = _Builder(
            self._swap_in,
            lambda v, e: self._log(f"building version {v.number}'s pre-packed session failed (its zero-copy session keeps serving it): {e!r}"),
            self._build_pin if pins and tuple(options.providers) == ("CPUExecutionProvider",) else None,
        )

    def close(self) -> None:
        """Stop the builder and drop every session (``Bundle.unload``)."""
        self.builder.stop()
        self.current = None
        self.prebuilt = None
        self._pin = None
        if self._device is not None:
            self._device.close()
            self._device = None  # the session and its device memory go now, not with the bundle

    def _infer_proto_for(self, v: Version) -> onnx.ModelProto:
        """The inference graph with placeholders pointing at version ``v``'s blobs."""
        m = onnx.ModelProto()
        m.CopyFrom(self._infer_graph)
        for t in m.graph.initializer:
            if not is_placeholder(t):
                continue
            blob, off = v.entries[t.name]
            point_at(t, blob, off, self._specs[t.name].nbytes)
        return m

    def _weights(self, v: Version) -> dict[str, np.ndarray]:
        """Version ``v``'s variables as read-only mappings of its blobs (no copy)."""
        try:
            return self._store.arrays(v, self._read)
        except FileNotFoundError:
            raise _Superseded(v.number) from None  # newer updates collected its blobs meanwhile

    def _compiled_for(self, v: Version, level: str) -> compiled.CompiledGraph | None:
        """The graph optimized once at ``level``, learned from version ``v`` on first use; None
        where compiling once is off or does not apply (then each version is optimized)."""
        opts = self.options
        if level != opts.optimization or level == "none" or not opts.compile_once or tuple(opts.providers) != ("CPUExecutionProvider",):
            return None
        with self._compile_lock:  # the background builder may ask too: learn once
            if not self._compile_tried:
                t0 = time.perf_counter()
                try:
                    scratch: tuple[str | None, str] = (self._store.packed_path, packing.scratch_prefix())  # disk-backed, swept with the store
                    try:
                        os.makedirs(self._store.packed_path, exist_ok=True)
                    except OSError:
                        scratch = (None, scratch[1])  # the temp dir then
                    self._compiled = compiled.learn(self._infer_graph, self._weights(v), level, scratch=scratch)
                    relaid = sum(not lay.identity for lay in self._compiled.layouts.values())
                    self._log(f"inference graph optimized once in {time.perf_counter() - t0:.2f} s; {relaid} weight(s) re-laid per version", "info")
                except _Superseded:
                    raise  # learn from the newest version instead
                except compiled.NotCompilable as e:
                    self._log(f"optimizing each weight version, not once: {e}")
                except Exception as e:  # noqa: BLE001 - e.g. no room for the scratch files: serving goes on, optimizing per version
                    self._log(f"optimizing each weight version, not once: learning the layouts failed: {e!r}")
                self._compile_tried = True
                release_free_memory()  # the probes' buffers
        return self._compiled

    def _collected(self, v: Version) -> bool:
        """True when newer updates collected some of version ``v``'s blobs meanwhile."""
        return not all(os.path.exists(os.path.join(self._store.path, b)) for b in v.blobs)

    def _new_session(self, v: Version, prepack: bool, level: str) -> ort.InferenceSession:
        cg = self._compiled_for(v, level)
        so = session_options(self.options, prepack, "none" if cg is not None else level)
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", self._store.path)
        try:
            if cg is not None:
                return cg.session(self._weights(v), so, self.options.providers, files=v.entries, anchor=LOCK_FILE)
            return ort.InferenceSession(self._infer_proto_for(v).SerializeToString(), so, providers=list(self.options.providers))
        except _Superseded:
            raise
        except Exception as e:
            if self._collected(v):
                raise _Superseded(v.number) from None
            if cg is not None:  # should not happen; serve correctly anyway, optimizing per version
                self._log(f"the once-optimized graph failed to load, optimizing each version from now on: {e}")
                self._compiled = None
                return self._new_session(v, prepack, level)
            source = self._source_graph() if self._infer_graph is self._compiled_graph else None
            if source is not None:
                # The graph compiled at build time may not load here (another ONNX Runtime
                # version or provider): fall back, once, to the unoptimised graph the bundle keeps.
                self._infer_graph = source
                return self._new_session(v, prepack, level)
            raise FormatError(f"ONNX Runtime cannot build the inference session: {e}") from None

    def infer_session(self) -> Served:
        """What serves the current weights; builds the session on a new version."""
        cur = self.current
        head = self._store.head()
        if head is None:
            raise NotInitializedError(
                "weights are not initialised yet: run the init graph, or apply a full update first"
                + ("" if self.has_init else " (this bundle has no init graph)")
            )
        if cur is not None and cur[0] == head:
            return cur
        if cur is not None and self.options.device_resident and head == self.pending and self._lock.locked():
            # This process's update is copying the new version in (milliseconds per 64 MiB):
            # serve the current weights meanwhile instead of queueing behind the copy (p99
            # under updates).  Only for a version no one has acknowledged yet: ``update``
            # returns once it serves, and another process's version is waited for as usual.
            return cur
        with self._lock:
            for _ in range(100):
                try:
                    new = self._session_for_current()
                    break
                except _Superseded:
                    continue  # a burst of updates outran the build: take the newest version
            else:
                raise BundleError("weights change faster than an inference session can be built")
        if cur is not None and cur is not new and self._retire is not None:
            # Ours may be the last reference to the replaced session, and freeing it (unmapping
            # a 64 MiB packed copy) took ~7 ms: measured, on the update's path.
            self._retire(cur)
            del cur
        return new

    def _session_for_current(self) -> Served:
        """Caller holds ``self._lock``."""
        v = self._store.current()
        assert v is not None
        if self.prebuilt is not None and self.prebuilt[0] <= v.number:
            built, self.prebuilt = self.prebuilt, None
            if built[0] == v.number and (self.current is None or self.current[0] != v.number):
                self.current = built  # activated a version staged by this instance: its session is ready
        if self.current is None or self.current[0] != v.number:
            opts = self.options
            if opts.device_resident:  # one session, the new version's changed weights copied in
                self.current = Served(v.number, self._device_view(v), {})
                return self.current
            if opts.prepack and opts.hybrid and opts.deterministic and not self._shares_packed():
                # The private pre-packed session is the final one: nothing to swap in later.
                self.current = Served(v.number, self._new_session(v, prepack=True, level=opts.optimization), {})
            elif opts.prepack and opts.hybrid:
                # Serve the new version now; the pre-packed session replaces this one in the
                # background.  deterministic: a private pre-packed session, which ORT packs as
                # it packs the shared copy, so both give the same bytes.  Otherwise the pinned
                # session when it holds this version's weights, else zero-copy: cheaper to
                # build, but GEMMs on unpacked weights sum in another order (last bits differ).
                pinned = self._pinned_for(v)
                if pinned is None:
                    pinned = Served(v.number, self._new_session(v, prepack=opts.deterministic, level=opts.optimization), {})
                self.current = pinned
            elif opts.prepack:
                self.current = Served(v.number, self._packed_session(v), {})
            else:
                self.current = Served(v.number, self._new_session(v, False, opts.optimization), {})
            self._note_new_version(v)
            if opts.prepack and opts.hybrid and not (opts.deterministic and not self._shares_packed()):
                self.builder.request(v)
        return self.current

    def _device_view(self, v: Version) -> Any:
        """Caller holds ``self._lock``: version ``v`` served from device-resident weights (``device``)."""
        if self._device is None:
            # The unoptimised graph where the bundle keeps one: the compiled one was optimized
            # for the CPU at build time, and its CPU-only fused nodes would pull weights back
            # to the host on every run.  The device's provider optimizes it once, here.
            graph = self._source_graph() or self._infer_graph
            names = [t.name for t in graph.graph.initializer if is_placeholder(t)]
            opts = self.options
            so = session_options(opts, prepack=False, level=opts.optimization)
            try:
                self._device = DeviceWeights(graph, names, so, opts.session_providers(), opts.ort_device, opts.device_id)
            except Exception as e:
                raise FormatError(f"ONNX Runtime cannot build the device-resident inference session ({opts.ort_device}): {e}") from None
            self._log(f"inference runs on {opts.ort_device}:{opts.device_id} with device-resident weights: an update copies what it changed", "info")
        return self._device.view(v.number, v.entries, lambda names: self._weights_of(v, frozenset(names)))

    # -- pinned sessions (see the module doc) -------------------------------------------
    def _note_new_version(self, v: Version) -> None:
        """Caller holds ``self._lock``: remember which variables version ``v`` changed."""
        if self._seen is not None:
            old, new = self._seen.entries, v.entries
            self._recent.append((time.monotonic(), frozenset(n for n in self._read if old.get(n) != new.get(n))))
        self._seen = v

    def _hot(self) -> frozenset[str]:
        """The variables the recent versions changed."""
        now, out = time.monotonic(), frozenset[str]()
        for i, (t, names) in enumerate(reversed(list(self._recent))):  # list(): one step, while the lock holder appends
            if i >= 2 and now - t > HOT_WINDOW_S:
                break
            out |= names
        return out

    @staticmethod
    def _covers(pin: _Pin | None, v: Version) -> bool:
        """Does ``pin`` hold version ``v``'s weights (all but the fed ones)?"""
        return pin is not None and all(v.entries.get(n) == e for n, e in pin.base.items())

    def _pinned_for(self, v: Version, pin: _Pin | None = None) -> Served | None:
        """The pinned session serving version ``v``, if it holds ``v``'s weights."""
        pin = pin or self._pin
        if pin is None or not self._covers(pin, v):
            return None
        weights = self._weights_of(v, pin.fed)
        pin.used = True
        return Served(v.number, pin.session, pin.compiled.fed_inputs(weights, pin.fed) if pin.compiled is not None else weights)

    def _weights_of(self, v: Version, names: frozenset[str]) -> dict[str, np.ndarray]:
        try:
            return self._store.arrays(v, sorted(names))
        except FileNotFoundError:
            raise _Superseded(v.number) from None

    def _pays(self, fed: frozenset[str]) -> bool:
        """Would a pin feeding ``fed`` pay?  Not when they are most of what inference reads."""
        return sum(self._specs[n].nbytes for n in fed) <= PIN_MAX_HOT * sum(self._specs[n].nbytes for n in self._read)

    def _build_pin(self, requested: Version) -> bool:
        """Builder thread: pin a session for the newest version, unless the pin serves it
        already or pinning would not pay.  Returns True when it built one."""
        hot = self._hot()
        if not hot or not self._pays(hot):
            return False  # nothing, or most of the model, changes: packing would not pay
        v = self._store.current()
        if v is None or v.number < requested.number:
            return False
        pin = self._pin
        covers = self._covers(pin, v)
        if pin is not None and covers and hot <= pin.fed:
            self._adopt(pin)  # e.g. a standby pin, loaded while an update was on its way
            if self.builder.min_settle != STREAM_GAP_S:  # once per stream
                self._log(f"partial updates of {len(pin.fed)} variable(s): version {v.number} is served by the standby pinned session", "info")
                self.builder.min_settle = STREAM_GAP_S  # it serves this stream: pack whole once it pauses
            return False
        fed = hot | (pin.fed if pin is not None and covers else frozenset())
        t0 = time.perf_counter()
        pin = self._pin_from_packed(v, fed)
        if pin is None:
            try:
                session, cg = self._pinned_session(v, fed)
            except Exception as e:
                if self._collected(v):
                    raise _Superseded(v.number) from None
                # Not expected (ORT kernels take weights as inputs); serve correctly anyway, unpinned.
                self._log(f"pinned sessions are off for this model: building one failed ({e!r}); partial updates are served zero-copy until packed")
                self.builder.disable_pins()
                return False
            pin = _Pin(session, {n: v.entries[n] for n in self._read if n not in fed}, fed, cg)
        with self._lock:
            self._pin = pin
            # The pin serves the stream at near packed speed: pack whole only once it pauses.
            # Settling on the gap alone started full builds mid-stream (3 packs, then a new pin).
            self.builder.min_settle = STREAM_GAP_S
        served = self._adopt(pin)
        if served is not None:
            how = "over the shared packed copy" if pin.shared else "with a private packed copy"
            took = time.perf_counter() - t0
            self._log(f"partial updates of {len(pin.fed)} variable(s): version {served} is served by a session pinned {how} in {took:.2f} s", "info")
        return True

    def _adopt(self, pin: _Pin) -> int | None:
        """Serve the current version from ``pin`` if it holds that version's weights; returns
        the version number when it switched."""
        with self._lock:
            cur = self.current
            if cur is None or cur.session is pin.session:
                return None
            try:
                served = self._pinned_for(self._store.version(cur.version), pin) if self._store.head() == cur.version else None
            except (_Superseded, FileNotFoundError):
                served = None
            if served is None:
                return None  # a newer version is being served: the next inference takes the pin if it can
            self.current = served
        if self._retire is not None:
            self._retire(cur)
        del cur
        return served.version

    def _pin_from_packed(self, v: Version, fed: frozenset[str]) -> _Pin | None:
        """A pin for version ``v`` over the newest shared packed copy (``_shared_base``): it
        feeds ``fed`` and whatever else ``v`` changed since that copy, and maps the rest, so
        it holds no private packed weights.  None where there is no such copy (not shared,
        or not compiled once: the saved graph's names are the compiled graph's), where it
        has been collected meanwhile, or where ``v`` changed too much since."""
        base, cg = self._shared_base(v), self._compiled
        if base is None or cg is None or not self._shares_packed():
            return None
        fed = fed | frozenset(n for n in self._read if v.entries.get(n) != base.entries.get(n))
        if not self._pays(fed):
            return None
        names = cg.fed_names(fed)
        path = packing.model_path(self._store.packed_path, base.number)
        try:
            model = onnx.load(path, load_external_data=False)
            compiled.as_inputs(model, names)
            if len(model.graph.input) != len(self.inputs) + len(names):
                raise BundleError("its graph does not hold the weights to feed")
            so = session_options(self.options, prepack=True, level="none")
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", self._store.packed_path)
            session = ort.InferenceSession(model.SerializeToString(), so, providers=list(self.options.providers))
        except Exception as e:  # noqa: BLE001 - a private pin still serves
            if os.path.exists(path) and not self._said_private:  # not just collected by a newer pack: say so, once
                self._said_private = True
                self._log(f"pinned sessions pack a private copy: loading one over the shared packed copy failed: {e!r}")
            return None
        release_free_memory()  # ORT packed the file's raw weights once more, to check them, and let go of that copy
        return _Pin(session, {n: base.entries[n] for n in self._read if n not in fed}, fed, cg, shared=True)

    def _shared_base(self, v: Version) -> Version | None:
        """The version a pin for ``v`` loads the packed copy of: the newest packed so far, by
        this instance or another, whose manifest the store still keeps.  Not just the one
        this instance loaded last: a stream that starts right after a full update, before
        this instance swapped in that version's packed copy, would feed every weight against
        the older one, so its pin packed privately (+0.8 weight copies, measured)."""
        own = self._packed_base
        try:
            newer = sorted((n for n in packing.numbers(os.listdir(self._store.packed_path)) if n <= v.number), reverse=True)
        except OSError:
            return own
        for n in newer:
            if own is not None and n <= own.number:
                break
            try:
                return self._store.version(n)
            except (OSError, ValueError):  # collected meanwhile
                continue
        return own

    def _pinned_session(self, v: Version, fed: frozenset[str]) -> tuple[ort.InferenceSession, compiled.CompiledGraph | None]:
        """A pre-packed session for version ``v`` that takes variables ``fed`` as inputs."""
        level = self.options.optimization
        cg = self._compiled_for(v, level)
        so = session_options(self.options, prepack=True, level="none" if cg is not None else level)
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", self._store.path)
        if cg is not None:
            return cg.session(self._weights(v), so, self.options.providers, files=v.entries, anchor=LOCK_FILE, fed=fed), cg
        m = self._infer_proto_for(v)
        compiled.as_inputs(m, sorted(fed))
        return ort.InferenceSession(m.SerializeToString(), so, providers=list(self.options.providers)), None

    def _packed_session(self, v: Version) -> ort.InferenceSession:
        """Version ``v``'s pre-packed session: from the store's shared packed copy (built here
        if no instance has yet), or a private one where sharing is off or unsupported."""
        opts = self.options
        if self._shares_packed():
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
                self._packed_base = v
                if v.op == "init":
                    # ORT packs once more at load to check the file, then frees that copy.  Not
                    # trimmed after updates: the next update would fault the heap in again
                    # (the updater's idle timer trims once updates stop).
                    release_free_memory()
                return sess
            except _Superseded:
                raise
            except Exception as e:  # noqa: BLE001 - e.g. an ORT without saved pre-packing: a private copy still serves
                head = self._store.head()
                if head is not None and head > v.number:
                    # Another instance packed a newer version and collected this one's files
                    # while we loaded them (seen under a stream, 4 instances): nothing to serve.
                    # (A staged version is ahead of head: it still needs a session.)
                    raise _Superseded(v.number) from None
                self._log(f"shared pre-packed weights unavailable for version {v.number}, using a private copy: {e}")
        return self._new_session(v, prepack=True, level=opts.optimization)

    def _shares_packed(self) -> bool:
        return self.options.share_packed and tuple(self.options.providers) == ("CPUExecutionProvider",)

    def _load_packed(self, model_path: str) -> ort.InferenceSession:
        so = session_options(self.options, prepack=True, level="none")
        return ort.InferenceSession(model_path, so, providers=list(self.options.providers))

    def _write_packed(self, v: Version, model_path: str, data_name: str, probe: dict[str, np.ndarray] | None) -> list[Any]:
        """Optimize and pre-pack version ``v`` once into ``model_path`` (+ data file); returns
        the builder session's outputs on ``probe`` for ``_verify_packed``."""
        cg = self._compiled_for(v, self.options.optimization)
        so = session_options(self.options, prepack=True, level="none" if cg is not None else self.options.optimization)
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", self._store.path)
        so.optimized_model_filepath = model_path
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_name)
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        so.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        try:
            if cg is not None:  # pack the once-optimized graph: no optimizer run for this version
                builder = cg.session(self._weights(v), so, ["CPUExecutionProvider"], files=v.entries)
            else:
                builder = ort.InferenceSession(self._infer_proto_for(v).SerializeToString(), so, providers=["CPUExecutionProvider"])
        except _Superseded:
            raise
        except Exception:
            if self._collected(v):
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
        if self._store.head() != v.number:
            return  # superseded while the build settled: this instance requests the newer one when it serves it
        sess = self._packed_session(v)
        with self._lock:
            if self.current is None or self.current[0] != v.number:
                return
            first, self.current = self.current, Served(v.number, sess, {})
            ended, self._pin = self._pin, None  # the stream has settled: the pin goes once no inference holds it
            self.builder.min_settle = 0.0
        del first
        if self._packed_base is v:
            self._store.collect_packed()  # older packed copies: no pin loads over them any more
        if self.options.deterministic:  # a private pre-packed first session: its packed copy goes back to the OS
            release_free_memory()
        # Streams tend to change the same weights again (a trainer pushing its head layers):
        # a standby pin over this version's packed copy serves the next one from its first
        # update.  It maps the pages the packed session maps: no extra copy.  Its weights:
        # those of the stream that just settled, else those ``pin_weights`` names.
        fed = ended.fed if ended is not None and ended.used else self._declared
        if fed and self.builder.pinning:
            standby = self._pin_from_packed(v, fed)
            with self._lock:
                if standby is None or self._pin is not None:
                    return
                self._pin = standby
            self._log(f"a standby pinned session for {len(fed)} variable(s) waits over version {v.number}'s packed copy", "info")

    @property
    def fully_optimised(self) -> bool:
        """True when the current version is served by its final (pre-packed) session."""
        return self.options.device_resident or not (self.options.prepack and self.options.hybrid) or self.builder.idle()

    def prebuild(self, st: StagedVersion) -> None:
        """Build the staged version's final inference session now, in the stage phase, so
        that activating it swaps a pointer instead of building a session.  (Device-resident
        weights build nothing per version: activation copies what the version changed.)"""
        if self.options.device_resident:
            return
        entries = dict(self._store.version(st.base).entries) if st.base is not None else {}
        entries.update(st.entries)
        v = Version(st.number, st.op, entries, st.time, st.base)
        # The pre-packed copy goes to the store's shared packed files (keyed by number), so the
        # other instances load it after activation instead of packing again.  It maps the
        # staged blob, and the rename at activation keeps that mapping valid.
        try:
            sess = self._packed_session(v) if self.options.prepack else self._new_session(v, False, self.options.optimization)
        except _Superseded:
            # Its base version's blobs were collected meanwhile: a newer version was published,
            # and activating this one would conflict anyway.
            raise UpdateError(f"version {st.base} changed to a newer one while version {st.number} was staged over it; stage it again") from None
        with self._lock:
            self.prebuilt = Served(st.number, sess, {})

    def drop_prebuilt(self, number: int) -> None:
        """Forget the session built for staged version ``number`` (aborted)."""
        with self._lock:
            if self.prebuilt is not None and self.prebuilt[0] == number:
                self.prebuilt = None

    def drop_expired_prebuilt(self, staged: set[int]) -> None:
        """Forget the prebuilt session when its version is neither staged (``staged``) nor activated."""
        with self._lock:
            if self.prebuilt is not None and self.prebuilt[0] not in staged:
                head = self._store.head()
                if head is None or self.prebuilt[0] > head:  # not activated either: it expired
                    self.prebuilt = None


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


class _Superseded(Exception):
    """A version's blobs were garbage-collected while its session was being built."""


class _Builder:
    """One daemon thread that builds the newest requested session; stale requests are skipped.

    ORT releases the GIL while it builds, so inference goes on meanwhile.  Before a build
    it waits for the version to settle: at least as long as the last build took, and twice
    the last gap between versions.  Under a stream of updates a build would be obsolete
    before it paid off, and on a small machine it would steal the cores that inference
    needs; the zero-copy session serves meanwhile, or, with ``pin``, a pinned session:
    ``pin(v)`` builds one, before any settling, when the current session cannot serve
    ``v`` and a pin would pay; it returns True if it did.
    """

    def __init__(self, build: Any, on_error: Any = None, pin: Callable[[Version], bool] | None = None):
        self._build = build
        self._pin = pin
        self._on_error = on_error or (lambda v, e: None)
        self._cv = threading.Condition()
        self._want: Version | None = None
        self._busy = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._build_s = 0.05  # duration of the last build
        self.min_settle = 0.0  # settle at least this long (set while a pinned session serves)
        self._gap_s = float("inf")  # time between the last two requests (versions)
        self._last_request = float("-inf")

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
                assert v is not None
            if self._pin is not None and self._pinned(v):  # first, without settling: it serves sooner
                with self._cv:
                    if self._want is None:
                        self._want = v  # the final session still follows, once the stream settles
                    self._busy = False
                continue
            with self._cv:
                # Settle: a newer request during the wait replaces this one.
                settle = min(max(self._build_s, self.min_settle, 2 * self._gap_s if self._gap_s < STREAM_GAP_S else 0.0), 2.0)
                if self._cv.wait_for(lambda: self._want is not None or self._stop, timeout=settle):
                    self._busy = False
                    continue
            t0 = time.perf_counter()
            try:
                self._build(v)
            except _Superseded:
                pass  # a newer version is on its way: its own request follows
            except Exception as e:  # noqa: BLE001 - the zero-copy session keeps serving this version correctly
                self._on_error(v, e)
            finally:
                with self._cv:
                    self._build_s = min(max(time.perf_counter() - t0, 0.01), 2.0)
                    self._busy = False
                    self._cv.notify_all()

    def disable_pins(self) -> None:
        self._pin = None

    @property
    def pinning(self) -> bool:
        return self._pin is not None

    def _pinned(self, v: Version) -> bool:
        assert self._pin is not None
        try:
            return self._pin(v)
        except _Superseded:
            return False
        except Exception as e:  # noqa: BLE001 - serving goes on from the zero-copy session
            self._on_error(v, e)
            return False

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
            t = self._thread
        if t is not None:
            t.join(timeout=60)
