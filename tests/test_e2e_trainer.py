"""Issue 9 end to end: a trainer's state_dict refreshes a model served by a real tritonserver.

The transformer fixture, exported by TorchScript with default flags (anonymous transposed
weights, deduplicated LayerNorm params), built with ``--checkpoint``; the trained
state_dict pushed via ``file`` and ``shm`` serves torch's outputs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import weightbundle as wb
from triton_util import SECRET, SECRET_ENV, running
from weightbundle.client import CommandError, WeightClient
from weightbundle.modelconfig import make_config

pytestmark = pytest.mark.e2e
FIX = os.path.join(os.path.dirname(__file__), "fixtures", "torch")
BEFORE = load_file(os.path.join(FIX, "transformer.before.safetensors"))
AFTER = load_file(os.path.join(FIX, "transformer.after.safetensors"))
IO = load_file(os.path.join(FIX, "transformer.io.safetensors"))


def close(got: np.ndarray, want: np.ndarray) -> None:
    scale = max(float(np.abs(want).max()), 1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)


def save_bf16(path: str, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors file with BF16 tensors (safetensors.numpy cannot write them: relabel U16)."""
    save_file({k: v.astype(ml_dtypes.bfloat16).view(np.uint16) for k, v in tensors.items()}, path)
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    hdr = raw[8 : 8 + n].replace(b'"U16"', b'"BF16"')
    with open(path, "wb") as f:
        f.write(len(hdr).to_bytes(8, "little") + hdr + raw[8 + n :])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    allowed = root / "allowed"
    allowed.mkdir()
    repo = root / "repo"
    d = repo / "tf" / "1"
    d.mkdir(parents=True)
    path = str(d / "model.bundle")
    wb.save_bundle(path, wb.build_bundle(wb.convert(os.path.join(FIX, "transformer.ts.onnx"), checkpoint=BEFORE)))
    with wb.Bundle.load_from_file(path) as b:
        text = make_config(
            b, "tf", 0, 2, parameters={"allow_updates": "true", "update_secret_env": SECRET_ENV, "file_update_dirs": str(allowed), "reject_nonfinite": "true"}
        )
    (repo / "tf" / "config.pbtxt").write_text(text)
    with running(str(repo)) as srv:
        yield srv, allowed


@pytest.fixture
def client(env):
    srv, _ = env
    with WeightClient(srv.http_url, "tf", secret=SECRET) as c:
        c.reset()
        yield c


def served(c: WeightClient) -> np.ndarray:
    return c.infer({"x": IO["x"]})[0]["y"]


def test_config_declares_the_trainers_tensors(client):
    assert set(client.signature()["weights"]) == set(BEFORE)
    close(served(client), IO["y_before"])


@pytest.mark.parametrize("via", ["file", "shm"])
def test_trained_state_dict_serves_what_torch_computes(env, client, via):
    _, allowed = env
    if via == "file":
        p = str(allowed / "step-3.safetensors")
        save_file(AFTER, p)
        r = client.push_file(p, via="file", require_all=True)
    else:
        r = client.update(AFTER, via="shm", require_all=True)
    assert sorted(r.updated) == sorted(AFTER) and r.ignored == []
    for _ in range(4):  # two instances: both serve the new version
        close(served(client), IO["y_after"])
    client.rollback()
    close(served(client), IO["y_before"])


def test_strict_push_refuses_unknown_names_and_changes_nothing(env, client):
    _, allowed = env
    before = client.status()["checksums"]
    extra = dict(AFTER, **{"enc.num_batches_tracked": np.array(3, np.int64)})
    p = str(allowed / "extra.safetensors")
    save_file(extra, p)
    for push in (lambda: client.push_file(p, via="file"), lambda: client.update(extra, via="shm")):
        with pytest.raises(CommandError, match="enc.num_batches_tracked"):
            push()
    assert client.status()["checksums"] == before
    r = client.push_file(p, via="file", strict=False)
    assert r.ignored == ["enc.num_batches_tracked"] and "ignored 1" in r.summary()
    close(served(client), IO["y_after"])
    out = subprocess.run(
        [sys.executable, "-m", "weightbundle.cli", "push", env[0].http_url, "tf", p, "--via", "file", "-q"],
        env=dict(os.environ, WEIGHTBUNDLE_SECRET=SECRET),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and "enc.num_batches_tracked" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "weightbundle.cli", "push", env[0].http_url, "tf", p, "--via", "file", "-q", "--no-strict", "--require-all"],
        env=dict(os.environ, WEIGHTBUNDLE_SECRET=SECRET),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "updated 17" in out.stdout and "ignored 1 (not update inputs): enc.num_batches_tracked" in out.stdout


def test_bf16_checkpoint_via_file_and_nan_refused(env, client):
    _, allowed = env
    before = client.status()["checksums"]
    bad = {k: v.copy() for k, v in AFTER.items()}
    bad["head.weight"][1, 1] = np.nan
    p_bad = str(allowed / "nan.safetensors")
    save_bf16(p_bad, bad)
    with pytest.raises(CommandError, match="head.weight.*NaN"):
        client.push_file(p_bad, via="file")
    assert client.status()["checksums"] == before
    p = str(allowed / "bf16.safetensors")
    save_bf16(p, AFTER)
    client.push_file(p, via="file")
    y_bf16 = served(client)
    client.update({k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in AFTER.items()}, via="shm")
    np.testing.assert_allclose(served(client), y_bf16, rtol=1e-6, atol=1e-6)  # the server's in-graph cast is exact
    scale = float(np.abs(IO["y_after"]).max())
    np.testing.assert_allclose(y_bf16, IO["y_after"], rtol=5e-2, atol=5e-2 * scale)  # BF16 rounding of the weights


def test_commit_writes_a_bundle_with_the_trainers_update_inputs(env, client):
    from weightbundle import format as fmt

    client.update({"enc.self_attn.in_proj_weight": AFTER["enc.self_attn.in_proj_weight"]}, via="request")
    r = client.commit()
    layout = fmt.decode(open(r["path"], "rb").read())
    assert [s.name for s in layout.sources] == [s for s in BEFORE]  # safetensors order = checkpoint order
    assert any(d == ["enc.self_attn.in_proj_weight"] for d in layout.derived.values())
    with wb.Bundle.load_from_file(r["path"]) as b:
        b.init()
        partial = {k: v for k, v in BEFORE.items() if k != "enc.self_attn.in_proj_weight"}
        b.update(partial)
        y = b.infer({"x": IO["x"]})[0]["y"]
    assert not np.allclose(y, IO["y_before"])  # the committed in_proj_weight is the pushed one
