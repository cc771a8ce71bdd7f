"""Server side of the file and shm transports: read weights from a safetensors file.

``file``: a file in an allowlisted directory.  ``shm``: a region a client on this host
wrote in ``/dev/shm``, named ``wbpush-*`` (see ``open_shm_region``); the server reads it
itself, so the weights do not pass through Triton's inputs.

The command names a path; the model config names the directories it may lie in
(``file_update_dirs``, colon-separated).  The file is opened *once*, and everything
after that works on the descriptor, so nothing can be swapped in between a check and
a read:

- the path is resolved relative to the allowed directory with ``openat2`` and
  ``RESOLVE_BENEATH`` (relative symlinks inside the directory work; anything that
  leaves it fails), or, on kernels without ``openat2``, by walking the components
  with ``O_NOFOLLOW`` (no symlinks at all);
- ``O_NONBLOCK`` keeps a FIFO from blocking the open, and ``fstat`` on the
  descriptor refuses anything but a regular file;
- tensors are copied out with ``pread`` (never memory-mapped: a file truncated under
  a mapping kills the reader with SIGBUS), and a file whose size or mtime changed
  while it was read is refused: a trainer must write a new file and rename it.

Paths travel as UTF-8 bytes, whatever the process's filesystem encoding (Triton's
python stub may run with an ASCII one).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import stat
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np

from .control import ControlError
from .format import raw_bytes

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
_T = TypeVar("_T")

ST_DTYPES = {
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
}


def _np_dtype(st: str) -> np.dtype:
    if st == "BF16":
        import ml_dtypes  # onnx depends on it

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(ST_DTYPES[st])


def st_dtype(dtype: np.dtype) -> str:
    """safetensors' name for a numpy dtype (the inverse of ``_np_dtype``)."""
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        return "BF16"
    for st, name in ST_DTYPES.items():
        if dtype == np.dtype(name):
            return st
    raise ValueError(f"dtype {dtype} has no safetensors name")


# -- opening ------------------------------------------------------------------------------------
_SYS_OPENAT2 = 437  # the same number on every Linux architecture (added in 5.6)
_RESOLVE_NO_MAGICLINKS, _RESOLVE_BENEATH = 0x02, 0x08
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc: Any = None


def _openat2_beneath(dirfd: int, rel: bytes) -> int:
    """fd of ``rel`` resolved inside ``dirfd`` only; raises OSError (ENOSYS without openat2)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    how = _OpenHow(_OPEN_FLAGS, 0, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(rel), ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(fd)


def _walk_nofollow(dirfd: int, rel: bytes) -> int:
    """Fallback: open each component with O_NOFOLLOW relative to the previous one."""
    parts = [p for p in rel.split(b"/") if p]
    fd = os.dup(dirfd)
    try:
        for p in parts[:-1]:
            nxt = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(parts[-1], _OPEN_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
    finally:
        os.close(fd)


def open_allowed(path: Any, allowed_dirs: Sequence[str]) -> int:
    """Open ``path`` for reading if it lies inside one of ``allowed_dirs``; return the fd.

    Every refusal is a ``ControlError`` that says why.  The caller closes the fd.
    """
    if not allowed_dirs:
        raise ControlError("file updates are disabled for this model: set parameter file_update_dirs to allowlist directories")
    if not isinstance(path, str) or not path:
        raise ControlError("'source.file' must be a non-empty path string")
    if "\x00" in path or ".." in path.replace("\\", "/").split("/"):
        raise ControlError(f"path {path!r} contains '..' or a NUL byte; give a path inside {list(allowed_dirs)}")
    if not path.startswith("/"):
        raise ControlError(f"path {path!r} must be absolute")
    try:
        want = os.path.normpath(path).encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ControlError(f"path {path!r} is not valid UTF-8") from None
    for d in allowed_dirs:
        db = d.encode("utf-8", "surrogateescape")
        for root in dict.fromkeys((os.path.normpath(db), os.path.realpath(db))):
            prefix = root.rstrip(b"/") + b"/"
            if not want.startswith(prefix) or want == prefix.rstrip(b"/"):
                continue
            rel = want[len(prefix) :]
            try:
                dirfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                raise ControlError(f"allowed directory of this model cannot be opened: {e.strerror}") from None
            try:
                try:
                    fd = _openat2_beneath(dirfd, rel)
                except OSError as e:
                    if e.errno not in (errno.ENOSYS, errno.EPERM):  # EPERM: a seccomp filter that blocks openat2
                        raise
                    fd = _walk_nofollow(dirfd, rel)
            except OSError as e:
                raise ControlError(_open_error(path, e, allowed_dirs)) from None
            finally:
                os.close(dirfd)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise ControlError(f"weights file {path!r} is not a regular file")
            return fd
    raise ControlError(f"path {path!r} is outside the allowed directories {list(allowed_dirs)}")


SHM_DIR = "/dev/shm"
SHM_PUSH_PREFIX = "wbpush-"
_SHM_NAME = re.compile(r"wbpush-[A-Za-z0-9_-]{1,120}")


def open_shm_region(name: Any) -> int:
    """Open a client's push region ``/dev/shm/<name>`` for reading; return the fd.

    Only names of the client's pattern (``wbpush-`` plus letters, digits, ``_``, ``-``)
    are opened, never through a symlink, and only a regular file: a command cannot
    point the server at a weight store, a Triton region or anything outside /dev/shm.
    """
    if not isinstance(name, str) or not _SHM_NAME.fullmatch(name):
        raise ControlError(f"'source.shm' must name a client push region: {SHM_PUSH_PREFIX}<letters, digits, _ or ->, got {name!r:.80}")
    try:
        fd = os.open(os.path.join(SHM_DIR, name), _OPEN_FLAGS | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise ControlError(
                f"shm region {name!r} does not exist in {SHM_DIR} on the server's host; via='shm' needs the client on that host, sharing /dev/shm"
            ) from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise ControlError(f"shm region {name!r} is not readable by the server (it runs as another user); use via='request' or 'file'") from None
        raise ControlError(f"cannot open shm region {name!r}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ControlError(f"shm region {name!r} is not a regular file")
    return fd


def _open_error(path: str, e: OSError, allowed: Sequence[str]) -> str:
    if e.errno == errno.EXDEV:
        return f"path {path!r} leads outside the allowed directories {list(allowed)} (through a symlink or a mount)"
    if e.errno == errno.ELOOP:
        return f"path {path!r} goes through a symlink that cannot be followed safely"
    if e.errno == errno.ENOENT:
        return f"weights file {path!r} does not exist"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"weights file {path!r} is not readable by the server"
    return f"cannot open weights file {path!r}: {e.strerror}"


# -- reading ------------------------------------------------------------------------------------
def _pread_exact(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise ControlError("weights file ended early: it was truncated, or is being written while it is read")
        done += n


def safetensors_header(fd: int, size: int) -> tuple[dict[str, dict[str, Any]], int]:
    """Validated safetensors header of an open file: ({name: entry}, data start offset).

    Checks what a reader must be able to trust: header bounds, known dtypes, shapes,
    and data offsets that lie inside the file, match the shape and do not overlap.
    """
    if size < 8:
        raise ControlError("not a safetensors file: shorter than its 8-byte header length")
    raw = bytearray(8)
    _pread_exact(fd, memoryview(raw), 0)
    n = int.from_bytes(raw, "little")
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise ControlError(f"not a safetensors file: header length {n} does not fit the file ({size} bytes)")
    text = bytearray(n)
    _pread_exact(fd, memoryview(text), 8)
    try:
        header = json.loads(bytes(text).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ControlError("not a safetensors file: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ControlError("not a safetensors file: its header is not a JSON object")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    spans = []
    for name, e in header.items():
        try:
            dtype = _np_dtype(e["dtype"])
            shape = [int(d) for d in e["shape"]]
            begin, end = (int(x) for x in e["data_offsets"])
            if any(d < 0 for d in shape) or any(not isinstance(d, int) or isinstance(d, bool) for d in e["shape"]):
                raise ValueError
        except (KeyError, TypeError, ValueError, ImportError):
            raise ControlError(f"safetensors header entry {name!r:.80} is malformed or has an unsupported dtype") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not 0 <= begin <= end <= data_len or end - begin != nbytes:
            raise ControlError(
                f"safetensors tensor {name!r:.80}: data offsets [{begin}, {end}] do not fit its shape {shape} and dtype, or lie outside the file"
            )
        spans.append((begin, end, name))
    spans.sort()
    for (_b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ControlError(f"safetensors tensors {n0!r:.80} and {n1!r:.80} overlap")
    return header, 8 + n


def read_tensors(fd: int, header: dict[str, dict[str, Any]], start: int, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Copy the named tensors of a validated file (``safetensors_header``) out with ``pread``."""
    out = {}
    for name in names:
        entry = header[name]
        arr = np.empty([int(d) for d in entry["shape"]], _np_dtype(entry["dtype"]))
        _pread_exact(fd, raw_bytes(arr), start + int(entry["data_offsets"][0]))
        out[name] = arr
    return out


class Checkpoint:
    """An allowlisted safetensors file, opened once with its header validated; tensors are
    copied out with ``pread``, into new arrays (``read``) or into buffers the caller owns
    (``read_into``: e.g. straight into the store's staging blob).

    >>> with Checkpoint("/ckpt/step-100.safetensors", ["/ckpt"]) as f:  # doctest: +SKIP
    ...     tensors = f.read(f.names)
    """

    def __init__(self, path: Any, allowed_dirs: Sequence[str] = (), *, shm: bool = False):
        """``shm``: ``path`` is the name of a client's ``wbpush-*`` region in /dev/shm."""
        self.path = path
        self.what = f"shm region {path!r}" if shm else f"weights file {path!r}"
        self._fd = open_shm_region(path) if shm else open_allowed(path, allowed_dirs)
        try:
            try:
                self._before = os.fstat(self._fd)
                self._header, self._start = safetensors_header(self._fd, self._before.st_size)
            except ControlError as e:
                raise ControlError(f"{self.what}: {e}") from None
            except OSError as e:
                raise ControlError(f"cannot read {self.what}: {e.strerror}") from None
        except BaseException:
            os.close(self._fd)
            raise

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        os.close(self._fd)

    @property
    def names(self) -> list[str]:
        return list(self._header)

    def spec(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        """(dtype, shape) of tensor ``name``."""
        e = self._header[name]
        return _np_dtype(e["dtype"]), tuple(int(d) for d in e["shape"])

    def check(self, wanted: Sequence[str]) -> None:
        missing = sorted(set(wanted) - set(self._header))
        if missing:
            raise ControlError(f"{self.what} has no tensor(s) {missing[:10]}")

    def read(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The named tensors as new arrays; the file must not have changed meanwhile."""
        self.check(names)
        out = self._io(lambda: read_tensors(self._fd, self._header, self._start, names))
        self.check_unchanged()
        return out

    def read_into(self, dest: Mapping[str, np.ndarray]) -> None:
        """Copy each named tensor into ``dest[name]`` (C-contiguous, the tensor's size in
        bytes); then check that the file did not change meanwhile."""
        self.check(list(dest))
        for name, out in dest.items():
            b = raw_bytes(out)
            e = self._header[name]
            begin, end = (int(x) for x in e["data_offsets"])
            if len(b) != end - begin:
                raise ValueError(f"buffer for {name!r} holds {len(b)} bytes, the tensor {end - begin}")
            try:
                _pread_exact(self._fd, b, self._start + begin)
            except OSError as e:
                raise ControlError(f"cannot read {self.what}: {e.strerror}") from None
        self.check_unchanged()

    def check_unchanged(self) -> None:
        # Size and mtime, not ctime: renaming a new checkpoint over this one unlinks it, which
        # changes its ctime, yet what we read stays whole and valid.
        after = self._io(lambda: os.fstat(self._fd))
        if (after.st_size, after.st_mtime_ns) != (self._before.st_size, self._before.st_mtime_ns):
            raise ControlError(f"{self.what} changed while it was read; write each checkpoint to a new file and rename it into place")

    def _io(self, f: Callable[[], _T]) -> _T:
        try:
            return f()
        except OSError as e:
            raise ControlError(f"cannot read {self.what}: {e.strerror}") from None


def read_allowed_safetensors(path: Any, allowed_dirs: Sequence[str], only: Sequence[str] | None) -> dict[str, np.ndarray]:
    """Tensors of an allowlisted safetensors file, copied into memory with ``pread``.

    ``only`` picks a subset; the caller keeps every other weight.
    """
    with Checkpoint(path, allowed_dirs) as f:
        return f.read(list(only) if only else f.names)
