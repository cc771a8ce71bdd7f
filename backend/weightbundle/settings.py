"""Model config parameters: one declaration per setting, with its type, default and doc.

A model's ``config.pbtxt`` sets these under ``parameters`` (string values, as Triton
carries them).  Each is declared once, below, as a field of ``ServingSettings``:
parsing follows the field's type, the README's parameter table is generated from the
docs (``python -m weightbundle.settings``; a test keeps the README in step), and the
runtime options are the fields that ``RuntimeOptions`` shares by name.

>>> s = ServingSettings.from_model_config({"parameters": {"history": {"string_value": "3"}}})
>>> s.history
3
"""

from __future__ import annotations

import os
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from typing import Any, Mapping

from .errors import BundleError
from .runtime import RuntimeOptions


def parse_bool(v: str, key: str) -> bool:
    s = v.strip().lower()
    if s in ("1", "true", "yes", "on", "enabled"):
        return True
    if s in ("0", "false", "no", "off", "disabled", ""):
        return False
    raise BundleError(f"model config parameter {key!r} must be true or false, got {v!r}")


def _number(kind: type, v: str, key: str) -> Any:
    try:
        return kind(v)
    except ValueError:
        raise BundleError(f"model config parameter {key!r} must be {'an integer' if kind is int else 'a number'}, got {v!r}") from None


def param(default: Any, doc: str, *, sep: str = "", shown: str | None = None) -> Any:
    """A model config parameter: ``doc`` goes to the README; ``sep`` splits a list value;
    ``shown`` replaces the default in the README where the value is computed at run time."""
    return field(default=default, metadata={"doc": doc, "sep": sep, "shown": shown})


@dataclass
class ServingSettings:
    """Everything a model's ``config.pbtxt`` can set (``parameters`` plus batching)."""

    bundle_filename: str = param("model.bundle", "file inside the version folder")
    allow_updates: bool = param(False, "enable mutating ops; when off, `weightbundle config` declares no weight inputs")
    update_secret_env: str | None = param(None, "environment variable that holds the update secret")
    update_secret_file: str | None = param(None, "file that holds the update secret (instead of `update_secret_env`)")
    update_auth: str = param("secret", "`none` disables the secret check (trusted networks only)")
    history: int = param(1, "previous versions kept for rollback")
    prepack: bool = param(
        True,
        "serve from ORT's pre-packed weights: fastest inference. `false`: sessions memory-map the "
        "shared store (zero-copy), so updates are cheaper and GEMMs slower on CPU",
    )
    hybrid: bool = param(
        True,
        "with `prepack`: serve a new version at once from a first session, switch to the shared "
        "pre-packed copy when it is ready. `false`: wait for the shared copy",
    )
    deterministic: bool = param(
        False,
        "with `hybrid`: pack the first session privately, as the shared copy is packed, so one version gives one answer bit for bit "
        "(~50 ms more per 64 MiB update). `false`: a zero-copy first session, whose last bits may differ until the switch",
    )
    share_packed: bool = param(
        True, "with `prepack`: one process packs each version once into a disk-backed file (`/var/tmp`, or `WEIGHTBUNDLE_PACKED_ROOT`) that every instance maps"
    )
    compile_once: bool = param(
        True,
        "optimize the inference graph once per load and only re-lay each new version's weights, so a version costs no optimizer run "
        "(Conv filters: build with `--fold-bn`)",
    )
    pin_hot_weights: bool = param(
        True,
        "with `hybrid`: after a partial update (the versions of the last 2 s changed at most half the bytes), serve it and every "
        "later version changing the same weights from one session that packs the others and feeds the changed ones from the "
        "store, instead of a zero-copy session per version, until a version settles and is packed whole",
    )
    pin_weights: tuple[str, ...] = param(
        (),
        "with `pin_hot_weights`: comma-separated update inputs (names or `fnmatch` patterns) that streams of partial updates "
        "change. A standby pinned session for them waits from load on, over the shared packed copy, so that even the first "
        "stream is pinned from its first update (later streams have one anyway)",
        sep=",",
    )
    staging: bool = param(
        True,
        "after an update, keep one pre-allocated staging blob (tmpfs for what the last 4 updates wrote, at most one model size) "
        "so that the next update is written once, straight from the update graph",
    )
    staging_idle_seconds: float = param(60.0, "drop the staging blob after this many seconds without an update (0: keep it)")
    history_on_disk: bool = param(
        True,
        "keep the weights only older versions (rollback) read on the disk-backed folder of `share_packed`, as evictable page cache, "
        "not tmpfs; a rollback copies them back first",
    )
    optimization: str = param(
        "all", "ONNX Runtime level used when a version's session is built (`all` gives Conv+BatchNorm folding and NCHWc, like a baked session)"
    )
    intra_op_threads: int = param(
        0,
        "ONNX Runtime threads per instance. 0: with one instance, ONNX Runtime's default (a thread per core); with several, "
        "the CPUs this process may use ÷ the instances, at least 1, so that their spinning thread pools do not fight for the cores",
    )
    device: str = param(
        "cpu",
        "`cuda`: inference on the GPU with device-resident weights: one session per load, and an update copies only the "
        "weights it changed into standby buffers, then swaps (needs `onnxruntime-gpu`; with `instance_group { kind: KIND_GPU }` "
        "each instance uses its own GPU). `cpu`: the CPU sessions the parameters above shape",
    )
    reject_nonfinite: bool = param(False, "refuse NaN/Inf in updates (checked after the cast to each weight's dtype)")
    store_root: str | None = param(None, "where weight stores live", shown="/dev/shm")
    file_update_dirs: tuple[str, ...] = param((), "`:`-separated allowlist for the file transport (off when unset)", sep=":")
    # object store and fleets (docs/fleet.md)
    s3_endpoint: str | None = param(None, "S3-compatible object store for `stage` from `s3` and catch-up")
    s3_region: str = param("us-east-1", "region name sent to the object store")
    s3_allowed_prefixes: tuple[str, ...] = param(
        (), "comma-separated `bucket` or `bucket/prefix` allowlist for `source.s3` (S3 sources off when unset)", sep=","
    )
    s3_credentials_file: str | None = param(None, "ini file with the S3 keys; otherwise `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` from the environment")
    s3_spool_dir: str | None = param(None, "where fetched objects are verified before staging", shown="temp dir")
    weights_source: str | None = param(None, "`s3://bucket/prefix/model`: at load, catch up to the fleet's `ACTIVE` version before reporting ready")
    follow_seconds: float = param(0.0, "with `weights_source`: poll `ACTIVE` this often and catch up (follow mode)")
    staged_ttl_seconds: float = param(3600.0, "staged versions not activated or aborted by then are dropped")
    max_batch_size: int = 0  # from the config itself, not a parameter
    instances: int = 1  # this model's instances on this server (its instance_group), not a parameter
    device_id: int = 0  # the GPU of this instance (Triton's model_instance_device_id), not a parameter

    @classmethod
    def parameters(cls) -> list[Field]:
        return [f for f in fields(cls) if "doc" in f.metadata]

    @classmethod
    def from_model_config(cls, cfg: Mapping[str, Any]) -> "ServingSettings":
        s = cls(max_batch_size=int(cfg.get("max_batch_size", 0)), instances=_instances(cfg))
        known = {f.name: f for f in cls.parameters()}
        for key, val in (cfg.get("parameters") or {}).items():
            if key not in known:
                raise BundleError(f"unknown model config parameter {key!r}; known: {sorted(known)}")
            raw = val.get("string_value", "") if isinstance(val, dict) else str(val)
            setattr(s, key, _parse(known[key], raw))
        s._check()
        return s

    def _check(self) -> None:
        if self.update_auth not in ("secret", "none"):
            raise BundleError(f"update_auth must be 'secret' or 'none', got {self.update_auth!r}")
        if self.device not in ("cpu", "cuda"):
            raise BundleError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.history < 1:
            raise BundleError("history must be >= 1 (rollback needs at least one previous version)")
        if self.staged_ttl_seconds <= 0 or self.follow_seconds < 0 or self.staging_idle_seconds < 0:
            raise BundleError("staged_ttl_seconds must be > 0, and follow_seconds and staging_idle_seconds >= 0")
        if self.weights_source is not None:
            from .objectstore import parse_url

            parse_url(self.weights_source)  # fail the load now on a malformed url
        elif self.follow_seconds:
            raise BundleError("follow_seconds needs weights_source (the s3://bucket/prefix/model to follow)")

    def runtime_options(self, store_dir: str | None) -> RuntimeOptions:
        """The settings ``RuntimeOptions`` shares by name, plus the store folder, with the
        thread count resolved (``threads``)."""
        shared = {f.name for f in fields(RuntimeOptions)} & {f.name for f in self.parameters()}
        opts = RuntimeOptions(**{n: getattr(self, n) for n in sorted(shared)}, store_dir=store_dir)
        return replace(opts, intra_op_threads=self.threads(), device_id=self.device_id)

    def threads(self) -> int:
        """ONNX Runtime threads per instance; 0 leaves ONNX Runtime's default.

        Every instance is a process with its own thread pool, a thread per core by default,
        whose threads spin after each run.  Two instances on 2 cores then ran 4 threads:
        under 8 clients, P4's p50 was 135 ms against 86 ms with one thread each, and the
        responses 36% fewer (measured through Triton)."""
        if self.intra_op_threads or self.instances <= 1:
            return self.intra_op_threads
        return max(1, available_cpus() // self.instances)


def _instances(cfg: Mapping[str, Any]) -> int:
    """How many instances of the model Triton runs (``count`` per group, per GPU listed)."""
    n = 0
    for g in cfg.get("instance_group") or []:
        n += max(int(g.get("count") or 1), 1) * max(len(g.get("gpus") or []), 1)
    return max(n, 1)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which a container's cpuset sets)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _parse(f: Field, raw: str) -> Any:
    kind = str(f.type)  # annotations are strings here (from __future__ import annotations)
    if kind.startswith("bool"):
        return parse_bool(raw, f.name)
    if kind.startswith("int"):
        return _number(int, raw, f.name)
    if kind.startswith("float"):
        return _number(float, raw, f.name)
    if kind.startswith("tuple"):
        return tuple(p.strip() for p in raw.split(f.metadata["sep"]) if p.strip())
    return raw


def _shown(f: Field) -> str:
    if f.metadata["shown"]:
        return f"`{f.metadata['shown']}`"
    d = f.default if f.default is not MISSING else None
    if d is None or d == ():
        return "—"
    if isinstance(d, bool):
        return f"`{str(d).lower()}`"
    if isinstance(d, float) and d.is_integer():
        d = int(d)
    return f"`{d}`"


def markdown_table() -> str:
    """The README's parameter table."""
    rows = ["| parameter | default | meaning |", "|---|---|---|"]
    rows += [f"| `{f.name}` | {_shown(f)} | {f.metadata['doc']} |" for f in ServingSettings.parameters()]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m weightbundle.settings > table.md
    print(markdown_table(), end="")
