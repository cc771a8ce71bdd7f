"""Small filesystem helpers shared by the store, packing, builds and the launcher.

- ``atomic_write``: a file appears whole or not at all (temp name, optional fsync, rename);
- ``unlink_quiet`` / ``fsync_dir``;
- ``pid_alive`` and ``owner_pid``: files and folders of a process are named
  ``<prefix><pid>-<rest>``, so leftovers of a dead process can be told from live ones.
"""

from __future__ import annotations

import os
import tempfile


def unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes | memoryview, *, durable: bool = False, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` so that a reader (or a crash) sees the old file or the new
    one, never half of one.  ``durable``: fsync the file and its folder (survives power
    loss), for files on disk; tmpfs needs only the rename.  ``mode``: permission bits
    (default: 0666 less the umask, like a plain ``open``)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask  # mkstemp's 0600 would hide the file from a server running as another user
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # ENOSPC and friends: the temp file must not keep the space
        unlink_quiet(tmp)
        raise
    if durable:
        fsync_dir(folder)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_pid(name: str, prefix: str) -> int | None:
    """The pid in ``<prefix><pid>-...`` (or ``<prefix><pid>``), else None."""
    if not name.startswith(prefix):
        return None
    head = name[len(prefix) :].split("-", 1)[0].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def left_by_dead_process(name: str, prefix: str) -> bool:
    """True for ``<prefix><pid>-...`` names whose pid is no longer alive."""
    pid = owner_pid(name, prefix)
    return pid is not None and not pid_alive(pid)
