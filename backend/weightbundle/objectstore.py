"""Weights in an S3-compatible object store: layout, manifest, publish, verified fetch.

Layout under ``s3://<bucket>/<prefix>/<model>/``::

    v<N>/<token>-weights.safetensors   objects written by version N (whole, or only changed tensors)
    v<N>/manifest.json                 written last, with a conditional put: its presence publishes N
    ACTIVE                             the fleet's active version (conditional put; see fleet.py)

A manifest is self-contained: every tensor of version N names the object that holds
it (possibly one of an older version, for a delta) and its sha256; every such object
has its sha256 and size.  So one manifest read tells a server exactly which objects to
fetch, and a server that already holds some tensors (same source sha256) skips them.

The client is boto3; no hand-written HTTP.  Credentials come from the environment
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``) or a credentials file, never from a
model config.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import BundleError
from .format import raw_bytes
from .transport import ST_DTYPES as _TRANSPORT_ST_DTYPES

MANIFEST = "manifest.json"
ACTIVE = "ACTIVE"
FORMAT = "weightbundle-manifest/1"
ACTIVE_HISTORY = 32  # previous active versions kept in ACTIVE, for fleet rollback
CHUNK = 1 << 20
# safetensors dtype codes the server can load: the file transport's, plus BF16 (cast inside the update graph)
ST_CODES = frozenset(_TRANSPORT_ST_DTYPES) | {"BF16"}
NP_TO_ST = {**{v: k for k, v in _TRANSPORT_ST_DTYPES.items()}, "bfloat16": "BF16"}


class ObjectStoreError(BundleError):
    """The object store refused, or its contents are wrong; nothing was changed."""


@dataclass(frozen=True)
class S3Url:
    bucket: str
    key: str  # no leading or trailing "/"

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"

    def child(self, *parts: str) -> "S3Url":
        return S3Url(self.bucket, "/".join(p.strip("/") for p in (self.key, *parts) if p.strip("/")))


def parse_url(url: Any) -> S3Url:
    if not isinstance(url, str) or not url.startswith("s3://"):
        raise ObjectStoreError(f"expected an s3://bucket/prefix url, got {url!r}")
    rest = url[5:].strip("/")
    bucket, _, key = rest.partition("/")
    parts = [p for p in key.split("/") if p]
    if not bucket or "\x00" in url or any(p in (".", "..") for p in parts):
        raise ObjectStoreError(f"bad s3 url {url!r}: it needs a bucket, and no '.' or '..' components")
    return S3Url(bucket, "/".join(parts))


def split_version_url(url: S3Url) -> tuple[S3Url, int]:
    """``s3://b/p/model/v12`` -> (``s3://b/p/model``, 12)."""
    head, _, last = url.key.rpartition("/")
    if not (last.startswith("v") and last[1:].isdigit()):
        raise ObjectStoreError(f"{url} does not name a version: expected s3://bucket/prefix/<model>/v<N>")
    return S3Url(url.bucket, head), int(last[1:])


def check_allowed(url: S3Url, allowed: Sequence[str]) -> None:
    """``allowed`` entries are ``bucket`` or ``bucket/prefix``; a prefix matches whole path components."""
    if not allowed:
        raise ObjectStoreError("object-store sources are disabled for this model: set parameter s3_allowed_prefixes")
    for entry in allowed:
        a = parse_url("s3://" + entry.strip().removeprefix("s3://"))
        if a.bucket == url.bucket and (not a.key or url.key == a.key or url.key.startswith(a.key + "/")):
            return
    raise ObjectStoreError(f"{url} is outside the allowed buckets/prefixes {list(allowed)}")


def read_credentials(path: str | None = None) -> tuple[str, str]:
    """From ``path`` (an AWS-style ini file, section [default]) when given, else from the environment."""
    if path:
        cp = configparser.ConfigParser()
        try:
            with open(path) as f:
                cp.read_file(f)
            sec = cp["default"]
            key, secret = sec.get("aws_access_key_id", ""), sec.get("aws_secret_access_key", "")
        except (OSError, configparser.Error, KeyError) as e:
            raise ObjectStoreError(f"cannot read S3 credentials file {path!r}: {e}") from None
        if not key or not secret:
            raise ObjectStoreError(f"S3 credentials file {path!r} needs aws_access_key_id and aws_secret_access_key under [default]")
        return key, secret
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID", ""), os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    if not key or not secret:
        raise ObjectStoreError("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or parameter s3_credentials_file)")
    return key, secret


def make_client(endpoint: str | None, credentials: tuple[str, str], region: str = "us-east-1", timeout: float = 60.0) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ObjectStoreError("the object store needs boto3: pip install 'weightbundle[s3]'") from None
    cfg = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=min(timeout, 10.0), read_timeout=timeout)
    return boto3.client(
        "s3", endpoint_url=endpoint or None, aws_access_key_id=credentials[0], aws_secret_access_key=credentials[1], region_name=region, config=cfg
    )


def _err(e: Exception, what: str) -> ObjectStoreError:
    """A boto error as one clear sentence."""
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchKey", "404", "NotFound"):
            return ObjectStoreError(f"{what}: not found")
        if code == "NoSuchBucket":
            return ObjectStoreError(f"{what}: no such bucket")
        if code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "403", "InvalidToken", "ExpiredToken"):
            return ObjectStoreError(f"{what}: the object store refused the credentials ({code})")
        if code in ("PreconditionFailed", "412"):
            return ObjectStoreError(f"{what}: precondition failed (someone else wrote it first)")
        return ObjectStoreError(f"{what}: {code or 'error'}: {e.response.get('Error', {}).get('Message', e)}")
    if isinstance(e, BotoCoreError):
        return ObjectStoreError(f"{what}: {e}")
    return ObjectStoreError(f"{what}: {e}")


def _is_missing(e: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(e, ClientError) and str(e.response.get("Error", {}).get("Code", "")) in ("NoSuchKey", "404", "NotFound")


def _is_precondition(e: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(e, ClientError) and str(e.response.get("Error", {}).get("Code", "")) in ("PreconditionFailed", "412")


# -- manifest -------------------------------------------------------------------------------
def validate_manifest(m: Any, where: str, version: int | None = None) -> dict:
    """Structure only; whether it fits a model is ``check_fits``."""

    def bad(why: str) -> ObjectStoreError:
        return ObjectStoreError(f"bad manifest {where}: {why}")

    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise bad(f"not a {FORMAT} manifest")
    if not isinstance(m.get("version"), int) or (version is not None and m["version"] != version):
        raise bad(f"version {m.get('version')!r} does not match its location (v{version})")
    tensors, objects = m.get("tensors"), m.get("objects")
    if not isinstance(tensors, dict) or not isinstance(objects, dict):
        raise bad("'tensors' and 'objects' must be objects")
    for name, t in tensors.items():
        if (
            not isinstance(t, dict)
            or t.get("dtype") not in ST_CODES
            or not isinstance(t.get("shape"), list)
            or not all(isinstance(d, int) and d >= 0 for d in t["shape"])
            or not isinstance(t.get("sha256"), str)
            or t.get("object") not in objects
        ):
            raise bad(f"tensor {name!r} needs dtype, shape, sha256 and an object listed in 'objects'")
    for key, o in objects.items():
        if not isinstance(o, dict) or not isinstance(o.get("sha256"), str) or not isinstance(o.get("size"), int) or ".." in key.split("/"):
            raise bad(f"object {key!r} needs sha256 and size")
    return m


def check_fits(m: dict, weights: Mapping[str, tuple[np.dtype, tuple[int, ...]]], where: str) -> None:
    """Every tensor of the manifest must be a weight of the model, with its shape."""
    unknown = sorted(set(m["tensors"]) - set(weights))
    if unknown:
        raise ObjectStoreError(f"manifest {where} does not fit this model: unknown tensor(s) {unknown[:10]}")
    for name, t in m["tensors"].items():
        if tuple(t["shape"]) != tuple(weights[name][1]):
            raise ObjectStoreError(
                f"manifest {where} does not fit this model: tensor {name!r} has shape {tuple(t['shape'])}, the model's is {tuple(weights[name][1])}"
            )


def get_json(client: Any, url: S3Url, what: str) -> tuple[Any, str]:
    """(parsed JSON, ETag) of a small object."""
    try:
        r = client.get_object(Bucket=url.bucket, Key=url.key)
        body = r["Body"].read(16 * 2**20 + 1)
    except Exception as e:
        raise _err(e, f"{what} {url}") from None
    if len(body) > 16 * 2**20:
        raise ObjectStoreError(f"{what} {url} is larger than 16 MiB")
    try:
        return json.loads(body), r.get("ETag", "")
    except ValueError as e:
        raise ObjectStoreError(f"{what} {url} is not valid JSON: {e}") from None


def read_manifest(client: Any, model_url: S3Url, version: int) -> dict:
    url = model_url.child(f"v{version}", MANIFEST)
    m, _ = get_json(client, url, "manifest")
    return validate_manifest(m, str(url), version)


def published_versions(client: Any, model_url: S3Url) -> list[int]:
    """Versions that have a manifest (i.e. are published)."""
    out = []
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=model_url.bucket, Prefix=model_url.key + "/v")
        for page in pages:
            for o in page.get("Contents", []):
                rel = o["Key"][len(model_url.key) + 1 :]
                d, _, f = rel.partition("/")
                if f == MANIFEST and d[1:].isdigit():
                    out.append(int(d[1:]))
    except Exception as e:
        raise _err(e, f"listing {model_url}") from None
    return sorted(set(out))


# -- ACTIVE pointer -----------------------------------------------------------------------
@dataclass(frozen=True)
class Active:
    version: int
    history: list[int]  # earlier active versions, oldest first
    etag: str


def read_active(client: Any, model_url: S3Url) -> Active | None:
    url = model_url.child(ACTIVE)
    try:
        client.head_object(Bucket=url.bucket, Key=url.key)
    except Exception as e:
        if _is_missing(e):
            return None
        raise _err(e, f"active pointer {url}") from None
    d, etag = get_json(client, url, "active pointer")
    if not isinstance(d, dict) or not isinstance(d.get("version"), int) or not isinstance(d.get("history", []), list):
        raise ObjectStoreError(f"active pointer {url} is malformed: {d!r}")
    return Active(d["version"], [int(v) for v in d.get("history", [])], etag)


def write_active(client: Any, model_url: S3Url, version: int, previous: Active | None, history: list[int] | None = None) -> None:
    """Conditional put: succeeds only if ACTIVE is still what ``previous`` read (or still absent)."""
    if history is None:
        history = ([*previous.history, previous.version] if previous else [])[-ACTIVE_HISTORY:]
    body = json.dumps({"version": version, "history": history, "time": time.time()}).encode()
    cond = {"IfMatch": previous.etag} if previous else {"IfNoneMatch": "*"}
    url = model_url.child(ACTIVE)
    try:
        client.put_object(Bucket=url.bucket, Key=url.key, Body=body, ContentType="application/json", **cond)
    except Exception as e:
        if _is_precondition(e):
            raise ObjectStoreError(f"active pointer {url} changed meanwhile (another fleet push?); nothing was activated") from None
        raise _err(e, f"writing {url}") from None


# -- publish ------------------------------------------------------------------------------
def _read_header(path: str) -> tuple[int, dict]:
    """(data start, header) of a local checkpoint, through the transport's validating parser."""
    from .control import ControlError
    from .transport import safetensors_header

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            header, start = safetensors_header(fd, os.fstat(fd).st_size)  # bounds, dtypes, overlaps
        finally:
            os.close(fd)
    except (ControlError, OSError) as e:
        raise ObjectStoreError(f"{path} is not a readable safetensors file: {e}") from None
    return start, header


def _tensor_sha(data: np.ndarray, start: int, end: int) -> str:
    h = hashlib.sha256()
    for off in range(start, end, 64 * CHUNK):
        h.update(raw_bytes(data[off : min(end, off + 64 * CHUNK)]))
    return h.hexdigest()


def _file_sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 * CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_safetensors(path: str, data: np.ndarray, base: int, header: dict, names: Sequence[str]) -> None:
    """A safetensors file of ``names`` copied range by range from a mapped one (no full copy in memory)."""
    new, off = {}, 0
    for n in names:
        b, e = header[n]["data_offsets"]
        new[n] = {"dtype": header[n]["dtype"], "shape": header[n]["shape"], "data_offsets": [off, off + e - b]}
        off += e - b
    hb = json.dumps(new, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for n in names:
            b, e = header[n]["data_offsets"]
            f.write(raw_bytes(data[base + b : base + e]))


@dataclass
class PublishResult:
    url: str
    version: int
    parent: int | None
    tensors: int
    uploaded: list[str]
    uploaded_bytes: int
    seconds: float

    def summary(self) -> str:
        return (
            f"published {self.url} (parent {self.parent}): {self.tensors} tensors, uploaded {len(self.uploaded)} object(s), "
            f"{self.uploaded_bytes / 2**20:.1f} MiB in {self.seconds * 1000:.0f} ms"
        )


def publish(
    client: Any,
    ckpt: str,
    dest: S3Url,
    model: str,
    version: int,
    delta_from: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    tmpdir: str | None = None,
) -> PublishResult:
    """Upload ``ckpt`` as version ``version`` of ``model`` under ``dest``; the manifest goes last.

    With ``delta_from`` only tensors whose bytes differ from that version's travel; the
    others are referenced from the objects already there.  Refuses to overwrite a
    published version: the manifest put is conditional, and objects carry a random
    token in their key, so two racing publishers never overwrite each other's objects:
    exactly one manifest wins and the loser removes its objects.
    """
    from boto3.s3.transfer import TransferConfig

    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ObjectStoreError(f"version must be a non-negative integer, got {version!r}")
    if not model or "/" in model or model in (".", ".."):
        raise ObjectStoreError(f"bad model name {model!r}")
    t0 = time.perf_counter()
    model_url = dest.child(model)
    vdir = model_url.child(f"v{version}")
    murl = vdir.child(MANIFEST)
    try:
        client.head_object(Bucket=murl.bucket, Key=murl.key)
        raise ObjectStoreError(f"version {version} is already published at {vdir}; versions are immutable, pick a new number")
    except ObjectStoreError:
        raise
    except Exception as e:
        if not _is_missing(e):
            raise _err(e, f"checking {murl}") from None
    base, header = _read_header(ckpt)
    data = np.memmap(ckpt, dtype=np.uint8, mode="r") if os.path.getsize(ckpt) > base else np.zeros(0, np.uint8)
    shas = {n: _tensor_sha(data, base + e["data_offsets"][0], base + e["data_offsets"][1]) for n, e in header.items()}
    tensors: dict[str, dict] = {}
    objects: dict[str, dict] = {}
    parent = None
    if delta_from is not None:
        if delta_from >= version:
            raise ObjectStoreError(f"--delta-from {delta_from} must be older than version {version}")
        pm = read_manifest(client, model_url, delta_from)
        parent = delta_from
        tensors = dict(pm["tensors"])
        objects = {k: pm["objects"][k] for k in {t["object"] for t in tensors.values()}}
    changed = [
        n
        for n in header
        if n not in tensors or tensors[n]["sha256"] != shas[n] or tensors[n]["dtype"] != header[n]["dtype"] or tensors[n]["shape"] != header[n]["shape"]
    ]
    token = uuid.uuid4().hex[:12]
    key = f"v{version}/{token}-weights.safetensors"
    uploaded: list[str] = []
    tmp = None
    try:
        if changed:
            if delta_from is None:
                src = ckpt  # the checkpoint itself is the object: no local copy
            else:
                fd, tmp = tempfile.mkstemp(prefix="wb-publish-", suffix=".safetensors", dir=tmpdir)
                os.close(fd)
                _write_safetensors(tmp, data, base, header, changed)
                src = tmp
            size = os.path.getsize(src)
            objects[key] = {"sha256": _file_sha(src), "size": size}
            done = [0]

            def cb(n: int) -> None:
                done[0] += n
                if progress:
                    progress(done[0], size)

            obj = model_url.child(key)
            uploaded.append(obj.key)
            try:
                client.upload_file(src, obj.bucket, obj.key, Config=TransferConfig(multipart_threshold=8 * CHUNK, multipart_chunksize=8 * CHUNK), Callback=cb)
            except Exception as e:
                raise _err(e, f"uploading {obj}") from None
            for n in changed:
                tensors[n] = {"dtype": header[n]["dtype"], "shape": header[n]["shape"], "sha256": shas[n], "object": key}
        manifest = {
            "format": FORMAT,
            "model": model,
            "version": version,
            "parent": parent,
            "created": time.time(),
            "tensors": tensors,
            "objects": {k: objects[k] for k in sorted({t["object"] for t in tensors.values()})},
        }
        _put_manifest(client, murl, manifest, f"version {version} was published by someone else meanwhile; nothing of ours was kept")
        uploaded_bytes = objects[key]["size"] if uploaded else 0
        result = PublishResult(str(vdir), version, parent, len(tensors), list(uploaded), uploaded_bytes, time.perf_counter() - t0)
        uploaded.clear()  # published: keep them
        return result
    finally:
        if tmp:
            os.unlink(tmp)
        for k in uploaded:  # not published (error or lost race): remove our objects
            try:
                client.delete_object(Bucket=model_url.bucket, Key=k)
            except Exception:
                pass


def publish_alias(client: Any, model_url: S3Url, version: int, of: int) -> dict:
    """Publish version ``version`` whose tensors are exactly version ``of``'s (no data copied).

    Fleet rollback uses it: the old weights come back under a new, higher number.
    """
    src = read_manifest(client, model_url, of)
    m = {**src, "version": version, "parent": of, "alias_of": of, "created": time.time()}
    _put_manifest(client, model_url.child(f"v{version}", MANIFEST), m, f"version {version} is already published; pick a new number")
    return m


def _put_manifest(client: Any, murl: S3Url, manifest: dict, taken: str) -> None:
    """Write a manifest only if none is there (a conditional put): the publication's commit point."""
    try:
        client.put_object(Bucket=murl.bucket, Key=murl.key, Body=json.dumps(manifest, indent=1).encode(), ContentType="application/json", IfNoneMatch="*")
    except Exception as e:
        if _is_precondition(e):
            raise ObjectStoreError(taken) from None
        raise _err(e, f"writing {murl}") from None


# -- fetch (server side) -------------------------------------------------------------------
def _map_tensors(path: str, names: Sequence[str], where: str) -> dict[str, np.ndarray]:
    """Read-only views of ``names`` in a verified safetensors spool file, memory-mapped (no copy)."""
    from .transport import _np_dtype, safetensors_header

    fd = os.open(path, os.O_RDONLY)
    try:
        header, start = safetensors_header(fd, os.fstat(fd).st_size)  # bounds, dtypes, overlaps
    except BundleError as e:
        raise ObjectStoreError(f"object {where}: {e}") from None
    finally:
        os.close(fd)
    missing = sorted(set(names) - set(header))
    if missing:
        raise ObjectStoreError(f"object {where} has no tensor(s) {missing[:10]}, which its manifest puts there")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for n in names:
        entry = header[n]
        dt = _np_dtype(entry["dtype"])  # the header check already refused unknown dtypes
        begin, end = entry["data_offsets"]
        out[n] = data[start + begin : start + end].view(dt).reshape(entry["shape"])
    return out


@dataclass
class Fetched:
    tensors: dict[str, np.ndarray]  # read-only views of memory-mapped, already-unlinked spool files
    sha256: dict[str, str]  # "<dtype>:<sha256>" of each fetched tensor's source bytes (from the manifest)
    manifest: dict
    objects: list[str]
    bytes: int
    seconds: float


def fetch_version(
    client: Any,
    version_url: S3Url,
    weights: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
    have: Mapping[str, str] | None = None,
    spool_dir: str | None = None,
) -> Fetched:
    """Fetch the tensors of a published version that this server does not hold yet.

    ``have``: "<dtype>:<sha256>" of the source of each tensor the server already holds
    (recorded with the version it serves); those are skipped.  Each object is streamed to a spool file while its
    sha256 is computed, checked against the manifest, then memory-mapped: no object is
    ever held twice in memory.  Any mismatch raises before anything is staged.
    """
    t0 = time.perf_counter()
    model_url, number = split_version_url(version_url)
    m = read_manifest(client, model_url, number)
    check_fits(m, weights, str(version_url))
    have = have or {}
    key_of = {n: f"{t['dtype']}:{t['sha256']}" for n, t in m["tensors"].items()}  # same source bytes and dtype
    need = [n for n in m["tensors"] if have.get(n) != key_of[n]]
    by_object: dict[str, list[str]] = {}
    for n in need:
        by_object.setdefault(m["tensors"][n]["object"], []).append(n)
    out: dict[str, np.ndarray] = {}
    total = 0
    for key, names in sorted(by_object.items()):
        meta = m["objects"][key]
        obj = model_url.child(key)
        fd, path = tempfile.mkstemp(prefix="wb-fetch-", suffix=".safetensors", dir=spool_dir)
        try:
            h, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as f:
                try:
                    body = client.get_object(Bucket=obj.bucket, Key=obj.key)["Body"]
                    for chunk in body.iter_chunks(CHUNK):
                        h.update(chunk)
                        f.write(chunk)
                        size += len(chunk)
                        if size > meta["size"]:
                            break
                except ObjectStoreError:
                    raise
                except Exception as e:
                    raise _err(e, f"object {obj}") from None
            if size != meta["size"] or h.hexdigest() != meta["sha256"]:
                raise ObjectStoreError(
                    f"object {obj} failed verification: got {size} bytes with sha256 {h.hexdigest()[:16]}…, "
                    f"the manifest says {meta['size']} bytes, {meta['sha256'][:16]}…; nothing was staged"
                )
            got = _map_tensors(path, names, str(obj))
            for n in names:
                t = m["tensors"][n]
                a = got[n]
                if list(a.shape) != list(t["shape"]) or NP_TO_ST.get(a.dtype.name) != t["dtype"]:
                    raise ObjectStoreError(f"object {obj}: tensor {n!r} is {a.dtype}{list(a.shape)}, the manifest says {t['dtype']}{t['shape']}")
                out[n] = a
            total += size
        finally:
            os.unlink(path)  # the maps keep the data alive; the name goes now
    return Fetched(out, {n: key_of[n] for n in need}, m, sorted(by_object), total, time.perf_counter() - t0)
