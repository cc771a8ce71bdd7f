"""Process memory housekeeping shared by init, updates and session building."""

from __future__ import annotations


MAP_LARGE_FROM = 4 << 20


def map_large_allocations(threshold: int = MAP_LARGE_FROM) -> None:
    """Serve every allocation of ``threshold`` bytes or more with its own mapping, unmapped
    when freed.  glibc's default raises that threshold each time such a block is freed, and
    model-sized blocks (ORT's packed copies, update buffers) are then carved from the heap.
    Measured in-process with the 64 MiB MLP: after load, an instance kept 16-30 MiB of
    resident heap in a thread arena that ``malloc_trim`` did not return; with a fixed
    threshold, none, and no slower updates.  Set once, by the serving process (the Triton
    backend), before the bundle allocates."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, int(threshold))  # M_MMAP_THRESHOLD: also fixes it
    except (OSError, AttributeError):  # not glibc
        pass


def release_free_memory() -> None:
    """Give freed heap back to the OS: after init/updates glibc keeps ~a model size of free arena."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
