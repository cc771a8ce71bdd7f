"""Process memory housekeeping shared by init, updates and session building (glibc calls)."""

from __future__ import annotations

import ctypes
import functools
from typing import Any

MAP_LARGE_FROM = 4 << 20


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    """The C library, or None where it cannot be loaded.  ctypes releases the GIL during calls."""
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _call(name: str, *args: Any) -> Any:
    """``libc.name(*args)``, or None where there is no such function (not glibc)."""
    f = getattr(_libc(), name, None)
    return None if f is None else f(*args)


def map_large_allocations(threshold: int = MAP_LARGE_FROM) -> None:
    """Serve every allocation of ``threshold`` bytes or more with its own mapping, unmapped
    when freed.  glibc's default raises that threshold each time such a block is freed, and
    model-sized blocks (ORT's packed copies, update buffers) are then carved from the heap.
    Measured in-process with the 64 MiB MLP: after load, an instance kept 16-30 MiB of
    resident heap in a thread arena that ``malloc_trim`` did not return; with a fixed
    threshold, none, and no slower updates.  Set once, by the serving process (the Triton
    backend), before the bundle allocates."""
    _call("mallopt", -3, int(threshold))  # M_MMAP_THRESHOLD: also fixes it


def release_free_memory() -> None:
    """Give freed heap back to the OS: after init/updates glibc keeps ~a model size of free arena."""
    _call("malloc_trim", 0)


def madvise(addr: int, size: int, advice: int) -> bool:
    """madvise without holding the GIL; False where it failed or is missing.  ``mmap.madvise``
    holds the GIL, and populating a 64 MiB blob takes ~20 ms: measured, that stalled the
    update's reply and the first inference of the new version, which run on other threads."""
    f = getattr(_libc(), "madvise", None)
    if f is None:
        return False
    f.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return bool(f(addr, size, advice) == 0)


def punch_holes(fd: int, ranges: list[tuple[int, int]]) -> None:
    """Free the pages of ``(offset, length)`` ranges of a file, keeping its size (tmpfs and
    most disk filesystems support FALLOC_FL_PUNCH_HOLE); best effort."""
    f = getattr(_libc(), "fallocate", None)
    if f is None:
        return
    f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    for off, n in ranges:
        if n:
            f(fd, 3, off, n)  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
