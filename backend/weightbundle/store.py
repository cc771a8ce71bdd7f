"""Versioned, immutable weight store in a directory (tmpfs by default).

Each applied update writes one *blob* file holding only the variables it changed
(page-aligned, so ONNX Runtime memory-maps them) and one *manifest* that maps
every variable to a (blob, offset).  ``HEAD`` names the current version and is
replaced atomically (write + rename), so a reader sees either the old or the new
version, never a mix.  Blobs are never modified after publication: a session
built on a version can keep reading it however many updates follow.

Several processes (Triton instances) may share one store: writers serialise on an
``flock``; readers take no lock.  Unreferenced blobs are deleted once they fall
out of the retained history; open mmaps keep their pages alive until closed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import shutil
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from . import memory, packing
from .fsutil import atomic_write, left_by_dead_process, pid_alive, unlink_quiet  # noqa: F401 (pid_alive: re-export)
from .errors import BundleError, UpdateError, VersionConflictError, VersionOrderError
from .format import VariableSpec, raw_bytes

PAGE = 4096
LOCK_FILE = "lock"  # the store's lock; it exists as long as the store does (sessions anchor placeholders on it)
STAGING = "staging.bin"
CLAIMED = ".claimed-"
STAGED = "staged-"  # staged-<N>.bin / staged-<N>.json: staged versions (never "blob-", which GC owns)
STAGE_TMP = ".stage-"
COLD = "cold-"  # cold-<blob> in the disk-backed twin folder: a blob only older versions read


@dataclass(frozen=True)
class Version:
    """One published weight version: number plus where each variable lives."""

    number: int
    op: str
    entries: dict[str, tuple[str, int]]  # name -> (blob file name, byte offset)
    time: float
    prev: int | None  # the version whose contents this one replaced: where rollback goes
    origin: dict | None = None  # where the weights came from (object-store url, per-tensor source sha256)

    @property
    def blobs(self) -> set[str]:
        """The blob files this version reads."""
        return {b for b, _ in self.entries.values()}


@dataclass(frozen=True)
class StagedVersion:
    """A version written to the store that serves nothing until ``activate``.

    ``entries`` holds only the staged variables; the others come from ``base`` at
    activation, which therefore requires the current version to still be ``base``.
    A stage that sets every variable has ``base`` None and fits any current version.
    """

    number: int
    op: str
    entries: dict[str, tuple[str, int]]
    base: int | None
    digest: str  # sha256 of the complete weights this version will serve (see weights_digest)
    time: float
    expires: float
    origin: dict | None = None

    def describe(self) -> dict:
        return {
            "version": self.number,
            "op": self.op,
            "base": self.base,
            "digest": self.digest,
            "tensors": len(self.entries),
            "expires_in_s": round(max(0.0, self.expires - time.time()), 1),
        }


STORE_PREFIX = "weightbundle-"  # <prefix><server pid>-<model>-v<version>: see shared_dir


def shared_dir(root: str, model_name: str, model_version: str | int, server_pid: int | None = None) -> str:
    """The store folder shared by every instance of one model version of one server
    (a Triton instance's parent is the server, hence the default pid)."""
    tag = "".join(c if c.isalnum() or c in "._" else "_" for c in model_name)
    return os.path.join(root, f"{STORE_PREFIX}{os.getppid() if server_pid is None else server_pid}-{tag}-v{model_version}")


def default_root() -> str:
    """tmpfs when available: weights must live in RAM to be shared and mmapped cheaply."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


class WeightStore:
    """A directory of immutable weight versions. See the module docstring."""

    def __init__(self, path: str, specs: Sequence[VariableSpec], history: int = 1):
        if history < 0:
            raise ValueError("history must be >= 0")
        self.path = path
        self.specs = {s.name: s for s in specs}
        self.order = [s.name for s in specs]
        self._staging_layout: tuple[dict[str, int], int] | None = None
        self.history = history
        os.makedirs(path, exist_ok=True)
        self._lock_fd = os.open(os.path.join(path, LOCK_FILE), os.O_CREAT | os.O_RDWR, 0o600)
        self._lock_depth = 0  # flock is per open file: nested locked() must not unlock early
        self._thread_lock = threading.RLock()
        self._cache: tuple[int, Version] | None = None
        self._instance_fd = -1
        self._instance_name = ""
        # Packed models (packing.py) live on a disk-backed twin folder of the same name.
        self.packed_path = os.path.join(packing.packed_root(), os.path.basename(os.path.normpath(path)))

    @classmethod
    def private(cls, specs: Sequence[VariableSpec], history: int = 1, root: str | None = None) -> "WeightStore":
        """A store owned by this process (library use); remove it with ``destroy``."""
        return cls(tempfile.mkdtemp(prefix="weightbundle-", dir=root or default_root()), specs, history)

    # -- reading -------------------------------------------------------------
    def head(self) -> int | None:
        """Current version number, or None before the first publication."""
        try:
            with open(os.path.join(self.path, "HEAD"), "rb") as f:
                return int(f.read())
        except FileNotFoundError:
            return None

    def current(self) -> Version | None:
        # GC may remove a manifest between reading HEAD and opening it: re-read HEAD then.
        for _ in range(100):
            n = self.head()
            if n is None:
                return None
            if self._cache and self._cache[0] == n:
                return self._cache[1]
            try:
                v = self.version(n)
            except FileNotFoundError:
                continue
            self._cache = (n, v)
            return v
        raise BundleError(f"weight store {self.path} keeps changing under the reader")

    def version(self, n: int) -> Version:
        with open(os.path.join(self.path, f"v{n}.json"), "rb") as f:
            d = json.load(f)
        return Version(d["version"], d["op"], {k: (b, o) for k, (b, o) in d["vars"].items()}, d["time"], d.get("prev"), d.get("origin"))

    def versions(self) -> list[int]:
        return sorted(int(f[1:-5]) for f in os.listdir(self.path) if f.startswith("v") and f.endswith(".json"))

    def array(self, v: Version, name: str) -> np.ndarray:
        """Read-only zero-copy view of a variable in version ``v``."""
        return self.arrays(v, [name])[name]

    def arrays(self, v: Version, names: Iterable[str]) -> dict[str, np.ndarray]:
        """``array`` for many variables, mapping each blob once (ResNet-50's 324 variables
        as 324 mappings took 12 ms of an update)."""
        maps: dict[str, np.ndarray] = {}
        out = {}
        for name in names:
            spec = self.specs[name]
            blob, off = v.entries[name]
            if spec.nbytes == 0:
                out[name] = np.zeros(spec.shape, spec.np_dtype)
                continue
            mm = maps.get(blob)
            if mm is None:
                mm = maps[blob] = np.memmap(self.blob_path(blob), dtype=np.uint8, mode="r")
            out[name] = mm[off : off + spec.nbytes].view(spec.np_dtype).reshape(spec.shape)
        return out

    def blob_path(self, blob: str) -> str:
        """Where a blob's bytes are: in the store, or, for one that only older retained
        versions read, in the disk-backed twin folder (``evict_history``)."""
        hot = os.path.join(self.path, blob)
        if os.path.exists(hot):
            return hot
        cold = os.path.join(self.packed_path, COLD + blob)
        return cold if os.path.exists(cold) else hot

    # -- writing -------------------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive writer lock across processes (reentrant within this object)."""
        with self._thread_lock:  # flock does not exclude threads of one process (follow mode runs one)
            if self._lock_depth == 0:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def publish(
        self, arrays: Mapping[str, np.ndarray], op: str, expected_version: int | None = None, version: int | None = None, collect: bool = True
    ) -> Version:
        """Write ``arrays`` as a new version; variables not given keep their current blob.

        Arrays must already have the variable's dtype and shape (the update graph
        guarantees it).  Call inside ``locked()`` when the check and the write must be
        one step, e.g. compare-and-swap by the caller; ``expected_version`` does that here.
        ``collect=False`` leaves dropping old versions to a later ``collect()``.
        """
        with self.locked():
            cur = self._check_publish(set(arrays), expected_version)
            number = self.next_number(cur, version)
            entries = dict(cur.entries) if cur else {}
            if arrays:
                blob = f"blob-{number}.bin"
                entries.update(self._write_blob(blob, arrays))
            return self._commit(number, op, entries, None if cur is None else cur.number, collect=collect)

    # -- staging blob ------------------------------------------------------------------
    # A new file on tmpfs costs ~2x a memcpy to fill, because every page is allocated and
    # zeroed on first touch.  So the store keeps one *staging* blob, allocated ahead of
    # time (fallocate), laid out with every variable at a fixed page-aligned offset.  An
    # updater claims it (rename, so only one process can), lets the update graph write
    # straight into it, and publishes it by renaming it to a blob; the pages of variables
    # it did not change are punched out.  One staging blob per store, whatever the
    # number of instances: memory cost is one model size of tmpfs.
    def staging_layout(self) -> tuple[dict[str, int], int]:
        """(offset of each variable, blob size): fixed by the variables, so computed once."""
        if self._staging_layout is None:
            offsets, off = {}, 0
            for name in self.order:
                offsets[name] = off
                off = (off + self.specs[name].nbytes + PAGE - 1) // PAGE * PAGE
            self._staging_layout = offsets, max(off, PAGE)
        return self._staging_layout

    def staging_ranges(self, names: Iterable[str] | None = None) -> list[tuple[int, int]]:
        """The page-aligned (offset, length) of ``names``' places in the staging blob (None: all of it)."""
        offsets, size = self.staging_layout()
        if names is None:
            return [(0, size)]
        return [(offsets[n], (self.specs[n].nbytes + PAGE - 1) // PAGE * PAGE) for n in sorted(set(names), key=offsets.__getitem__) if self.specs[n].nbytes]

    def prepare_staging(self, names: Iterable[str] | None = None) -> None:
        """Allocate the staging blob if there is none (call off the critical path): the places
        of variables ``names`` (None: all), the rest left as holes of a full-size file.  A
        stream of one-layer updates then allocates, and punches, one layer per update."""
        target = os.path.join(self.path, STAGING)
        if os.path.exists(target):
            return
        _, size = self.staging_layout()
        tmp = os.path.join(self.path, f"{CLAIMED}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        fd = os.open(tmp, os.O_CREAT | os.O_RDWR | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            _allocate(fd, self.staging_ranges(names))
        except OSError:  # no space on tmpfs: updates fall back to the plain write path
            os.close(fd)
            unlink_quiet(tmp)
            return
        os.close(fd)
        self._return_staging(tmp)

    def reserve_staging(self, path: str, names: Iterable[str] | None) -> None:
        """Allocate ``names``' places in staging blob ``path`` where it has holes.  Writing into a
        hole through a mapping on a full tmpfs kills the writer (SIGBUS); this raises ENOSPC.
        Cheap where the places are allocated already."""
        fd = os.open(path, os.O_RDWR)
        try:
            _allocate(fd, self.staging_ranges(names))
        finally:
            os.close(fd)

    def claim_staging(self) -> str | None:
        """Take the staging blob for this process, or None if there is none right now."""
        dst = os.path.join(self.path, f"{CLAIMED}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(os.path.join(self.path, STAGING), dst)  # atomic: one claimer wins
        except FileNotFoundError:
            return None
        return dst

    def _return_staging(self, path: str) -> None:
        try:
            os.link(path, os.path.join(self.path, STAGING))  # fails if another one appeared meanwhile
        except FileExistsError:
            pass
        unlink_quiet(path)

    def staging_age(self) -> float | None:
        """Seconds since the staging blob was put in place, or None if there is none."""
        try:
            return max(0.0, time.time() - os.stat(os.path.join(self.path, STAGING)).st_ctime)
        except FileNotFoundError:
            return None

    def drop_staging(self, older_than: float) -> bool:
        """Remove the staging blob if it has waited ``older_than`` seconds unclaimed (another
        instance's update may have just made a fresh one: that one stays)."""
        age = self.staging_age()
        if age is None or age < older_than:
            return False
        claimed = self.claim_staging()
        if claimed is None:
            return False
        unlink_quiet(claimed)
        return True

    def release_staging(self, path: str) -> None:
        """Give a claimed staging blob back unpublished (the update was rejected)."""
        self._return_staging(path)

    def publish_staged(
        self, path: str, names: Sequence[str], op: str, expected_version: int | None = None, version: int | None = None, collect: bool = True
    ) -> Version:
        """Publish a claimed staging blob holding new values for ``names`` at their layout offsets.
        ``collect=False`` leaves dropping old versions to a later ``collect()``."""
        offsets, _ = self.staging_layout()
        keep = set(names)
        with self.locked():
            try:
                cur = self._check_publish(keep, expected_version)
                number = self.next_number(cur, version)
            except UpdateError:
                self.release_staging(path)
                raise
            _punch_holes(path, [(offsets[n], self.specs[n].nbytes) for n in self.order if n not in keep])
            blob = f"blob-{number}.bin"
            os.rename(path, os.path.join(self.path, blob))
            entries = dict(cur.entries) if cur else {}
            entries.update({n: (blob, offsets[n]) for n in names})
            return self._commit(number, op, entries, None if cur is None else cur.number, collect=collect)

    @contextmanager
    def transaction(self, expected_version: int | None = None) -> Iterator[Version | None]:
        """The writer lock plus the compare-and-swap check, as one step: yields the current
        version, which cannot change until the block ends.  Every mutating op runs in one::

            with store.transaction(cmd.expected_version) as cur:
                ...  # publish, export, ...
        """
        with self.locked():
            yield self.check_expected(expected_version)

    def check_expected(self, expected_version: int | None) -> Version | None:
        """Under the lock: the compare-and-swap check every mutating path shares. Returns the current version."""
        cur = self.current()
        if expected_version is not None and (cur is None or cur.number != expected_version):
            raise VersionConflictError(expected_version, -1 if cur is None else cur.number)
        return cur

    @staticmethod
    def next_number(cur: Version | None, version: int | None) -> int:
        """The number a new version gets: ``version`` when the publisher chose one (it must
        exceed the current one, so numbers never go down), else current + 1."""
        if version is None:
            return 0 if cur is None else cur.number + 1
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise UpdateError(f"'version' must be a non-negative integer, got {version!r}")
        if cur is not None and version <= cur.number:
            raise VersionOrderError(version, cur.number)
        return version

    def _check_publish(self, names: set[str], expected_version: int | None) -> Version | None:
        """Under the lock: compare-and-swap, and every variable must have a value afterwards."""
        cur = self.check_expected(expected_version)
        missing = [n for n in self.order if n not in names and (cur is None or n not in cur.entries)]
        if missing:
            raise UpdateError(f"no current value for {missing[:5]}{'...' if len(missing) > 5 else ''}: the first update must set every variable")
        return cur

    def rollback(self, expected_version: int | None = None, version: int | None = None) -> Version:
        """Publish, as a new version, the contents the current version replaced.

        Repeated rollbacks walk further back while ``history`` retains versions.
        """
        with self.transaction(expected_version) as cur:
            if cur is None:
                raise UpdateError("nothing to roll back: no weights yet")
            number = self.next_number(cur, version)
            if cur.prev is None or cur.prev not in self.versions():
                kept = [n for n in self.versions() if n != cur.number]
                raise UpdateError(
                    f"cannot roll back version {cur.number}: its predecessor is not retained (retained: {kept}; raise the 'history' parameter to keep more)"
                )
            target = self.version(cur.prev)
            self._restore_cold(target)
            return self._commit(number, f"rollback to {target.number}", dict(target.entries), target.prev, target.origin)

    # -- staged versions (two-phase: stage everywhere, then activate) -------------------
    # A staged version is a blob plus a manifest under names GC never touches.  Activation
    # renames the blob to an ordinary one and publishes a manifest: a few file operations
    # under the lock, whatever the model size.  Staged versions expire after their ttl.
    def _staged_path(self, number: int, ext: str) -> str:
        return os.path.join(self.path, f"{STAGED}{number}.{ext}")

    def stage(
        self, arrays: Iterable[tuple[str, np.ndarray]], op: str, version: int | None = None, ttl: float = 3600.0, origin: dict | None = None
    ) -> StagedVersion:
        """Write ``arrays`` (name, array of the variable's dtype and shape) as a staged version.

        The blob is written outside the lock, one array at a time, so a caller may produce
        them lazily; the number, the completeness check and the digest are fixed under it.
        """
        tmp = f"{STAGE_TMP}{os.getpid()}-{uuid.uuid4().hex[:8]}.bin"
        try:
            written = self._write_blob(tmp, arrays)
            with self.locked():
                self._expire_staged()
                cur = self.current()
                number = self.next_number(cur, version)
                if os.path.exists(self._staged_path(number, "json")):
                    raise UpdateError(f"version {number} is already staged; activate or abort it first")
                full = set(written) == set(self.order)
                if not full:
                    self._check_publish(set(written), None)  # every variable needs a value
                blob = f"{STAGED}{number}.bin"
                os.rename(os.path.join(self.path, tmp), os.path.join(self.path, blob))
                entries = {n: (blob, off) for n, (_, off) in written.items()}
                base = None if full or cur is None else cur.number
                merged = {**(cur.entries if cur is not None and not full else {}), **entries}
                now = time.time()
                st = StagedVersion(number, op, entries, base, self.weights_digest(merged), now, now + ttl, origin)
                self._atomic_write(
                    f"{STAGED}{number}.json",
                    json.dumps(
                        {"version": number, "op": op, "vars": entries, "base": base, "digest": st.digest, "time": now, "expires": st.expires, "origin": origin}
                    ).encode(),
                )
                return st
        finally:
            unlink_quiet(os.path.join(self.path, tmp))
            unlink_quiet(os.path.join(self.path, tmp + ".tmp"))

    def staged(self, number: int) -> StagedVersion | None:
        try:
            with open(self._staged_path(number, "json"), "rb") as f:
                d = json.load(f)
        except FileNotFoundError:
            return None
        return StagedVersion(
            d["version"], d["op"], {k: (b, o) for k, (b, o) in d["vars"].items()}, d["base"], d["digest"], d["time"], d["expires"], d.get("origin")
        )

    def staged_versions(self) -> list[StagedVersion]:
        with self.locked():
            self._expire_staged()
            nums = sorted(int(f[len(STAGED) : -5]) for f in os.listdir(self.path) if f.startswith(STAGED) and f.endswith(".json"))
            return [st for st in (self.staged(n) for n in nums) if st is not None]

    def activate(self, number: int, expected_version: int | None = None, collect: bool = True) -> Version:
        """Publish staged version ``number`` atomically (compare-and-swap on ``expected_version``).

        ``collect=False`` leaves freeing the versions that fell out of the history (unlinking
        their blobs: tens of ms for a big model) to a later ``collect()``, off the switch.
        """
        with self.locked():
            self._expire_staged()
            st = self.staged(number)
            if st is None:
                have = [s.number for s in self._staged_list()]
                raise UpdateError(f"version {number} is not staged (staged: {have}); stage it first")
            cur = self.check_expected(expected_version)
            self.next_number(cur, number)
            if st.base is not None and (cur is None or cur.number != st.base):
                err = VersionConflictError(st.base, -1 if cur is None else cur.number)
                err.args = (
                    f"staged version {number} changes only some weights of version {st.base}, but the current "
                    f"version is {err.current}; abort it and stage it again",
                )
                raise err
            blob = f"blob-{number}.bin"
            os.rename(self._staged_path(number, "bin"), os.path.join(self.path, blob))
            entries = dict(cur.entries) if cur is not None and st.base is not None else {}
            entries.update({n: (blob, off) for n, (_, off) in st.entries.items()})
            origin = _merge_origin(cur.origin if cur is not None and st.base is not None else None, st)
            unlink_quiet(self._staged_path(number, "json"))
            return self._commit(number, st.op, entries, None if cur is None else cur.number, origin, collect)

    def abort(self, number: int) -> StagedVersion:
        with self.locked():
            st = self.staged(number)
            if st is None:
                raise UpdateError(f"version {number} is not staged (staged: {[s.number for s in self._staged_list()]})")
            self._drop_staged(number)
            return st

    def _staged_list(self) -> list[StagedVersion]:
        nums = sorted(int(f[len(STAGED) : -5]) for f in os.listdir(self.path) if f.startswith(STAGED) and f.endswith(".json"))
        return [st for st in (self.staged(n) for n in nums) if st is not None]

    def _drop_staged(self, number: int) -> None:
        unlink_quiet(self._staged_path(number, "json"))  # manifest first: a blob without one is never activated
        unlink_quiet(self._staged_path(number, "bin"))
        # A packed copy built while staging is keyed by the number, which a later stage may reuse.
        unlink_quiet(packing.model_path(self.packed_path, number))
        unlink_quiet(os.path.join(self.packed_path, packing.data_name(number)))

    def _expire_staged(self) -> None:
        """Under the lock: drop staged versions past their ttl."""
        now = time.time()
        for st in self._staged_list():
            if st.expires < now:
                self._drop_staged(st.number)

    def weights_digest(self, entries: Mapping[str, tuple[str, int]]) -> str:
        """sha256 over every variable in order (name, dtype, shape, bytes): equal digests, equal weights."""
        h = hashlib.sha256()
        for name in self.order:
            spec = self.specs[name]
            h.update(f"{name}\0{spec.np_dtype.str}\0{list(spec.shape)}\0".encode())
            if spec.nbytes:
                blob, off = entries[name]
                with open(self.blob_path(blob), "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                try:
                    h.update(memoryview(mm)[off : off + spec.nbytes])
                finally:
                    mm.close()
        return h.hexdigest()

    def current_digest(self) -> str | None:
        cur = self.current()
        return None if cur is None else self.weights_digest(cur.entries)

    def _write_blob(self, blob: str, arrays: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]]) -> dict[str, tuple[str, int]]:
        out: dict[str, tuple[str, int]] = {}
        tmp = os.path.join(self.path, blob + ".tmp")
        items = [(n, arrays[n]) for n in self.order if n in arrays] if isinstance(arrays, Mapping) else arrays
        try:
            with open(tmp, "wb") as f:
                off = 0
                for name, arr in items:
                    arr = np.ascontiguousarray(arr)
                    f.seek(off)
                    f.write(raw_bytes(arr))
                    out[name] = (blob, off)
                    off = (off + arr.nbytes + PAGE - 1) // PAGE * PAGE
                f.truncate(max(off, 1))
            os.rename(tmp, os.path.join(self.path, blob))
        except BaseException:  # ENOSPC and friends: a half-written temp file must not keep the tmpfs full
            unlink_quiet(tmp)
            raise
        return out

    def _commit(self, number: int, op: str, entries: dict[str, tuple[str, int]], prev: int | None, origin: dict | None = None, collect: bool = True) -> Version:
        v = Version(number, op, entries, time.time(), prev, origin)
        d = {"version": number, "op": op, "time": v.time, "prev": prev, "vars": entries}
        if origin:
            d["origin"] = origin
        self._atomic_write(f"v{number}.json", json.dumps(d).encode())
        self._atomic_write("HEAD", str(number).encode())
        self._cache = (number, v)
        if collect:
            self._gc(number)
        return v

    def collect(self) -> None:
        """Drop what the retained history no longer needs (``activate(collect=False)`` leaves it)."""
        with self.locked():
            head = self.head()
            if head is not None:
                self._gc(head)

    def _atomic_write(self, name: str, data: bytes) -> None:
        atomic_write(os.path.join(self.path, name), data)  # tmpfs: the rename is what matters

    def _gc(self, head: int) -> None:
        """Keep HEAD plus ``history`` older manifests; drop blobs nobody references."""
        keep = [n for n in self.versions() if n <= head][-(self.history + 1) :]
        for n in self.versions():
            if n not in keep:
                unlink_quiet(os.path.join(self.path, f"v{n}.json"))
        live = set().union(*(self.version(n).blobs for n in keep))
        for f in os.listdir(self.path):
            if f.startswith("blob-") and f not in live:
                unlink_quiet(os.path.join(self.path, f))
            elif left_by_dead_process(f, CLAIMED):
                unlink_quiet(os.path.join(self.path, f))  # claimed by a process that died mid-update
            elif left_by_dead_process(f, STAGE_TMP):
                unlink_quiet(os.path.join(self.path, f))  # a stage whose writer died
        for f in os.listdir(self.packed_path) if os.path.isdir(self.packed_path) else []:
            if f.startswith(COLD) and f[len(COLD) :] not in live:
                unlink_quiet(os.path.join(self.packed_path, f))
        self._gc_packed(head)

    def collect_packed(self) -> None:
        """Drop the packed files ``_gc_packed`` no longer keeps (after a newer version is packed)."""
        with self.locked():
            head = self.head()
            if head is not None:
                self._gc_packed(head)

    def _gc_packed(self, head: int) -> None:
        """Keep the packed files of the newest version packed so far: the current one, or
        during a stream of updates the one its pinned sessions map (sessions.py loads pins
        over it), and those of staged versions.  Drop the others' (sessions still mapping
        one keep its pages until they close), and what dead builders left."""
        d = self.packed_path
        files = os.listdir(d) if os.path.isdir(d) else []
        keep = max((n for n in packing.numbers(files) if n <= head), default=head)
        # A staged version's pair is built at stage time, ahead of head; ``_drop_staged``
        # removes it with the staged version (sweeping it here failed a stage under CI load).
        staged = {st.number for st in self._staged_list()}
        for f in files:
            stem = f[len(packing.PREFIX) :].split(".")[0] if f.startswith(packing.PREFIX) else ""
            lock_n = f[len(packing.BUILDING) + 1 : -len(".lock")] if f.startswith(packing.BUILDING) and f.endswith(".lock") else ""
            if stem.isdigit() and int(stem) not in (head, keep) and int(stem) not in staged:
                unlink_quiet(os.path.join(d, f))
            elif lock_n.isdigit() and int(lock_n) < head:
                unlink_quiet(os.path.join(d, f))
            elif packing.is_building_leftover(f) and left_by_dead_process(f, packing.BUILDING):
                if os.path.isdir(os.path.join(d, f)):  # a dead process's compile scratch
                    shutil.rmtree(os.path.join(d, f), ignore_errors=True)
                else:
                    unlink_quiet(os.path.join(d, f))

    # -- older versions on disk ------------------------------------------------------
    # A retained older version is read only by rollback (and status of it, never by
    # inference), yet on tmpfs it costs a model size of RAM for as long as it is kept.
    # ``evict_history`` moves such blobs to the disk-backed twin folder, next to the packed
    # copies: there they are page cache, which the kernel writes back and can evict.  A
    # rollback copies them back into the store before publishing (``_restore_cold``), so a
    # current version's blobs are always in the store, where sessions map them.
    def evict_history(self) -> int:
        """Move the blobs that only older retained versions read out of tmpfs; return the
        bytes moved.  Best effort: a full or missing disk leaves them where they are."""
        if not self._cold_is_elsewhere():
            return 0
        with self.locked():
            head = self.head()
            if head is None:
                return 0
            current = self.version(head).blobs
            ranges = {b: r for b, r in self._blob_ranges().items() if b not in current and os.path.exists(os.path.join(self.path, b))}
        moved = 0
        for blob, spans in ranges.items():
            hot = os.path.join(self.path, blob)
            tmp = os.path.join(self.packed_path, f"{packing.BUILDING}{os.getpid()}-{uuid.uuid4().hex[:8]}.cold")
            try:
                os.makedirs(self.packed_path, exist_ok=True)
                _copy_ranges(hot, tmp, spans)  # outside the lock: updates go on meanwhile
                with self.locked():  # publish the move only if the blob is still old and still here
                    head = self.head()
                    if head is None or blob in self.version(head).blobs or not os.path.exists(hot):
                        continue
                    os.rename(tmp, os.path.join(self.packed_path, COLD + blob))
                    os.unlink(hot)  # sessions still mapping it keep its pages until they close
                moved += sum(n for _, n in spans)
            except (OSError, ValueError):
                pass
            finally:
                unlink_quiet(tmp)
        return moved

    def _blob_ranges(self) -> dict[str, list[tuple[int, int]]]:
        """Under the lock: every blob any retained version reads, with the byte ranges read
        (a partial update's blob shares the older blob's other ranges with older versions)."""
        ranges: dict[str, set[tuple[int, int]]] = {}
        for n in self.versions():
            for name, (b, off) in self.version(n).entries.items():
                if b.startswith("blob-"):
                    ranges.setdefault(b, set()).add((off, self.specs[name].nbytes))
        return {b: sorted(r) for b, r in ranges.items()}

    def _restore_cold(self, v: Version) -> None:
        """Under the lock: copy version ``v``'s blobs that were moved to disk back into the store,
        each whole (every range any retained version reads), since the disk copy then goes."""
        ranges = self._blob_ranges()
        for blob in v.blobs:
            hot, cold = os.path.join(self.path, blob), os.path.join(self.packed_path, COLD + blob)
            if os.path.exists(hot) or not os.path.exists(cold):
                continue
            tmp = hot + ".tmp"
            try:
                _copy_ranges(cold, tmp, ranges.get(blob, []))
                os.rename(tmp, hot)
            except BaseException:  # ENOSPC on tmpfs: the rollback fails, nothing changed
                unlink_quiet(tmp)
                raise
            unlink_quiet(cold)

    def _cold_is_elsewhere(self) -> bool:
        """Moving blobs helps only when the twin folder is another filesystem than the store's."""
        try:
            return os.stat(self.path).st_dev != os.stat(packing.packed_root()).st_dev
        except OSError:
            return False

    # -- sharing between processes ------------------------------------------------
    # Each attached process holds an flock on instances/<pid>; a lock that can be
    # taken belongs to a dead process.  The last live process out removes the store.
    def register(self) -> None:
        d = os.path.join(self.path, "instances")
        os.makedirs(d, exist_ok=True)
        self._instance_name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._instance_fd = os.open(os.path.join(d, self._instance_name), os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._instance_fd, fcntl.LOCK_SH)

    def live_instances(self) -> int:
        d = os.path.join(self.path, "instances")
        alive = 0
        for f in os.listdir(d) if os.path.isdir(d) else []:
            p = os.path.join(d, f)
            if f == self._instance_name and self._instance_fd >= 0:
                alive += 1
                continue
            try:
                fd = os.open(p, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                unlink_quiet(p)  # its owner died without cleaning up
            except BlockingIOError:
                alive += 1
            finally:
                os.close(fd)
        return alive

    def release(self) -> bool:
        """Detach this process; destroy the store if it was the last one. True if destroyed."""
        with self.locked():
            if self._instance_fd >= 0:
                unlink_quiet(os.path.join(self.path, "instances", self._instance_name))
                os.close(self._instance_fd)
                self._instance_fd = -1
            last = self.live_instances() == 0
            if last:
                shutil.rmtree(self.path, ignore_errors=True)
                shutil.rmtree(self.packed_path, ignore_errors=True)
        self.close()
        return last

    def close(self) -> None:
        if self._instance_fd >= 0:
            os.close(self._instance_fd)
            self._instance_fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def destroy(self) -> None:
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
        shutil.rmtree(self.packed_path, ignore_errors=True)


def _merge_origin(base: dict | None, st: StagedVersion) -> dict | None:
    """Where the new version's weights came from: the source digests of what the stage
    fetched, plus the base's for the sources it kept (a fetch skips what matched them).

    Keys are update-input (source) names, which need not be store entries.  A stage from
    anything but the object store records nothing, so the next fetch takes every tensor.
    """
    if not st.origin or not st.origin.get("sha256"):
        return None
    sha = dict((base or {}).get("sha256") or {})
    sha.update(st.origin["sha256"])
    return {**st.origin, "sha256": sha}


def sweep_stale(root: str, prefix: str = STORE_PREFIX) -> list[str]:
    """Remove stores under ``root`` named ``<prefix><pid>-...`` whose server pid is dead.

    A SIGKILLed server cannot clean up; the next start calls this so nothing leaks.
    """
    removed = []
    for base in dict.fromkeys((root, packing.packed_root())):  # the stores, and their packed twins
        for name in os.listdir(base) if os.path.isdir(base) else []:
            if not left_by_dead_process(name, prefix):
                continue
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
            removed.append(name)
    return removed


def _allocate(fd: int, ranges: Sequence[tuple[int, int]]) -> None:
    for off, n in ranges:
        os.posix_fallocate(fd, off, n)


def _punch_holes(path: str, ranges: Sequence[tuple[int, int]]) -> None:
    """Free the pages of unused ranges (whole pages: the ranges are page-aligned variables)."""
    fd = os.open(path, os.O_RDWR)
    try:
        memory.punch_holes(fd, [(off, (n + PAGE - 1) // PAGE * PAGE) for off, n in ranges])
    finally:
        os.close(fd)


def _copy_ranges(src: str, dst: str, spans: Sequence[tuple[int, int]]) -> None:
    """Copy the byte ranges ``spans`` of ``src`` into a new file ``dst`` of the same size, at
    the same offsets; the rest stays a hole (a blob's unchanged variables are holes).
    ``sendfile`` copies in the kernel, without the GIL."""
    fin = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fout, os.fstat(fin).st_size)
            for off, n in spans:
                os.lseek(fout, off, os.SEEK_SET)
                done = 0
                while done < n:
                    k = os.sendfile(fout, fin, off + done, n - done)
                    if k <= 0:
                        raise OSError(f"{src} ended early")
                    done += k
        finally:
            os.close(fout)
    finally:
        os.close(fin)
