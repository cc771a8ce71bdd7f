"""Server side of the file transport: read weights from an allowlisted safetensors file.

The command names a path; the model config names the directories it may lie in
(``file_update_dirs``, colon-separated). The path is resolved with every symlink
followed, and it must still lie inside an allowed directory. ``..`` components
are refused outright, so the error says why.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from .control import ControlError


def resolve_allowed(path: Any, allowed_dirs: Sequence[str]) -> str:
    if not allowed_dirs:
        raise ControlError("file updates are disabled for this model: set parameter file_update_dirs to allowlist directories")
    if not isinstance(path, str) or not path:
        raise ControlError("'source.file' must be a non-empty path string")
    if "\x00" in path or ".." in path.replace("\\", "/").split("/"):
        raise ControlError(f"path {path!r} contains '..' or a NUL byte; give a path inside {list(allowed_dirs)}")
    if not os.path.isabs(path):
        raise ControlError(f"path {path!r} must be absolute")
    real = os.path.realpath(path)
    for d in allowed_dirs:
        root = os.path.realpath(d)
        if os.path.commonpath([real, root]) == root and real != root:
            if not os.path.isfile(real):
                raise ControlError(f"weights file {path!r} does not exist or is not a regular file")
            return real
    raise ControlError(f"path {path!r} (resolves to {real!r}) is outside the allowed directories {list(allowed_dirs)}")


_ST_DTYPES = {"F16": "float16", "F32": "float32", "F64": "float64", "I8": "int8", "I16": "int16", "I32": "int32",
              "I64": "int64", "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool"}


def read_safetensors(path: str, only: Sequence[str] | None) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file as read-only views of a memory map (no copy).

    ``only`` picks a subset; the caller keeps every other weight.  The safetensors
    library validates the file first (header, offsets, overlaps); we then map the
    data instead of copying it out, which saves a copy of every pushed byte.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="np") as f:  # validation only: reads the header
            names = list(f.keys())
        wanted = list(only) if only else names
        missing = sorted(set(wanted) - set(names))
        if missing:
            raise ControlError(f"weights file {path!r} has no tensor(s) {missing[:10]}")
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        out = {}
        data = np.memmap(path, dtype=np.uint8, mode="r") if wanted else None
        for name in wanted:
            e = header[name]
            if e["dtype"] not in _ST_DTYPES:
                raise ControlError(f"weights file {path!r}: tensor {name!r} has dtype {e['dtype']}, which weightbundle cannot load")
            begin, end = e["data_offsets"]
            out[name] = data[8 + n + begin : 8 + n + end].view(_ST_DTYPES[e["dtype"]]).reshape(e["shape"])
        return out
    except SafetensorError as e:
        raise ControlError(f"weights file {path!r} is not a valid safetensors file: {e}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ControlError(f"cannot read weights file {path!r}: {e}") from None
