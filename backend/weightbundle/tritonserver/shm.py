"""What a tritonserver leaves behind, found through /proc and /dev/shm, and its removal.

The python backend creates one shared-memory region per stub in /dev/shm; a server or
stub that is killed cannot remove it, and a killed server cannot remove the weight
stores of its models.  These helpers find which regions a set of processes uses and
sweep what dead processes left.
"""

from __future__ import annotations

import os
import re
import time
from typing import Iterable, List, Optional, Sequence, Set

# Shared-memory regions the python backend creates in /dev/shm, one per stub. A
# python-based backend NAME uses "triton_NAME_backend_shm_region_<uuid>" instead of
# the stock "triton_python_backend_shm_region_<uuid>"; both match this pattern.
SHM_PATTERN = re.compile(r"^triton_.+_backend_shm_region_")


SHM_DIR = "/dev/shm"


def _is_region(name: str, prefixes: Sequence[str] = ()) -> bool:
    return bool(SHM_PATTERN.match(name)) or any(name.startswith(p) for p in prefixes)


def _shm_regions(prefixes: Sequence[str] = ()) -> Set[str]:
    """Python-backend shm regions currently in /dev/shm (names only)."""
    try:
        return {n for n in os.listdir(SHM_DIR) if _is_region(n, prefixes)}
    except FileNotFoundError:
        return set()


def _proc_pids() -> List[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _group_pids(pgid: int) -> List[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    out = []
    for pid in _proc_pids():
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the parenthesised command: state ppid pgrp ...
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] != b"Z":
            out.append(pid)
    return out


def _shm_used_by(pids: Iterable[int], prefixes: Sequence[str] = ()) -> Set[str]:
    """Names of python-backend shm regions that the given processes map or hold open."""
    shm = SHM_DIR + "/"
    used: Set[str] = set()

    def note(path: str) -> None:
        if path.startswith(shm):
            name = path[len(shm) :]
            if _is_region(name, prefixes):
                used.add(name)

    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    i = line.find(shm)
                    if i >= 0:
                        note(line[i:].split()[0])  # drops a trailing "(deleted)"
        except OSError:
            pass
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                note(os.readlink(f"/proc/{pid}/fd/{fd}").split()[0])
            except (OSError, IndexError):
                pass
    return used


def _config_store_roots(model_repository: str) -> Set[str]:
    """The ``store_root`` parameters of the models in a repository (custom weight-store roots)."""
    roots: Set[str] = set()
    try:
        names = os.listdir(model_repository)
    except OSError:
        return roots
    for name in names:
        try:
            with open(os.path.join(model_repository, name, "config.pbtxt"), encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        try:
            from google.protobuf import text_format
            from tritonclient.grpc import model_config_pb2

            cfg = text_format.Parse(text, model_config_pb2.ModelConfig())
            root = cfg.parameters["store_root"].string_value if "store_root" in cfg.parameters else ""
        except Exception:  # noqa: BLE001 - no tritonclient, or a config Triton will refuse anyway
            m = re.search(r'key\s*:\s*"store_root"\s*value\s*:?\s*\{\s*string_value\s*:\s*"([^"]*)"', text)
            root = m.group(1) if m else ""
        if root and os.path.isabs(root):
            roots.add(os.path.normpath(root))
    return roots


def sweep_leftovers(model_repository: Optional[str] = None, *, prefixes: Sequence[str] = (), min_age: float = 2.0) -> List[str]:
    """Remove what dead servers left behind; returns the paths removed.

    * python-backend shm regions in /dev/shm that no live process maps or holds
      open (a SIGKILLed stub cannot unlink its region), owned by this user and not
      modified in the last ``min_age`` seconds (a region being created is mapped
      by its server within microseconds);
    * weight stores ``weightbundle-<pid>-...`` whose server pid is dead, in the
      default root and in every ``store_root`` the repository's configs name.
    """
    removed = sweep_dead_regions(prefixes=prefixes, min_age=min_age)
    from ..store import default_root, sweep_stale

    roots = {default_root()} | (_config_store_roots(model_repository) if model_repository else set())
    for root in sorted(roots):
        removed += [os.path.join(root, n) for n in sweep_stale(root)]
    return removed


def sweep_dead_regions(*, prefixes: Sequence[str] = (), min_age: float = 2.0) -> List[str]:
    """Unlink python-backend shm regions of dead stubs; see sweep_leftovers. Returns the paths."""
    removed: List[str] = []
    now, uid = time.time(), os.getuid()
    candidates = []
    # List first, scan processes second: a region created after the listing is no candidate.
    for name in _shm_regions(prefixes):
        try:
            st = os.stat(os.path.join(SHM_DIR, name))
        except OSError:
            continue
        if st.st_uid == uid and now - max(st.st_mtime, st.st_ctime) >= min_age:
            candidates.append(name)
    if candidates:
        used = _shm_used_by(_proc_pids(), prefixes)
        for name in candidates:
            if name in used:
                continue
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(os.path.join(SHM_DIR, name))
            except OSError:
                pass
    return removed
