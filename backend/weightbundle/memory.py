"""Process memory housekeeping shared by init, updates and session building."""

from __future__ import annotations


def release_free_memory() -> None:
    """Give freed heap back to the OS: after init/updates glibc keeps ~a model size of free arena."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
