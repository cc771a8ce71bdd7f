"""Device-resident weights: one session per load, every variable in a device buffer, an update a copy.

On a GPU, a session per weight version (what the CPU path builds) copies every weight to
the device again and re-runs the optimizer: a reload.  Here the inference graph is built
once, its variables turned into graph inputs, and each variable lives in a device buffer
bound to the session through ORT's IOBinding.  A new version copies only the variables it
changed, host to device, into *standby* buffers that no served version reads, and then
swaps which buffers the session binds: the update costs its bytes over the bus, no build.

Buffers: one per variable, and a second (the standby) allocated the first time that
variable changes, so weights never updated cost one device copy.  Which buffer each
variable reads is a ``DeviceView``: a version's inference takes the view current when it
starts and keeps it, so it is never torn.  Before a buffer is overwritten, every older view
that reads it is retired and its running inferences are waited for; an inference that
picks up a retired view (it read ``current`` just before the swap) gets ``StaleView`` and
takes the new one (``Bundle.infer`` retries).  A buffer remembers the store entry it holds,
so a rollback to the previous version, or a version that rewrote nothing, copies nothing.

The device is ORT's: ``"cuda"`` with the CUDA execution provider; ``"cpu"`` runs the same
machinery on the CPU provider, for the tests (on a CPU it is no faster mode: a private copy of
the weights, and GEMMs on unpacked weights).
"""

from __future__ import annotations

import ctypes
import functools
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .compiled import as_inputs

Entry = tuple[str, int]  # a variable's place in the store: (blob, offset)
COPY_SLICE = 4 << 20  # host-to-device copies go in slices of this many bytes (see DeviceWeights._copy)


class StaleView(Exception):
    """The view's buffers are being overwritten by a newer version: serve from the current view."""


class DeviceView:
    """Version ``version`` as the session sees it: which of each variable's buffers to bind.
    Duck-types ``InferenceSession.run`` so that ``Served`` can hold it."""

    def __init__(self, owner: "DeviceWeights", version: int, slots: Mapping[str, int]):
        self._owner = owner
        self.version = version
        self.slots = dict(slots)
        self.running = 0  # inferences in flight on this view (owner's condition guards it)
        self.retired = False

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self._owner.run(self, output_names, feeds)


class DeviceWeights:
    """One inference session over ``graph`` with variables ``names`` held in device buffers.

    ``graph``'s variables may be placeholders or initializers: they become graph inputs, so
    the session holds no weights of its own.  ``device`` is ORT's device name ("cuda",
    "cpu"), ``providers`` the session's execution providers.
    """

    def __init__(
        self,
        graph: onnx.ModelProto,
        names: Sequence[str],
        so: ort.SessionOptions,
        providers: Sequence[Any],
        device: str = "cuda",
        device_id: int = 0,
    ):
        m = onnx.ModelProto()
        m.CopyFrom(graph)
        as_inputs(m, list(names))
        self.session = ort.InferenceSession(m.SerializeToString(), so, providers=list(providers))
        self.device, self.device_id = device, device_id
        self.names = list(names)
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._bufs: dict[str, list[ort.OrtValue]] = {}  # name -> [buffer 0, standby once it changed]
        self._held: dict[str, list[Entry | None]] = {}  # the store entry each buffer holds (None: partly written)
        self._cond = threading.Condition()
        self._local = threading.local()  # per thread: (view, outputs, its IOBinding), see _binding
        self._views: list[DeviceView] = []  # live views, newest last
        self.copied_bytes = 0  # host-to-device bytes of the last ``view`` call (benchmarks, tests)
        self.copy_seconds = 0.0  # and how long reading and copying them took

    # -- serving -----------------------------------------------------------------
    def run(self, view: DeviceView, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        with self._cond:
            if view.retired:
                raise StaleView(view.version)
            view.running += 1
        try:
            names = tuple(output_names) if output_names else tuple(self._outputs)
            io = self._binding(view, names)
            for n, a in feeds.items():
                io.bind_cpu_input(n, np.ascontiguousarray(a))
            self.session.run_with_iobinding(io)
            # The outputs ORT allocated on the host, handed over without a copy
            # (``copy_outputs_to_cpu`` copies: +0.2 ms per 2 MiB, measured), then unbound so
            # that the next run allocates its own instead of overwriting these.
            outs = [v.numpy() for v in io.get_outputs()]
            io.clear_binding_outputs()
            for n in names:
                io.bind_output(n, "cpu")
            return outs
        finally:
            with self._cond:
                view.running -= 1
                self._cond.notify_all()

    def _binding(self, view: DeviceView, outputs: tuple[str, ...]) -> Any:
        """This thread's binding of ``view``'s buffers and ``outputs``: made once per view and
        thread, so that a run binds only its own inputs (binding ResNet-50's ~160 weights on
        every run cost ~0.8 ms against its 1.7 ms inference on an H200, measured)."""
        cached = getattr(self._local, "binding", None)
        if cached is not None and cached[0] is view and cached[1] == outputs:
            return cached[2]
        io = self.session.io_binding()
        for n, k in view.slots.items():
            io.bind_ortvalue_input(n, self._bufs[n][k])
        for n in outputs:
            io.bind_output(n, "cpu")  # run returns once the outputs are on the host: the device work is done
        self._local.binding = (view, outputs, io)
        return io

    # -- new versions ------------------------------------------------------------
    def view(self, version: int, entries: Mapping[str, Entry], load: Callable[[list[str]], Mapping[str, np.ndarray]]) -> DeviceView:
        """The view serving ``version``, whose variables sit at store ``entries``; ``load(names)``
        reads those it must copy.  Callers serialize calls (``SessionCache`` holds its lock)."""
        current = self._views[-1] if self._views else None
        slots: dict[str, int] = {}
        writes: dict[str, int] = {}
        for n in self.names:
            held = self._held.get(n)
            have = held.index(entries[n]) if held is not None and entries[n] in held else None
            if have is not None:
                slots[n] = have  # this buffer holds it already: nothing to copy
            elif held is None:
                writes[n] = slots[n] = 0  # first version: the buffer is allocated with its data
            else:
                # The buffer the current view does not read (the standby), allocated on first use.
                writes[n] = slots[n] = 1 - current.slots[n] if current is not None else 0
        self._retire_older(writes, current)
        t0 = time.perf_counter()
        arrays = load(sorted(writes))
        nbytes = 0
        for n, k in writes.items():
            a = np.ascontiguousarray(arrays[n])
            nbytes += a.nbytes
            bufs, held = self._bufs.setdefault(n, []), self._held.setdefault(n, [])
            if k == len(bufs):
                # ORT allocates it (``ortvalue_from_numpy`` on the CPU would wrap ``a``: the store's read-only mapping).
                bufs.append(ort.OrtValue.ortvalue_from_shape_and_type(a.shape, a.dtype, self.device, self.device_id))
                held.append(None)
            held[k] = None  # a copy that fails half way must not be taken for this entry later
            self._copy(bufs[k], a)
            held[k] = entries[n]
        self.copied_bytes, self.copy_seconds = nbytes, time.perf_counter() - t0
        new = DeviceView(self, version, slots)
        with self._cond:
            self._views.append(new)
        return new

    def _copy(self, dst: ort.OrtValue, src: np.ndarray) -> None:
        """``src`` into buffer ``dst``, *without* the GIL: ORT's ``update_inplace`` holds it for
        the whole copy (~10 ms per 64 MiB), which stalled every inference thread of the process
        for that long (measured).  numpy's copy and a ctypes call release it."""
        if self.device == "cpu":
            np.copyto(_host_array(dst, src), src)
            return
        rt = _cudart()
        if rt is None:
            dst.update_inplace(src)
            return
        _check(rt.cudaSetDevice(self.device_id), "cudaSetDevice")  # the calling thread's current device
        # In slices: the inferences' own small copies get in between instead of queueing
        # behind a whole tensor's (p99 under updates).
        d, h = dst.data_ptr(), src.ctypes.data
        for off in range(0, src.nbytes, COPY_SLICE):
            _check(rt.cudaMemcpy(d + off, h + off, min(COPY_SLICE, src.nbytes - off), _H2D), "cudaMemcpy")
        # From pageable memory the call returns once the data is staged, not landed; the
        # inference stream must not start before it has (ORT's own copy syncs alike).
        _check(rt.cudaStreamSynchronize(None), "cudaStreamSynchronize")

    def _retire_older(self, writes: Mapping[str, int], current: DeviceView | None) -> None:
        """Retire every view older than ``current``, and wait for the inferences running on
        those that read a buffer about to be overwritten (``writes``: name -> buffer)."""
        with self._cond:
            older = [v for v in self._views if v is not current]
            for v in older:
                v.retired = True  # an inference that picks one up now takes the current view instead
            self._views = [current] if current is not None else []
            readers = [v for v in older if any(v.slots.get(n) == k for n, k in writes.items())]
            # Bounded: each is one session run already under way (never this thread's own).
            self._cond.wait_for(lambda: all(v.running == 0 for v in readers))

    def device_bytes(self) -> int:
        """Bytes of device buffers held (the weights, plus the standbys of variables that changed)."""
        return sum(int(np.prod(b.shape())) * _itemsize(b) for bufs in self._bufs.values() for b in bufs)

    def close(self) -> None:
        with self._cond:
            for v in self._views:
                v.retired = True
            self._views = []
        self._bufs.clear()
        self._held.clear()
        self._local = threading.local()  # every thread's cached binding (and the buffers it holds) goes with the old one


_H2D = 1  # cudaMemcpyHostToDevice


def _host_array(v: ort.OrtValue, like: np.ndarray) -> np.ndarray:
    """A writable numpy view of CPU OrtValue ``v`` (shape and dtype of ``like``)."""
    raw = (ctypes.c_char * like.nbytes).from_address(v.data_ptr())
    return np.frombuffer(memoryview(raw), dtype=like.dtype).reshape(like.shape)


@functools.cache
def _cudart() -> Any | None:
    """The CUDA runtime the CUDA provider loaded (the same library, so the same context),
    or None: then ORT's own copy serves."""
    try:
        with open("/proc/self/maps") as f:
            path = next((ln.split()[-1] for ln in f if "libcudart.so" in ln), None)
        if path is None:
            return None
        rt = ctypes.CDLL(path)  # CDLL calls release the GIL
        rt.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        rt.cudaSetDevice.argtypes = [ctypes.c_int]
        rt.cudaStreamSynchronize.argtypes = [ctypes.c_void_p]
        for fn in (rt.cudaMemcpy, rt.cudaSetDevice, rt.cudaStreamSynchronize):
            fn.restype = ctypes.c_int
        return rt
    except (OSError, AttributeError):
        return None


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what} failed with CUDA error {rc}")


def _itemsize(v: ort.OrtValue) -> int:
    """Bytes per element of an OrtValue ("tensor(float)" -> 4)."""
    t = v.data_type()[len("tensor(") : -1]
    sizes = {"float": 4, "double": 8, "float16": 2, "bfloat16": 2, "bool": 1}
    return sizes[t] if t in sizes else np.dtype(t).itemsize
