"""Model-repository writes: a new version folder, atomically.

Triton loads ``<model>/<N>/`` folders. A folder must never be visible half-written,
because a restart or ``load_model`` could pick it up. So we write into a hidden
``.commit-*`` folder (Triton loads only numeric folders), fsync the file and the
folder, then ``rename`` it to ``<N>``, and fsync the parent. A crash leaves either
no new folder or a complete one. A leftover ``.commit-*`` is removed by
``sweep_partial`` on the next start.
"""
from __future__ import annotations

import os
import shutil
import uuid
from typing import BinaryIO, Callable

from .store import pid_alive

PARTIAL_PREFIX = ".commit-"


def version_folders(model_dir: str) -> list[int]:
    return sorted(int(n) for n in os.listdir(model_dir) if n.isdigit() and os.path.isdir(os.path.join(model_dir, n)))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_version(model_dir: str, filename: str, writer: Callable[[BinaryIO], object]) -> int:
    """Let ``writer`` fill ``<model_dir>/<N>/<filename>`` (N = highest + 1) atomically; return N.

    The caller serialises concurrent commits (the weight store's lock).
    """
    tmp = os.path.join(model_dir, f"{PARTIAL_PREFIX}{os.getpid()}-{uuid.uuid4().hex}")
    os.mkdir(tmp)
    try:
        path = os.path.join(tmp, filename)
        with open(path, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(path, 0o644)
        _fsync_dir(tmp)
        number = max(version_folders(model_dir), default=0) + 1
        os.rename(tmp, os.path.join(model_dir, str(number)))
        _fsync_dir(model_dir)
        return number
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sweep_partial(model_dir: str) -> list[str]:
    """Remove ``.commit-<pid>-*`` folders left by a crash during a commit.

    Only folders whose writer is dead: another instance may be committing right now.
    """
    gone = []
    for n in os.listdir(model_dir):
        if not n.startswith(PARTIAL_PREFIX):
            continue
        pid = n[len(PARTIAL_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and pid_alive(int(pid)):
            continue
        shutil.rmtree(os.path.join(model_dir, n), ignore_errors=True)
        gone.append(n)
    return gone

