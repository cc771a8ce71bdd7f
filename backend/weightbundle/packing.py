"""One pre-packed copy of a weight version, built once, mapped by every instance.

ONNX Runtime pre-packs MatMul/Conv weights when it builds a session (that is what
makes inference run at baked speed), and by default every session keeps a private
packed copy: four instances, four copies.  With
``session.save_external_prepacked_constant_initializers`` ORT can write the optimized
graph plus a data file holding the packed weights; a session created from that
graph (optimization off) memory-maps the packed weights, so every process that loads
it shares one copy of the pages.

The data file also holds a raw copy of every initializer: ORT 1.32 reads it at load
(it packs it again and checks the saved packing against that) and then lets go of
it.  So the pair lives on a *disk-backed* folder (``packed_root()``, /var/tmp by
default), not on tmpfs next to the store: the raw half is then evictable page cache
that no process keeps mapped, and only the packed half stays resident, once.

- Files: ``<packed_root>/<store folder name>/packed-v<N>.onnx`` and ``.data``.
- Exactly one process builds a version, holding an ``flock`` on
  ``.packing-v<N>.lock``; the others wait for the lock and then load what it wrote.
- It is written under hidden ``.packing-<pid>-<rand>.*`` names and renamed into
  place, the ``.onnx`` last: a reader never sees half of one.  A builder killed
  midway leaves hidden files, which the store's sweep removes once its pid is dead.
- Before the rename, a probe inference must give the builder session's exact bytes.
- The store deletes a version's files once a newer version has been packed (until then
  pinned sessions load over them: sessions.py), and the whole
  folder when the store goes (``WeightStore._gc``, ``release``, ``sweep_stale``);
  sessions that still map a deleted file keep its pages until they close.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import uuid
from typing import Callable

from .fsutil import unlink_quiet

PREFIX = "packed-v"
BUILDING = ".packing-"


def model_path(store_path: str, number: int) -> str:
    return os.path.join(store_path, f"{PREFIX}{number}.onnx")


def data_name(number: int) -> str:
    return f"{PREFIX}{number}.data"


def ensure(store_path: str, number: int, build: Callable[[str, str], None], verify: Callable[[str], None]) -> str:
    """Path of version ``number``'s packed model in folder ``store_path``, built here if no
    process has yet.

    ``build(tmp_model_path, data_name)`` writes the pair, ORT's optimized-model output;
    ``verify(tmp_model_path)`` raises if the model must not be used.
    """
    final = model_path(store_path, number)
    if os.path.isfile(final):
        return final
    os.makedirs(store_path, exist_ok=True)
    lock = os.open(os.path.join(store_path, f"{BUILDING}v{number}.lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per version; the rest wait, then reuse
        if os.path.isfile(final):
            return final
        # The graph names its data file, so the data file gets its final name at once; only
        # the .onnx, renamed last, tells a reader the pair is complete.
        tmp_model = os.path.join(store_path, f"{BUILDING}{os.getpid()}-{uuid.uuid4().hex[:8]}.onnx")
        try:
            build(tmp_model, data_name(number))
            verify(tmp_model)
            os.rename(tmp_model, final)
        except BaseException:
            for p in (tmp_model, os.path.join(store_path, data_name(number))):
                unlink_quiet(p)
            raise
        return final
    finally:
        os.close(lock)


def packed_root() -> str:
    """Disk-backed folder for packed models (WEIGHTBUNDLE_PACKED_ROOT overrides it)."""
    root = os.environ.get("WEIGHTBUNDLE_PACKED_ROOT")
    if root:
        return root
    return "/var/tmp" if os.path.isdir("/var/tmp") and os.access("/var/tmp", os.W_OK) else tempfile.gettempdir()


def scratch_prefix() -> str:
    """Name prefix of this process's scratch folders (``compiled.learn``): swept like a
    builder's leftovers once the process is dead."""
    return f"{BUILDING}{os.getpid()}-compile-"


def numbers(names: list[str]) -> list[int]:
    """The versions whose packed model is among file ``names`` (a folder's listing)."""
    stems = [f[len(PREFIX) : -len(".onnx")] for f in names if f.startswith(PREFIX) and f.endswith(".onnx")]
    return [int(n) for n in stems if n.isdigit()]


def is_building_leftover(name: str) -> bool:
    return name.startswith(BUILDING) and not name.endswith(".lock")
