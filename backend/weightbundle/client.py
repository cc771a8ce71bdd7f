"""Client for a weightbundle model served by Triton (tritonclient underneath).

>>> from weightbundle.client import WeightClient                       # doctest: +SKIP
>>> with WeightClient("127.0.0.1:8000", "mlp", secret=os.environ["WEIGHTBUNDLE_SECRET"]) as c:
...     out, version = c.infer({"features": x})
...     c.update({"fc2.weight": w}, via="shm")       # or via="request"; absent weights are kept
...     c.push_file("/srv/weights/step-1200.safetensors", via="file", only=["fc2.weight"])
...     c.rollback(); c.commit()

Transports for ``update``:
- ``request``: the tensors travel in the request body. Works everywhere; slowest for big weights.
- ``shm``: for a server on this host. The client copies the weights, as a safetensors
  image, into a region it owns in ``/dev/shm`` (``wbpush-<pid>-<random>``, mode 0600,
  reused across pushes), and the request only names it; the server reads the region
  itself, so the weights never pass through Triton's inputs or the python backend's
  own shared memory. The region is always removed, at ``close()``, on error or Ctrl-C.
- ``file``: the request carries only a path to a safetensors file that the server reads.
  The file must be in one of the model's ``file_update_dirs``.
"""

from __future__ import annotations

import json
import mmap
import os
import sys
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import CommandError
from .fsutil import unlink_quiet
from .control import CONTROL_INPUT, RESULT_OUTPUT, VERSION_OUTPUT

VIAS = ("auto", "request", "shm", "file")
_ALIGN = 64
_SHM_DIR = "/dev/shm"


@dataclass
class PushResult:
    version: int
    bytes: int
    seconds: float
    via: str
    result: dict[str, Any]
    ignored: list[str] = field(default_factory=list)  # tensors given that are not update inputs (strict=False)

    @property
    def updated(self) -> list[str]:
        return list(self.result.get("updated", []))

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        mib = self.bytes / 2**20
        line = f"weights version {self.version}: pushed {mib:.1f} MiB via {self.via} in {self.seconds * 1000:.0f} ms ({self.rate / 2**30:.2f} GiB/s)"
        upd = self.updated
        line += f"\nupdated {len(upd)}: {', '.join(upd[:12])}{' ...' if len(upd) > 12 else ''}"
        if self.ignored:
            line += f"\nignored {len(self.ignored)} (not update inputs): {', '.join(self.ignored[:12])}{' ...' if len(self.ignored) > 12 else ''}"
        return line


def _local(url: str) -> bool:
    host = url.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


class WeightClient:
    def __init__(self, url: str, model: str, *, protocol: str = "http", secret: str | None = None, model_version: str = "", timeout: float = 600.0):
        if protocol not in ("http", "grpc"):
            raise ValueError("protocol must be 'http' or 'grpc'")
        self.url, self.model, self.protocol, self.secret, self.model_version = url, model, protocol, secret, model_version
        if protocol == "http":
            import tritonclient.http as tc

            self._c = tc.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
        else:
            import tritonclient.grpc as tc

            self._c = tc.InferenceServerClient(url)
        self._tc = tc
        self._sig: dict[str, Any] | None = None
        self._region: tuple[str, mmap.mmap] | None = None  # (name, mapping) of our push region in /dev/shm
        self._region_unlink: weakref.finalize | None = None  # removes it even if close() is never called
        self._region_lock = threading.Lock()  # one push at a time writes the region

    def close(self) -> None:
        self._drop_region()
        self._c.close()

    def __enter__(self) -> "WeightClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- model signature -------------------------------------------------------------
    def signature(self) -> dict[str, Any]:
        """Inputs, weights (name -> (triton dtype, dims)) and batching, from the model config."""
        if self._sig is None:
            cfg = self._c.get_model_config(self.model, self.model_version)
            if self.protocol == "grpc":
                from google.protobuf.json_format import MessageToDict

                cfg = MessageToDict(cfg.config, preserving_proto_field_name=True)
            inputs = {
                i["name"]: (i["data_type"].replace("TYPE_", ""), [int(d) for d in i.get("dims", [])], bool(i.get("optional"))) for i in cfg.get("input", [])
            }
            weights = {n: v[:2] for n, v in inputs.items() if v[2] and n != CONTROL_INPUT}
            self._sig = {"batching": int(cfg.get("max_batch_size", 0)) > 0, "inputs": {n: v[:2] for n, v in inputs.items() if not v[2]}, "weights": weights}
        return self._sig

    # -- requests ----------------------------------------------------------------------------
    def _input(self, name: str, arr: np.ndarray) -> Any:
        from tritonclient.utils import np_to_triton_dtype

        i = self._tc.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        i.set_data_from_numpy(arr)
        return i

    def _control(self, op: str, **fields: Any) -> Any:
        body = {"op": op, **{k: v for k, v in fields.items() if v is not None}}
        if self.secret is not None:  # status too: checksums are for callers holding the secret
            body["secret"] = self.secret
        shape = (1, 1) if self.signature()["batching"] else (1,)
        return self._input(CONTROL_INPUT, np.array([json.dumps(body).encode()], dtype=object).reshape(shape))

    def _send(self, inputs: list[Any]) -> dict[str, Any]:
        from tritonclient.utils import InferenceServerException

        outs = [self._tc.InferRequestedOutput(RESULT_OUTPUT)]
        try:
            r = self._c.infer(self.model, inputs, model_version=self.model_version, outputs=outs)
        except InferenceServerException as e:
            raise CommandError(e.message() if hasattr(e, "message") else str(e)) from None
        return json.loads(r.as_numpy(RESULT_OUTPUT).reshape(-1)[0])

    def infer(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> tuple[dict[str, np.ndarray], int]:
        """(outputs, weights version that computed them)."""
        names = list(outputs) if outputs else None
        req = [self._tc.InferRequestedOutput(n) for n in (names + [VERSION_OUTPUT])] if names else None
        r = self._c.infer(self.model, [self._input(k, v) for k, v in inputs.items()], model_version=self.model_version, outputs=req)
        resp = r.get_response()
        got = [o["name"] for o in resp["outputs"]] if isinstance(resp, dict) else [o.name for o in resp.outputs]
        out = {n: r.as_numpy(n) for n in got}
        version = int(out.pop(VERSION_OUTPUT).reshape(-1)[0])
        return out, version

    def status(self, checksums: bool = True) -> dict[str, Any]:
        return self._send([self._control("status", checksums=checksums)])

    def reset(self, expected_version: int | None = None) -> dict[str, Any]:
        return self._send([self._control("reset", expected_version=expected_version)])

    def rollback(self, expected_version: int | None = None) -> dict[str, Any]:
        return self._send([self._control("rollback", expected_version=expected_version)])

    def commit(self, expected_version: int | None = None) -> dict[str, Any]:
        return self._send([self._control("commit", expected_version=expected_version)])

    # -- two-phase ops (fleets, docs/fleet.md) ------------------------------------------------
    def stage(self, *, source: Mapping[str, Any] | None = None, version: int | None = None) -> dict[str, Any]:
        """Stage a version (e.g. ``source={"s3": "s3://bucket/prefix/model/v12"}``); it serves nothing until activated."""
        return self._send([self._control("stage", source=dict(source) if source else None, version=version)])

    def activate(self, version: int, expected_version: int | None = None) -> dict[str, Any]:
        return self._send([self._control("activate", version=version, expected_version=expected_version)])

    def abort(self, version: int) -> dict[str, Any]:
        return self._send([self._control("abort", version=version)])

    def update(
        self,
        weights: Mapping[str, Any],
        *,
        via: str = "auto",
        expected_version: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        strict: bool = True,
        require_all: bool = False,
    ) -> PushResult:
        """Push ``weights`` (name -> array or torch tensor, e.g. a whole ``state_dict``); weights not named are kept.

        All-or-nothing.  Like ``load_state_dict``: names that are not update inputs are an
        error unless ``strict=False`` (then listed in ``PushResult.ignored``); ``require_all``
        refuses a push that misses an update input.  Other float dtypes (FP16, BF16) are cast
        to the input's declared dtype here, since Triton checks dtypes against the config.
        """
        from .checkpoint import select_update, to_numpy

        if via not in VIAS or via == "file":
            raise ValueError("update() sends tensors: via must be 'auto', 'request' or 'shm' (use push_file for 'file')")
        via = ("shm" if _local(self.url) else "request") if via == "auto" else via
        sig = self.signature()
        weights = to_numpy(weights)
        try:
            send, ignored = select_update(list(sig["weights"]), list(weights), strict=strict, require_all=require_all)
        except Exception as e:  # UpdateError: refused here, before anything is sent
            raise CommandError(f"model {self.model!r}: {e}") from None
        arrays = {n: _as_declared(weights[n], sig["weights"][n][0]).reshape(np.shape(weights[n])) for n in send}
        total = sum(a.nbytes for a in arrays.values())
        t0 = time.perf_counter()
        if via == "shm" and total:
            result = self._update_shm(arrays, expected_version, progress)
        else:  # also an shm push of nothing but "keep" (empty) tensors: there is nothing to map
            batch = (1,) if sig["batching"] else ()
            inputs = [self._control("update", expected_version=expected_version)]
            inputs += [self._input(n, a.reshape(batch + a.shape)) for n, a in arrays.items()]
            result = self._send(inputs)
            if progress:
                progress(total, total)
        return PushResult(result["version"], total, time.perf_counter() - t0, via, result, ignored)

    def _region_for(self, size: int) -> tuple[str, mmap.mmap]:
        """Our push region in /dev/shm, at least ``size`` bytes, reused across pushes.

        Creating and faulting in a region costs about as much as filling it, so one is
        kept until ``close()`` (or until a bigger one is needed).  ``posix_fallocate``
        reserves its pages now: a full /dev/shm is an error here, not a SIGBUS later.
        """
        if self._region is not None and len(self._region[1]) >= size:
            return self._region
        self._drop_region()
        name = f"wbpush-{os.getpid()}-{uuid.uuid4().hex[:12]}"  # the server opens only wbpush-* names
        path = os.path.join(_SHM_DIR, name)
        size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        # At garbage collection or interpreter exit (an unhandled exception included), the
        # region goes too; only a killed process leaves it behind.
        self._region_unlink = weakref.finalize(self, unlink_quiet, path)
        try:
            os.posix_fallocate(fd, 0, size)
            self._region = (name, mmap.mmap(fd, size))
        except BaseException:
            self._region_unlink()
            raise
        finally:
            os.close(fd)
        return self._region

    def _drop_region(self) -> None:
        """Remove our shm region; never raises (runs on every exit path)."""
        if self._region is None:
            return
        name, mm = self._region
        self._region = None
        try:
            mm.close()
        except Exception:
            pass
        if self._region_unlink is not None:
            try:
                self._region_unlink()  # unlinks, once
            except OSError:
                pass

    def _fill_region(self, arrays: Mapping[str, np.ndarray], progress: Callable[[int, int], None] | None = None) -> str:
        """Write ``arrays`` into our region as a safetensors image; return the region's name."""
        header, start, size = shm_image_layout(arrays)
        name, mm = self._region_for(size)
        mm[: len(header)] = header
        done, total = 0, size - start
        offset = start
        for a in arrays.values():  # copy straight into the mapping: one copy on this side
            if a.nbytes:
                np.copyto(np.frombuffer(mm, a.dtype, a.size, offset).reshape(a.shape), a)
            offset += a.nbytes
            done += a.nbytes
            if progress:
                progress(done, total)
        return name

    def _push_region(self, name: str, expected_version: int | None) -> dict[str, Any]:
        return self._send([self._control("update", expected_version=expected_version, source={"shm": name})])

    def _update_shm(self, arrays: Mapping[str, np.ndarray], expected_version: int | None, progress: Callable[[int, int], None] | None) -> dict[str, Any]:
        arrays = {n: a for n, a in arrays.items() if a.size}  # an empty tensor means "keep": leave it out
        with self._region_lock:
            try:
                return self._push_region(self._fill_region(arrays, progress), expected_version)
            except BaseException:  # on any failure (Ctrl-C included) leave nothing behind
                self._drop_region()
                raise

    def push_file(
        self,
        path: str,
        *,
        via: str = "auto",
        only: Sequence[str] | None = None,
        expected_version: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        strict: bool = True,
        require_all: bool = False,
    ) -> PushResult:
        """Push a safetensors file (e.g. a trainer's checkpoint). ``via='file'`` sends only the path (server reads it).

        ``strict``/``require_all`` as in ``update``; with ``strict=False`` the tensors that are
        not update inputs are left out (``only``) and listed in ``PushResult.ignored``.
        """
        from .checkpoint import select_update

        names = _safetensors_names(path)
        if only:
            missing = sorted(set(only) - set(names))
            if missing:
                raise CommandError(f"{path} has no tensor(s) {missing}")
            names = list(only)
        try:
            send, ignored = select_update(list(self.signature()["weights"]), names, strict=strict, require_all=require_all)
        except Exception as e:
            raise CommandError(f"model {self.model!r}: {e}") from None
        if via == "file":
            path = os.path.abspath(path)
            pick = send if (only or ignored) else None
            size = _safetensors_bytes(path, pick)
            t0 = time.perf_counter()
            result = self._send([self._control("update", expected_version=expected_version, source={"file": path, **({"only": list(pick)} if pick else {})})])
            if progress:
                progress(size, size)
            return PushResult(result["version"], size, time.perf_counter() - t0, "file", result, ignored)
        from .checkpoint import read_checkpoint

        try:
            weights = read_checkpoint(path, send)  # validated header, pread; BF16 as ml_dtypes.bfloat16
        except Exception as e:
            raise CommandError(f"cannot read {path!r}: {e}") from None
        r = self.update(weights, via=via, expected_version=expected_version, progress=progress)
        r.ignored = ignored
        return r


def _as_declared(a: np.ndarray, triton_dtype: str) -> np.ndarray:
    """Cast to the dtype the model config declares (vectorised; ml_dtypes handles BF16)."""
    from tritonclient.utils import triton_to_np_dtype

    want = np.dtype(triton_to_np_dtype(triton_dtype))
    return np.ascontiguousarray(a if a.dtype == want else a.astype(want))


def shm_image_layout(arrays: Mapping[str, np.ndarray]) -> tuple[bytes, int, int]:
    """(header bytes, data start, total size) of ``arrays`` as one safetensors image, in
    order and without gaps; the header is padded with spaces so the data starts 64-byte
    aligned, as safetensors allows."""
    from .transport import st_dtype

    entries, offset = {}, 0
    for n, a in arrays.items():
        entries[n] = {"dtype": st_dtype(a.dtype), "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % _ALIGN)
    start = 8 + len(text)
    return len(text).to_bytes(8, "little") + text, start, start + offset


def _safetensors_names(path: str) -> list[str]:
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(min(n, 100 * 2**20)))
        return [k for k in header if k != "__metadata__"]
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise CommandError(f"cannot read safetensors file {path!r}: {e}") from None


def _safetensors_bytes(path: str, only: Sequence[str] | None) -> int:
    """Bytes the server will read, for the summary only: the server validates the file."""
    from .control import ControlError
    from .transport import safetensors_header

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0
    try:
        header, _ = safetensors_header(fd, os.fstat(fd).st_size)
        return sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items() if not only or k in only)
    except (ControlError, OSError):
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def progress_bar(stream: Any = sys.stderr, desc: str = "push") -> Callable[[int, int], None] | None:
    """A progress callback ``(done_bytes, total_bytes)`` drawing a tqdm bar, or None (no bar)
    when tqdm is not installed (it comes with the ``client`` extra)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bar: Any = None

    def show(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=stream, desc=desc)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return show
