"""Model-repository writes: a new version folder, atomically.

Triton loads ``<model>/<N>/`` folders. A folder must never be visible half-written,
because a restart or ``load_model`` could pick it up. So we write into a hidden
``.commit-*`` folder (Triton loads only numeric folders), fsync the file and the
folder, then ``rename`` it to ``<N>``, and fsync the parent. A crash leaves either
no new folder or a complete one. A leftover ``.commit-*`` is removed by
``sweep_partial`` on the next start.

The writer holds an ``flock`` on the folder while it writes; the kernel drops it when
the writer dies.  So "is someone still writing this?" is a lock probe, not a pid
check: a pid can be reused, or belong to a stub that is stuck but no longer writing.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from typing import BinaryIO, Callable

from .fsutil import fsync_dir

PARTIAL_PREFIX = ".commit-"


def version_folders(model_dir: str) -> list[int]:
    return sorted(int(n) for n in os.listdir(model_dir) if n.isdigit() and os.path.isdir(os.path.join(model_dir, n)))


def write_version(model_dir: str, filename: str, writer: Callable[[BinaryIO], object]) -> int:
    """Let ``writer`` fill ``<model_dir>/<N>/<filename>`` (N = highest + 1) atomically; return N.

    The caller serialises concurrent commits (the weight store's lock).
    """
    tmp = os.path.join(model_dir, f"{PARTIAL_PREFIX}{os.getpid()}-{uuid.uuid4().hex}")
    os.mkdir(tmp)
    held = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(held, fcntl.LOCK_EX)  # "being written": sweep_partial leaves it alone
    try:
        path = os.path.join(tmp, filename)
        with open(path, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(path, 0o644)
        fsync_dir(tmp)
        number = max(version_folders(model_dir), default=0) + 1
        os.rename(tmp, os.path.join(model_dir, str(number)))
        fsync_dir(model_dir)
        return number
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(held)


def sweep_partial(model_dir: str) -> list[str]:
    """Remove ``.commit-*`` folders left by a crash during a commit.

    Only folders nobody holds the lock on: another instance may be committing right now.
    """
    gone = []
    for n in os.listdir(model_dir):
        if not n.startswith(PARTIAL_PREFIX):
            continue
        path = os.path.join(model_dir, n)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live writer
        finally:
            os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
        gone.append(n)
    return gone
