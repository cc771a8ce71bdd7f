"""A fleet of three real tritonservers on loopback and a real S3 server (SeaweedFS), no mocks.

The servers are shared by the tests of this module, which run in order and build on
each other's versions (1, 2, then a failed 3, rollback to 4, a killed push of 5).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack

import numpy as np
import pytest
import tritonclient.http as httpclient
from safetensors.numpy import save_file

from weightbundle import zoo
from s3_util import ACCESS_KEY, SECRET_KEY, running_seaweed
from triton_util import SECRET, control, make_repo, result, running, version
from weightbundle import fleet
from weightbundle import objectstore as osx

pytestmark = pytest.mark.e2e
MODEL = zoo.mlp(sizes=(16, 64, 8))
X = np.random.default_rng(21).standard_normal((3, 16)).astype(np.float32)
N_SERVERS = 3


def weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(v.shape) * 0.5).astype(np.float32) for k, v in zoo.initializers(MODEL).items()}


W1 = weights(1)
W2 = dict(W1, **{"fc1.weight": weights(2)["fc1.weight"]})  # a delta: one tensor changed
W3 = weights(3)


def ref(w: dict[str, np.ndarray]) -> np.ndarray:
    return zoo.ort_run(zoo.with_weights(MODEL, w), {"x": X})["y"]


REFS: dict[int, np.ndarray] = {}  # version -> expected output, filled as versions are pushed


def close(y: np.ndarray, want: np.ndarray) -> bool:
    return bool(np.allclose(y, want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max())))


class Fleet:
    def __init__(self, tmp: str, s3, bucket: str):
        self.tmp, self.s3, self.bucket = tmp, s3, bucket
        self.stack = ExitStack()
        self.servers: list = []
        self.repos: list[str] = []
        try:
            for i in range(N_SERVERS):  # server 0 runs two instances: activation reaches both
                repo = os.path.join(tmp, f"repo{i}")
                make_repo(
                    repo,
                    "m",
                    MODEL,
                    instances=2 if i == 0 else 1,
                    s3_endpoint=s3.endpoint,
                    s3_allowed_prefixes=f"{bucket}/fleet",
                    weights_source=f"s3://{bucket}/fleet/m",
                )
                self.repos.append(repo)
                self.servers.append(self.stack.enter_context(running(repo)))
        except BaseException:
            self.stack.close()
            raise

    @property
    def urls(self) -> list[str]:
        return [f"127.0.0.1:{s.http_port}" for s in self.servers]

    def restart(self, i: int):
        self.servers[i] = self.stack.enter_context(running(self.repos[i]))


@pytest.fixture(scope="module")
def fl(tmp_path_factory):
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)  # the servers inherit them
    try:
        with running_seaweed() as s3:
            f = Fleet(str(tmp_path_factory.mktemp("fleet")), s3, s3.bucket())
            with f.stack:
                yield f
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def publish(fl: Fleet, w: dict[str, np.ndarray], n: int, delta_from: int | None = None) -> osx.PublishResult:
    path = os.path.join(fl.tmp, f"ckpt-{n}.safetensors")
    save_file(w, path)
    return osx.publish(fl.s3.client(), path, osx.parse_url(f"s3://{fl.bucket}/fleet"), "m", n, delta_from)


def round_robin(fl: Fleet, n: int) -> list[tuple[int, np.ndarray]]:
    """The load balancer: request i goes to server i mod N."""
    clients = [httpclient.InferenceServerClient(u) for u in fl.urls]
    out = []
    for i in range(n):
        x = httpclient.InferInput("x", list(X.shape), "FP32")
        x.set_data_from_numpy(X)
        r = clients[i % len(clients)].infer("m", [x])
        out.append((version(r), r.as_numpy("y")))
    return out


def status(url: str) -> dict:
    c = httpclient.InferenceServerClient(url)
    return result(c.infer("m", [control(httpclient, {"op": "status", "secret": SECRET}, False)]))


def test_push_stages_everywhere_then_activates(fl):
    pub = publish(fl, W1, 1)
    assert pub.parent is None
    rep = fleet.push(fl.urls, "m", 1, f"s3://{fl.bucket}/fleet", secret=SECRET, deadline=60, s3=fl.s3.client())
    REFS[1] = ref(W1)
    assert rep.ok and rep.active_written and all(s.before == 0 and s.after == 1 and s.stage_ms and s.activate_ms is not None for s in rep.servers), rep.table()
    assert len({s.digest for s in rep.servers}) == 1
    got = round_robin(fl, 12)
    assert all(v == 1 and close(y, REFS[1]) for v, y in got)
    c0 = httpclient.InferenceServerClient(fl.urls[0])  # two instances: both serve the activated version
    for _ in range(8):
        x = httpclient.InferInput("x", list(X.shape), "FP32")
        x.set_data_from_numpy(X)
        r = c0.infer("m", [x])
        assert version(r) == 1 and close(r.as_numpy("y"), REFS[1])
    assert osx.read_active(fl.s3.client(), osx.parse_url(f"s3://{fl.bucket}/fleet/m")).version == 1
    again = fleet.push(fl.urls, "m", 1, f"s3://{fl.bucket}/fleet", secret=SECRET, s3=fl.s3.client())
    assert all(s.skipped for s in again.servers)  # a re-run is harmless


def test_readers_during_a_delta_switch_see_labelled_versions_only(fl):
    pub = publish(fl, W2, 2, delta_from=1)
    nbytes = W2["fc1.weight"].nbytes
    assert nbytes <= pub.uploaded_bytes < nbytes + 1024  # only the changed tensor travelled
    REFS[2] = ref(W2)
    stop, seen, bad = threading.Event(), [], []

    def reader(k: int) -> None:
        clients = [httpclient.InferenceServerClient(u) for u in fl.urls]  # gevent clients stay in their thread
        for i in itertools.count(k):
            if stop.is_set():
                return
            x = httpclient.InferInput("x", list(X.shape), "FP32")
            x.set_data_from_numpy(X)
            r = clients[i % N_SERVERS].infer("m", [x])
            v, y = version(r), r.as_numpy("y")
            seen.append(v)
            if v not in (1, 2) or not close(y, REFS[v]):
                bad.append((v, y))

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(2)]
    [t.start() for t in threads]
    try:
        time.sleep(0.3)
        env = dict(os.environ, WEIGHTBUNDLE_SECRET=SECRET)
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "weightbundle.cli",
                "fleet",
                "push",
                "--servers",
                ",".join(fl.urls),
                "--model",
                "m",
                "--version",
                "2",
                "--from",
                f"s3://{fl.bucket}/fleet",
                "--endpoint",
                fl.s3.endpoint,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 0, cli.stderr + cli.stdout
        after = len(seen)
        time.sleep(0.3)
    finally:
        stop.set()
        [t.join() for t in threads]
    assert "activate" in cli.stdout and "fleet at version 2" in cli.stdout
    for line in cli.stdout.splitlines()[1 : 1 + N_SERVERS]:  # only the changed tensor was fetched by each server
        kib = re.search(r"(\d+\.\d) KiB", line)
        assert kib and nbytes <= float(kib.group(1)) * 1024 + 52 < nbytes + 1100, cli.stdout
    assert not bad, bad[:3]
    assert 1 in seen[:after] and set(seen[after:]) == {2}, (seen[:5], seen[after : after + 5])
    assert all(v == 2 and close(y, REFS[2]) for v, y in round_robin(fl, 9))


def test_corrupt_object_fails_on_every_server_and_nothing_changes(fl):
    c = fl.s3.client()
    publish(fl, W3, 3)
    before = [status(u)["checksums"] for u in fl.urls]
    m = osx.read_manifest(c, osx.parse_url(f"s3://{fl.bucket}/fleet/m"), 3)
    key = f"fleet/m/{next(iter(m['objects']))}"
    data = bytearray(c.get_object(Bucket=fl.bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01
    c.put_object(Bucket=fl.bucket, Key=key, Body=bytes(data))
    with pytest.raises(fleet.FleetError) as ei:
        fleet.push(fl.urls, "m", 3, f"s3://{fl.bucket}/fleet", secret=SECRET, s3=c)
    rep = ei.value.report
    assert rep.aborted and not rep.active_written
    assert all("failed verification" in (s.error or "") for s in rep.servers), rep.table()
    for u, b in zip(fl.urls, before):
        st = status(u)
        assert st["version"] == 2 and st["staged"] == [] and st["checksums"] == b
    assert osx.read_active(c, osx.parse_url(f"s3://{fl.bucket}/fleet/m")).version == 2
    # a manifest that does not fit the model (a tensor it does not have): refused by every server
    bad = dict(m, tensors={**m["tensors"], "fc9.weight": next(iter(m["tensors"].values()))})
    c.put_object(Bucket=fl.bucket, Key="fleet/m/v3/manifest.json", Body=json.dumps(bad).encode())
    with pytest.raises(fleet.FleetError) as ei:
        fleet.push(fl.urls, "m", 3, f"s3://{fl.bucket}/fleet", secret=SECRET, s3=c)
    assert all("does not fit this model" in (s.error or "") for s in ei.value.report.servers), ei.value.report.table()
    for u, b in zip(fl.urls, before):
        st = status(u)
        assert st["version"] == 2 and st["staged"] == [] and st["checksums"] == b
    # a prefix outside the allowlist is refused by the server itself
    cl = httpclient.InferenceServerClient(fl.urls[0])
    with pytest.raises(Exception, match="outside the allowed"):
        cl.infer("m", [control(httpclient, {"op": "stage", "secret": SECRET, "source": {"s3": f"s3://{fl.bucket}/elsewhere/m/v3"}}, False)])
    assert all(v == 2 for v, _ in round_robin(fl, 6))


def test_rollback_brings_back_the_previous_weights_under_a_new_number(fl):
    rep = fleet.rollback(fl.urls, "m", f"s3://{fl.bucket}/fleet", fl.s3.client(), secret=SECRET)
    assert rep.ok and rep.version == 4, rep.table()  # 3 is published (though never active): numbers never go down
    REFS[4] = REFS[1]
    assert all(v == 4 and close(y, REFS[1]) for v, y in round_robin(fl, 9))
    a = osx.read_active(fl.s3.client(), osx.parse_url(f"s3://{fl.bucket}/fleet/m"))
    assert a.version == 4 and a.history == []
    out = fleet.status(fl.urls, "m", fl.s3.client(), f"s3://{fl.bucket}/fleet")
    assert {s["version"] for s in out["servers"].values()} == {4} and out["active"]["version"] == 4


def test_server_killed_mid_stage_aborts_the_push_and_rejoins_at_the_active_version(fl):
    publish(fl, weights(5), 5)
    before = [status(u)["checksums"] for u in fl.urls[:2]]
    victim = fl.servers[2]
    os.kill(victim.pid, signal.SIGSTOP)  # it never finishes staging
    try:
        t0 = time.monotonic()
        with pytest.raises(fleet.FleetError) as ei:
            fleet.push(fl.urls, "m", 5, f"s3://{fl.bucket}/fleet", secret=SECRET, deadline=6, s3=fl.s3.client())
        assert time.monotonic() - t0 < 30
        rep = ei.value.report
        assert rep.aborted and "deadline" in (rep.servers[2].error or ""), rep.table()
    finally:
        victim.kill()  # SIGKILL works on a stopped process
    for u, b in zip(fl.urls[:2], before):
        st = status(u)
        assert st["version"] == 4 and st["staged"] == [] and st["checksums"] == b
    assert osx.read_active(fl.s3.client(), osx.parse_url(f"s3://{fl.bucket}/fleet/m")).version == 4
    victim.stop()
    fl.restart(2)  # catch-up at initialize: ready only once at the fleet's active version
    assert status(fl.urls[2])["version"] == 4
    assert all(v == 4 and close(y, REFS[4]) for v, y in round_robin(fl, 9))
