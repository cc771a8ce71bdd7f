"""Weight updates: check what a client sends, run the update graph, publish or stage the result.

The ``Updater`` turns an update (source name -> array) into a new store version, all or
nothing: it validates names, dtypes and shapes (``check_update``), fills derived entries'
kept sources from the current version, runs the update graph (retyped per client dtype and
specialized for the tensors sent, ``_update_session``) and writes its outputs either straight into the pre-allocated
staging blob (``_run_update_into``) or through the plain path (``_run_update``).  A
background thread prepares the next staging blob after each publish.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import onnx
import onnxruntime as ort

from . import format as fmt
from .convert import UPDATED_SUFFIX, VALID_OUTPUT, retype_update_graph
from .errors import UpdateError
from .format import VariableSpec
from .memory import madvise, release_free_memory
from .sessions import STREAM_GAP_S, session_options
from .specialize import specialize
from .store import STAGING, StagedVersion, WeightStore

if TYPE_CHECKING:
    from .runtime import RuntimeOptions

AFTER_PUBLISH_WAIT_S = 0.1  # see Updater.after_publish; longer for slow models (answer_wait)
ANSWER_WAIT_MAX_S = 2.0
READY_WAIT_S = 10.0  # the longest after_publish waits for the new version's session
UPDATE_SESSIONS_KEPT = 8  # specialized update graphs cached (each a few MiB at most: no weights)
STAGING_MIN_BYTES = 1 << 20  # below this, the plain write path is as fast and holds no staging blob
STAGING_PREDICT = 4  # the staging blob has room for what the last this-many updates wrote (see after_publish)


class Updater:
    """Applies and stages updates of one bundle's weights; ``Bundle`` owns one and delegates."""

    def __init__(
        self,
        options: RuntimeOptions,
        store: WeightStore,
        graph: onnx.ModelProto,
        variables: list[VariableSpec],
        sources: list[VariableSpec],
        aliases: dict[str, str],
        deps: dict[str, list[str]],
    ):
        self.options = options
        self._store = store
        self._graph = graph  # the update graph
        self.variables = variables
        self._specs = {v.name: v for v in variables}
        self.sources = sources
        self._source_specs = {s.name: s for s in sources}
        self.aliases = aliases  # tied update input -> the source it sets
        self._deps = deps  # store entry -> the sources it is computed from
        self.staging_thread: threading.Thread | None = None  # the latest after_publish thread
        self._threads: list[threading.Thread] = []  # every one still running (close waits for them)
        self._threads_lock = threading.Lock()
        self._staging_map: tuple[int, np.ndarray] | None = None  # (inode, populated mapping) of staging.bin
        self._written: deque[frozenset[str]] = deque(maxlen=STAGING_PREDICT)  # entries the last updates wrote
        self._update_sessions: dict[tuple, ort.InferenceSession] = {}  # (dtypes, names sent) -> session, LRU
        self.answered = threading.Event()  # set by each inference; after_publish waits for one
        self.last_infer_s = 0.0  # how long the last inference took (Bundle.infer sets it)
        self.served = threading.Event()  # set once the new version's session is built (Bundle._ready)
        self._idle_drop = _Rearmable(self._drop_idle_staging)  # drops the staging blob after staging_idle_seconds
        self._evict_later = _Rearmable(self._evict_history)  # moves the history to disk once a stream of updates pauses
        self._last_publish = float("-inf")  # monotonic time of this updater's last publish

    def close(self) -> None:
        """Let the background threads finish (they write into the store) and drop the update sessions."""
        self.settle(flush=False)
        self._update_sessions.clear()

    def settle(self, timeout: float = 30.0, flush: bool = True) -> None:
        """Wait for the work ``after_publish`` left running (collection, the next staging blob),
        then cancel the staging blob's idle timer (those threads arm it).  A move of the
        history to disk that waits for a stream of updates to pause is done now (``flush``)
        or dropped."""
        with self._threads_lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout)
        self._idle_drop.arm(None)
        if self._evict_later.arm(None) and flush:
            self._evict_history()

    def check_update(self, inputs: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Validate an update before touching anything: names, castable dtypes, shapes.

        Returns the full feed (absent inputs become empty = keep) and the dtypes that
        need a retyped update graph.
        """
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

    def changed_by(self, pushed: set[str]) -> list[str]:
        """Store entries an update of ``pushed`` sources recomputes (every entry derived from one)."""
        return changed_by(self.variables, self._deps, pushed)

    def update(self, inputs: Mapping[str, np.ndarray], expected_version: int | None = None, reject_nonfinite: bool = False, version: int | None = None) -> int:
        """Apply an update through the update graph, all-or-nothing. Returns the new version.

        ``version``: a publisher-chosen number (must exceed the current one), so that a
        fleet labels the same weights alike; default current + 1.
        """
        return self._through_update_graph(
            inputs, expected_version, reject_nonfinite, lambda feed, retype, changed, ev: self._apply(feed, retype, changed, ev, reject_nonfinite, version)
        )

    def update_direct(
        self,
        specs: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
        fill: Callable[[dict[str, np.ndarray]], None],
        expected_version: int | None = None,
        reject_nonfinite: bool = False,
        version: int | None = None,
    ) -> int | None:
        """Apply an update whose values ``fill`` writes straight into the staging blob: it gets
        one writable view per name (e.g. to ``pread`` a checkpoint into), and no update graph
        runs, so the values are copied once, with no buffer in between.  All-or-nothing, like
        ``update``.  ``specs`` gives each name's (dtype, shape) as sent.

        Applies only where the update graph would just copy: every name is a plain variable
        (its own only source; no alias; nothing derived from it) sent with its exact dtype and
        shape, and a staging blob is ready.  Returns None where it does not apply, having
        touched nothing: then call ``update``.
        """
        if not self.options.staging or not specs:
            return None
        for name, (dtype, shape) in specs.items():
            v = self._specs.get(name)
            if v is None or name not in self._source_specs or name in self.aliases or self._deps[name] != [name]:
                return None
            if np.dtype(dtype) != v.np_dtype or tuple(shape) != tuple(v.shape) or not v.nbytes:
                return None
        if sorted(self.changed_by(set(specs))) != sorted(specs) or sum(self._specs[n].nbytes for n in specs) < STAGING_MIN_BYTES:
            return None  # another entry derives from one of them, or too small to be worth a staging blob
        path = self._store.claim_staging()
        if path is None:
            return None
        try:
            with self._staging_view(path, specs) as mm:
                views = {n: self._variable_view(mm, n) for n in specs}
                fill(views)
                if reject_nonfinite:
                    _check_finite(views)
                del views
        except BaseException:
            self._store.release_staging(path)
            raise
        number = self._store.publish_staged(path, list(specs), op="update", expected_version=expected_version, version=version, collect=False).number
        self.after_publish(collect=True, written=specs)
        return number

    @contextmanager
    def _staging_view(self, path: str, names: Iterable[str]) -> Iterator[np.ndarray]:
        """The claimed staging blob as bytes, with room allocated for ``names``: the mapping
        populated in the background when it is this blob (no page faults on the update's
        path), else a new one."""
        premapped, self._staging_map = self._staging_map, None
        self._store.reserve_staging(path, names)  # holes where it predicted other names: ENOSPC here, not SIGBUS
        self.answered.clear()  # a new version is on its way: what we retire waits for its first answer
        if premapped is not None and premapped[0] == os.stat(path).st_ino:
            mm = premapped[1]
        else:
            mm = np.memmap(path, dtype=np.uint8, mode="r+", shape=(self._store.staging_layout()[1],))
        try:
            yield mm
        finally:
            self.retire((premapped, mm))  # unmapping a populated 64 MiB mapping took ~5 ms: not here
            del premapped, mm

    def _variable_view(self, mm: np.ndarray, name: str) -> np.ndarray:
        """Variable ``name``'s place in the staging blob ``mm`` (bytes), typed and shaped."""
        v, off = self._specs[name], self._store.staging_layout()[0][name]
        return mm[off : off + v.nbytes].view(v.np_dtype).reshape(v.shape)

    def _through_update_graph(
        self,
        inputs: Mapping[str, np.ndarray],
        expected_version: int | None,
        reject_nonfinite: bool,
        sink: Callable[[dict[str, np.ndarray], dict[str, str], list[str], int | None], Any],
    ) -> Any:
        """Check an update and work out what it recomputes; ``sink`` runs the update graph and
        stores the result (``_apply`` publishes it, ``stage`` stages it)."""
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
        sess = self._update_session(retype, feed)
        staged = None
        if self.options.staging and sum(self._specs[n].nbytes for n in changed) >= STAGING_MIN_BYTES:
            staged = self._store.claim_staging()
        if staged is not None:
            try:
                self._run_update_into(sess, feed, changed, staged, reject_nonfinite)
            except BaseException:
                self._store.release_staging(staged)
                raise
            version = self._store.publish_staged(staged, changed, op="update", expected_version=expected_version, version=version, collect=False).number
        else:
            values = self._run_update(sess, feed, changed)
            if reject_nonfinite:
                _check_finite(values)
            version = self._store.publish(values, op="update", expected_version=expected_version, version=version, collect=False).number
        self.after_publish(collect=True, written=changed)
        return version

    def after_publish(self, collect: bool = False, stage_next: bool = True, written: Iterable[str] = ()) -> None:
        """Ready the next update on a background thread: drop what the history no longer keeps
        (``collect``: unlinking a model-sized blob costs ~10 ms), then a fresh staging blob, or
        the freed heap back to the OS.  None of it is on the update's path.  (It runs at normal
        priority: at the lowest, a saturated machine starved it, the next update found no
        staging blob and took the slower plain path.)

        ``stage_next=False`` (init): a staging blob of holes only, no page of it allocated.
        A server that is never updated then holds no tmpfs for it, and its first update
        still writes once, straight into it: in-process 103 ms through the plain path (the
        update graph's first session, a copy, a new blob) against 24 ms (measured).

        The staging blob has room (allocated and populated pages) for what the last
        ``STAGING_PREDICT`` updates wrote (``written``), not for the whole model: a stream of
        one-layer updates to the 64 MiB model spent ~70 ms of CPU per update allocating,
        populating and then punching out the other three layers (measured).  An update that
        writes elsewhere faults its pages in as it writes, as the plain path does.

        The work waits for this instance's next answer, at most ``answer_wait()``:
        populating a blob and unlinking one take ~30 ms of a core, and run alongside the new
        version's first inference they slowed it by ~15 ms of 2 cores (measured), which is
        on the update's path as a client sees it."""
        store, staging = self._store, self.options.staging and stage_next
        if self.options.staging and not stage_next:
            self._prepare_holes()
        self.answered.clear()
        self.served.clear()
        if written:
            self._written.append(frozenset(written))
        room = frozenset().union(*self._written) if self._written else None
        now = time.monotonic()
        streaming = collect and now - self._last_publish < STREAM_GAP_S  # collect: an update, not init
        if collect:
            self._last_publish = now

        def run() -> None:
            if collect or staging:
                # The 0.1 s count from when the version can serve: a ResNet-50 session takes
                # longer than that to build, and the work then ran beside its first answer.
                self.served.wait(READY_WAIT_S)
                self.wait_first_answer()
            try:
                if collect:
                    store.collect()
                if staging:
                    store.prepare_staging(room)
                    path = os.path.join(store.path, STAGING)
                    store.reserve_staging(path, room)  # another instance may have prepared it for other names
                    self._staging_map = _populated_map(path, store.staging_ranges(room))
                    if self.options.staging_idle_seconds > 0:
                        self._idle_drop.arm(self.options.staging_idle_seconds)
            except (OSError, ValueError):  # store gone (unload), tmpfs full, or claimed meanwhile: plain path
                pass
            if collect and self.options.history_on_disk:
                # The version just replaced is rollback's only: off tmpfs.  Within a stream of
                # updates each moved copy was deleted by the next update (~10 ms of a core per
                # 16 MiB layer, for nothing): then move it once the stream pauses.
                if self._last_publish > now:
                    pass  # a newer update's thread decides
                elif streaming:
                    self._evict_later.arm(STREAM_GAP_S)
                else:
                    self._evict_later.arm(None)
                    self._evict_history()
            if not collect:
                # After init only.  Trimming after each update handed the freed heap back only
                # for the next update to fault it in again: ResNet-50 in-process, update() 340
                # against 235 ms (measured).  After updates the idle timer trims instead.
                release_free_memory()

        self.staging_thread = self._spawn(run, "weightbundle-after-publish")

    def answer_wait(self) -> float:
        """How long background work waits for the new version's first answer: 0.1 s, or
        twice the last inference where that is longer (at most 2 s).  A transformer answers
        in ~200 ms here; with a fixed 0.1 s the work ran beside its first answer, which took
        345-378 instead of 208-220 ms (measured in-process)."""
        return min(max(AFTER_PUBLISH_WAIT_S, 2 * self.last_infer_s), ANSWER_WAIT_MAX_S)

    def wait_first_answer(self) -> None:
        """Block until this instance answers with the version just published (bounded)."""
        self.answered.wait(self.answer_wait())

    def retire(self, obj: Any) -> None:
        """Free ``obj`` (a replaced inference session) on a thread of its own, after this
        instance's next answer (at most ``answer_wait()``), as ``after_publish`` does
        its work.  The caller hands over its reference."""
        held = [obj]
        del obj

        def run() -> None:
            self.wait_first_answer()
            held.clear()  # the last reference: the session is freed here

        self._spawn(run, "weightbundle-retire")

    def _spawn(self, run: Callable[[], None], name: str) -> threading.Thread:
        """Start ``run`` on a daemon thread that ``settle`` waits for.  Started and listed in
        one step: ``settle`` on another thread (the builder retires sessions too) must
        neither join a thread not yet started nor miss one that runs."""
        t = threading.Thread(target=run, name=name, daemon=True)
        with self._threads_lock:
            t.start()
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        return t

    def _evict_history(self) -> None:
        try:
            self._store.evict_history()
        except (OSError, ValueError):  # store gone (unload)
            pass

    def _drop_idle_staging(self) -> None:
        """No update for ``staging_idle_seconds``: give the staging blob's tmpfs, and the heap
        updates freed, back.  A blob of holes takes its place, as after ``init``."""
        idle = self.options.staging_idle_seconds
        try:
            age = self._store.staging_age()
            if age is None:
                return
            if age < idle:  # another instance's update made a fresh one meanwhile: wait for it
                self._idle_drop.arm(idle - age)
                return
            self._staging_map = None  # our mapping would keep the unlinked pages alive
            if self._store.drop_staging(older_than=idle):
                self._prepare_holes()
        except OSError:  # store gone (unload)
            pass
        release_free_memory()  # quiet now: the heap the last updates freed goes back to the OS too

    def _prepare_holes(self) -> None:
        """A staging blob with no page allocated (no tmpfs held): the next update writes
        straight into it, faulting in only what it writes."""
        try:
            self._store.prepare_staging(())
        except (OSError, ValueError):  # store gone (unload), or tmpfs full: the plain path
            pass

    def stage(self, inputs: Mapping[str, np.ndarray], version: int | None, reject_nonfinite: bool, ttl: float, op: str, origin: dict | None) -> StagedVersion:
        """Like ``update``, but the result is a *staged* version that serves nothing until
        activated.  Same checks, same sources-to-entries logic and the same update graph as
        ``update`` (``_through_update_graph``); only where the result goes differs.
        """

        def sink(feed: dict[str, np.ndarray], retype: dict[str, str], changed: list[str], _ev: int | None) -> StagedVersion:
            # Entries derived from kept sources were computed from the current version: then
            # this runs under the store lock, so the staged version's base is that version.
            values = self._run_update(self._update_session(retype, feed), feed, changed)
            if reject_nonfinite:
                _check_finite(values)
            return self._store.stage(((n, values.pop(n)) for n in changed), op, version=version, ttl=ttl, origin=origin)

        return self._through_update_graph(inputs, None, reject_nonfinite, sink)

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
        with self._staging_view(path, changed) as mm:
            io = sess.io_binding()
            self._bind_inputs(io, feed)
            views = {}
            for v in self.variables:
                out = v.name + UPDATED_SUFFIX
                if v.name in changed and v.nbytes:
                    view = self._variable_view(mm, v.name)
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

    def _check_valid(self, valid: np.ndarray) -> None:
        if not valid.all():
            bad = [v.name for v, ok in zip(self.sources, valid) if not ok]
            raise UpdateError(f"update graph rejected the shape of {bad}")

    def _update_session(self, retype: dict[str, str], feed: Mapping[str, np.ndarray]) -> ort.InferenceSession:
        """The update graph for this feed's dtypes and emptiness pattern, specialized
        (``specialize``: its ``If``s decided ahead, ResNet-50's graph ran in ~25 instead of
        ~100 ms), and cached: a trainer pushes the same set of tensors every time."""
        shapes = {n: (None if a.size == 0 else tuple(a.shape)) for n, a in feed.items()}
        key = (tuple(sorted(retype.items())), tuple(n for n, sh in shapes.items() if sh is not None))
        sess = self._update_sessions.pop(key, None)
        if sess is None:
            proto = self._graph
            if retype:  # same graph, inputs declared with the client's dtype; its Cast nodes convert
                proto = retype_update_graph(proto, retype)
            sess = ort.InferenceSession(
                specialize(proto, shapes).SerializeToString(),
                session_options(self.options, prepack=False, level="basic", housekeeping=True),
                providers=["CPUExecutionProvider"],
            )
        self._update_sessions[key] = sess  # most recent last
        while len(self._update_sessions) > UPDATE_SESSIONS_KEPT:
            del self._update_sessions[next(iter(self._update_sessions))]
        return sess

    # -- sessions per version -----------------------------------------------------


class _Rearmable:
    """A one-shot timer that each ``arm(delay)`` restarts (``None``: stops it)."""

    def __init__(self, fn: Callable[[], None]):
        self._fn = fn
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def arm(self, delay: float | None) -> bool:
        """Returns True if a run was pending (armed and not yet started)."""
        with self._lock:
            pending = self._timer is not None and self._timer.is_alive()
            if self._timer is not None:
                self._timer.cancel()
            self._timer = None
            if delay is not None:
                self._timer = threading.Timer(delay, self._fn)
                self._timer.daemon = True
                self._timer.start()
        return pending


def changed_by(variables: list[VariableSpec], deps: Mapping[str, list[str]], pushed: set[str]) -> list[str]:
    """Store entries (of ``variables``) an update of ``pushed`` sources recomputes: every entry
    ``deps`` derives from one of them."""
    return [v.name for v in variables if pushed.intersection(deps[v.name])]


def _check_finite(values: Mapping[str, np.ndarray]) -> None:
    """Refuse NaN/Inf in the values the update graph produced, i.e. *after* the cast to the
    variable's dtype: a float64 1e39 is finite but becomes +inf in a float32 variable."""
    for name, a in values.items():
        if a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
            raise UpdateError(f"weight {name!r} contains NaN or Inf in the variable's dtype {a.dtype} (values out of that dtype's range overflow to Inf)")


def _populated_map(path: str, ranges: list[tuple[int, int]]) -> tuple[int, np.ndarray]:
    """Map a file writable with the page tables of ``ranges`` (allocated: see
    ``WeightStore.reserve_staging``) filled now, not on first touch (~1.4 us/page)."""
    fd = os.open(path, os.O_RDWR)
    try:
        ino, size = os.fstat(fd).st_ino, os.fstat(fd).st_size
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    arr = np.frombuffer(mm, np.uint8)
    for off, n in ranges:
        if not madvise(arr.ctypes.data + off, n, getattr(mmap, "MADV_POPULATE_WRITE", 23)):  # Linux >= 5.14
            arr[off : off + n : mmap.PAGESIZE] = 0  # older kernels: touch every page (contents are overwritten anyway)
    return ino, arr
