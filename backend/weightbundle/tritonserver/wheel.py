"""The real Triton Inference Server in the ``nvidia-pytriton`` wheel: where its files are,
and what a standalone tritonserver needs around them.

``nvidia-pytriton==0.7.0`` contains a tritonserver 2.51 binary, the python backend and
one python-backend stub per CPython minor version.  Using them outside pytriton needs:

* a backend directory of our own: pointing ``--backend-directory`` at the wheel fails
  with "triton_python_backend_stub is not found";
* ``LD_LIBRARY_PATH`` with the wheel's bundled libs and this Python's LIBDIR, otherwise
  the stub cannot load and the server *hangs* loading the model;
* this interpreter's ``bin`` first on ``PATH``, so the stub's embedded Python picks this
  virtualenv as its prefix (numpy, onnxruntime, weightbundle importable).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence
from ..errors import TritonServerError

INSTALL_HINT = "pip install --no-deps nvidia-pytriton==0.7.0"


# Name of the python-based backend: models select it with `backend: "weightbundle"`.
BACKEND_NAME = "weightbundle"


@dataclass(frozen=True)
class TritonPaths:
    """Files of the nvidia-pytriton wheel that a standalone tritonserver needs."""

    tritonserver: str  # the server binary
    python_backend_lib: str  # backends/python/libtriton_python.so
    python_backend_utils: str  # backends/python/triton_python_backend_utils.py
    python_backend_stub: str  # python_backend_stubs/X.Y/triton_python_backend_stub for this Python
    libs_dir: str  # nvidia_pytriton.libs (libtritonserver, libcudart, ...)


def _site_dirs() -> List[str]:
    """Directories that may hold the wheel's top-level entries, most specific first."""
    dirs: List[str] = []
    try:
        # locate_file("") is the site-packages dir the distribution was installed into.
        dirs.append(str(importlib.metadata.distribution("nvidia-pytriton").locate_file("")))
    except importlib.metadata.PackageNotFoundError:
        pass
    # find_spec on a top-level package does not import it (pytriton's own deps may be absent).
    spec = importlib.util.find_spec("pytriton")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        dirs.append(os.path.dirname(loc))
    return list(dict.fromkeys(os.path.abspath(d) for d in dirs))


def _python_version() -> str:
    # The stub embeds libpython X.Y: it must match the interpreter that runs model.py.
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def triton_paths() -> TritonPaths:
    """Locate tritonserver, the python backend and the stub matching this Python."""
    ver = _python_version()
    sites = _site_dirs()
    if not sites:
        raise TritonServerError(f"nvidia-pytriton is not installed in {sys.prefix}; install it with: {INSTALL_HINT}")
    problems = []
    for site in sites:
        root = os.path.join(site, "pytriton", "tritonserver")
        paths = TritonPaths(
            tritonserver=os.path.join(root, "bin", "tritonserver"),
            python_backend_lib=os.path.join(root, "backends", "python", "libtriton_python.so"),
            python_backend_utils=os.path.join(root, "backends", "python", "triton_python_backend_utils.py"),
            python_backend_stub=os.path.join(root, "python_backend_stubs", ver, "triton_python_backend_stub"),
            libs_dir=os.path.join(site, "nvidia_pytriton.libs"),
        )
        missing = [p for p in (paths.tritonserver, paths.python_backend_lib, paths.python_backend_utils) if not os.path.isfile(p)]
        if not os.path.isdir(paths.libs_dir):
            missing.append(paths.libs_dir)
        if missing:
            problems.append(f"incomplete nvidia-pytriton in {site}: missing {', '.join(missing)}")
            continue
        if not os.path.isfile(paths.python_backend_stub):
            have = sorted(os.listdir(os.path.join(root, "python_backend_stubs"))) if os.path.isdir(os.path.join(root, "python_backend_stubs")) else []
            problems.append(
                f"no python_backend stub for Python {ver} in {root}/python_backend_stubs "
                f"(available: {', '.join(have) or 'none'}); use one of those Python versions"
            )
            continue
        return paths
    raise TritonServerError("; ".join(problems) + f". Install a complete copy with: {INSTALL_HINT}")


def _copy_if_changed(src: str, dst: str, mode: Optional[int] = None) -> None:
    """Copy src to dst unless an identical copy (size and mtime) is already there.

    Writes to a temporary name and renames, so a stub executable that a running
    server is using is replaced rather than overwritten (which would fail, ETXTBSY).
    """
    st = os.stat(src)
    try:
        dt = os.stat(dst)
        if dt.st_size == st.st_size and int(dt.st_mtime) == int(st.st_mtime) and (mode is None or dt.st_mode & 0o777 == mode):
            return
    except FileNotFoundError:
        pass
    tmp = f"{dst}.tmp{os.getpid()}.{threading.get_ident()}"
    shutil.copy2(src, tmp)
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, dst)


def prepare_backend_dir(dest: str) -> str:
    """Build a Triton backend directory at ``dest`` and return its absolute path.

    ``dest/python/`` gets the python backend (library, utils, version-matched stub);
    ``dest/weightbundle/model.py`` is the weightbundle python-based backend, copied
    from the package when it exists. Safe to call again on the same directory.
    """
    paths = triton_paths()
    dest = os.path.abspath(dest)
    py_dir = os.path.join(dest, "python")
    os.makedirs(py_dir, exist_ok=True)
    _copy_if_changed(paths.python_backend_lib, os.path.join(py_dir, "libtriton_python.so"))
    _copy_if_changed(paths.python_backend_utils, os.path.join(py_dir, "triton_python_backend_utils.py"))
    _copy_if_changed(paths.python_backend_stub, os.path.join(py_dir, "triton_python_backend_stub"), mode=0o755)

    import weightbundle  # the package this module belongs to; imported lazily to keep import order simple

    model_py = os.path.join(os.path.dirname(weightbundle.__file__), "triton", "model.py")
    if os.path.isfile(model_py):
        wb_dir = os.path.join(dest, BACKEND_NAME)
        os.makedirs(wb_dir, exist_ok=True)
        _copy_if_changed(model_py, os.path.join(wb_dir, "model.py"))
    return dest


def server_env(base: Mapping[str, str] = os.environ) -> Dict[str, str]:
    """Environment for tritonserver: bundled libs on LD_LIBRARY_PATH, this venv first on PATH."""
    env = dict(base)
    paths = triton_paths()

    def prepend(var: str, first: Sequence[Optional[str]]) -> None:
        parts = [p for p in first if p] + [p for p in env.get(var, "").split(os.pathsep) if p]
        env[var] = os.pathsep.join(dict.fromkeys(parts))  # de-duplicate, keep order

    # LIBDIR holds libpython3.X.so that the stub links against (pyenv/conda builds put it there).
    prepend("LD_LIBRARY_PATH", [paths.libs_dir, sysconfig.get_config_var("LIBDIR")])
    # The stub's embedded interpreter finds its prefix via `python3` on PATH; make that this venv.
    prepend("PATH", [os.path.dirname(sys.executable)])
    return env


_FLAG_CACHE: Dict[str, bool] = {}


def _supports_flag(flag: str) -> bool:
    """Whether this tritonserver's --help lists ``flag`` (cached per process)."""
    if flag not in _FLAG_CACHE:
        try:
            out = subprocess.run([triton_paths().tritonserver, "--help"], env=server_env(), capture_output=True, timeout=30).stdout
            _FLAG_CACHE[flag] = flag.encode() in out
        except (OSError, subprocess.SubprocessError):
            _FLAG_CACHE[flag] = False
    return _FLAG_CACHE[flag]
