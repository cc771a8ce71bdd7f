"""Run the real tritonserver from the ``nvidia-pytriton`` wheel (the launcher).

- ``wheel``: where the server, the python backend and the stubs are; the backend
  directory and environment a standalone server needs;
- ``shm``: shared-memory regions and weight stores that dead servers left, and their sweep;
- ``process``: ``TritonServer``, one server process from start to a clean stop.

``weightbundle serve`` (cli.py) is the foreground command built on these.
"""

from .process import HOST, MODEL_CONTROL_MODES, STUB_DEATH_POLICIES, StubInfo, TritonServer, TritonServerError, free_port
from .shm import SHM_PATTERN, sweep_dead_regions, sweep_leftovers
from .wheel import BACKEND_NAME, INSTALL_HINT, TritonPaths, prepare_backend_dir, server_env, triton_paths

__all__ = [
    "BACKEND_NAME",
    "HOST",
    "INSTALL_HINT",
    "MODEL_CONTROL_MODES",
    "SHM_PATTERN",
    "STUB_DEATH_POLICIES",
    "StubInfo",
    "TritonPaths",
    "TritonServer",
    "TritonServerError",
    "free_port",
    "prepare_backend_dir",
    "server_env",
    "sweep_dead_regions",
    "sweep_leftovers",
    "triton_paths",
]
