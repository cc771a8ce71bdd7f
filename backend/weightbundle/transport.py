"""Server side of the file transport: read weights from an allowlisted safetensors file.

The command names a path; the model config names the directories it may lie in
(``file_update_dirs``, colon-separated). The path is resolved with every symlink
followed, and it must still lie inside an allowed directory. ``..`` components
are refused outright, so the error says why.
"""
from __future__ import annotations

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


def read_safetensors(path: str, only: Sequence[str] | None) -> dict[str, np.ndarray]:
    """Tensors from a safetensors file; ``only`` picks a subset (all others are kept)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="np") as f:
            names = list(f.keys())
            wanted = list(only) if only else names
            missing = sorted(set(wanted) - set(names))
            if missing:
                raise ControlError(f"weights file {path!r} has no tensor(s) {missing[:10]}")
            return {n: f.get_tensor(n) for n in wanted}
    except SafetensorError as e:
        raise ControlError(f"weights file {path!r} is not a valid safetensors file: {e}") from None
    except (OSError, ValueError) as e:
        raise ControlError(f"cannot read weights file {path!r}: {e}") from None
