"""The benchmarks run in their quick modes so they cannot rot (figures are not asserted:
speed targets live in the benchmarks' own reports, not in timed tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools")


def _run(script: str, out: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(TOOLS, script), "--quick", "--out", out], capture_output=True, text=True, timeout=timeout)


def test_core_benchmark_quick(tmp_path):
    p = _run("bench_core.py", str(tmp_path), 300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "| model | mode |" in p.stdout
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert data  # raw numbers written


def test_gpu_benchmark_quick_on_the_cpu_device(tmp_path):
    # No GPU in CI: the same machinery on ORT's CPU device (resident weights, views, the update stream).
    p = subprocess.run(
        [sys.executable, os.path.join(TOOLS, "bench_gpu.py"), "--quick", "--device", "cpu", "--reps", "2", "--runs", "5", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    data = json.loads((tmp_path / "gpu.json").read_text())
    mlp = next(r for r in data["results"] if r["model"] == "mlp")
    assert mlp["bitwise_two_bundles"] and mlp["under_updates"]["torn"] == 0 and mlp["under_updates"]["failed"] == 0


@pytest.mark.e2e
def test_serving_benchmark_quick(tmp_path):
    p = _run("bench_serving.py", str(tmp_path), 600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for section in ("P1", "P2", "P3", "P4"):
        assert section in p.stdout
    assert (tmp_path / "results.json").exists() and (tmp_path / "results.md").exists()


@pytest.mark.e2e
def test_real_architectures_benchmark_quick(tmp_path):
    p = _run("bench_real.py", str(tmp_path), 600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "| conv-quick |" in p.stdout and "| transformer-quick |" in p.stdout
    data = json.loads((tmp_path / "bench_real.json").read_text())
    assert not data["leaks"] and all(r["reload_over_update"] > 0 for r in data["results"])


@pytest.mark.e2e
def test_fleet_benchmark_quick(tmp_path):
    p = _run("bench_fleet.py", str(tmp_path), 600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "fleet push" in p.stdout and "Triton reloads" in p.stdout
    assert (tmp_path / "bench_fleet.json").exists() and (tmp_path / "bench_fleet.md").exists()
