"""fsutil: atomic writes leave nothing half-written, and process-named leftovers are recognised."""

from __future__ import annotations

import os

import pytest

from weightbundle.fsutil import atomic_write, left_by_dead_process, owner_pid


def test_atomic_write_replaces_whole_and_cleans_up_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "f"
    atomic_write(str(p), b"old", durable=True)
    atomic_write(str(p), b"new")
    assert p.read_bytes() == b"new" and os.listdir(tmp_path) == ["f"]

    def fail(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        atomic_write(str(p), b"x" * 100)
    assert p.read_bytes() == b"new" and os.listdir(tmp_path) == ["f"]  # no temp file left


def test_owner_pid_and_dead_leftovers():
    assert owner_pid("weightbundle-123-m-v1", "weightbundle-") == 123
    assert owner_pid(".packing-77.onnx", ".packing-") == 77
    assert owner_pid("weightbundle-abc", "weightbundle-") is None and owner_pid("other", "weightbundle-") is None
    assert not left_by_dead_process(f"weightbundle-{os.getpid()}-m", "weightbundle-")
    assert left_by_dead_process("weightbundle-999999999-m", "weightbundle-")
