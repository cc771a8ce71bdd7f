"""The shm push region, in-process: what WeightClient writes is what the server reads."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest

from weightbundle.client import WeightClient, shm_image_layout
from weightbundle.control import ControlError
from weightbundle.transport import Checkpoint


def _regions(pid: int) -> set[str]:
    return {f for f in os.listdir("/dev/shm") if f.startswith(f"wbpush-{pid}-")}


def test_the_push_region_is_a_safetensors_image_the_server_reads_back_exactly():
    rng = np.random.default_rng(8)
    arrays = {
        "w": rng.standard_normal((33, 7)).astype(np.float32),
        "h": rng.standard_normal(5).astype(np.float16),  # odd byte counts: the next tensor starts unaligned
        "b": rng.standard_normal((3, 2)).astype(ml_dtypes.bfloat16),
        "i": rng.integers(-9, 9, (4,)).astype(np.int64),
        "s": np.array(2.5, np.float32),  # rank 0
    }
    header, start, size = shm_image_layout(arrays)
    assert start % 64 == 0 and len(header) == start and size == start + sum(a.nbytes for a in arrays.values())
    before = _regions(os.getpid())
    c = WeightClient("127.0.0.1:1", "m")  # no server needed to fill a region
    try:
        name = c._fill_region(arrays)
        assert _regions(os.getpid()) - before == {name}
        assert os.stat(f"/dev/shm/{name}").st_mode & 0o777 == 0o600
        with Checkpoint(name, shm=True) as f:
            assert f.names == list(arrays)
            got = f.read(f.names)
        for k, a in arrays.items():
            assert got[k].dtype == a.dtype and got[k].shape == a.shape and got[k].tobytes() == a.tobytes(), k
        # A smaller push reuses the region (a shorter header, stale bytes after the data are ignored)...
        assert c._fill_region({"s": np.array(-1.0, np.float32)}) == name
        with Checkpoint(name, shm=True) as f:
            assert f.names == ["s"] and float(f.read(["s"])["s"]) == -1.0
        # ...a bigger one replaces it, and the old one is gone.
        big = c._fill_region({"w": np.zeros((1024, 1024), np.float32)})
        assert big != name and _regions(os.getpid()) - before == {big}
    finally:
        c.close()
    assert _regions(os.getpid()) == before


def test_a_region_that_is_not_safetensors_is_a_clear_error():
    name = f"wbpush-{os.getpid()}-garbage"
    with open(f"/dev/shm/{name}", "wb") as f:
        f.write(b"\xff" * 64)
    try:
        with pytest.raises(ControlError, match=f"shm region '{name}': not a safetensors file"):
            Checkpoint(name, shm=True)
    finally:
        os.unlink(f"/dev/shm/{name}")


def test_a_client_that_dies_of_an_exception_without_close_leaves_no_region(tmp_path):
    """close() forgotten and an unhandled exception: the interpreter's exit still removes it."""
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from weightbundle.client import WeightClient\n"
        "c = WeightClient('127.0.0.1:1', 'm')\n"
        "print(c._fill_region({'w': np.ones((256, 256), np.float32)}), flush=True)\n"
        "raise SystemExit(3)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 3, p.stderr
    name = p.stdout.strip()
    assert name.startswith("wbpush-") and not os.path.exists(f"/dev/shm/{name}")
