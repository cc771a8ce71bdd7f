"""Serve a bundle: request routing and commands (settings: ``settings.py``).

Nothing here imports Triton: ``model.py`` turns Triton requests into dicts of
numpy arrays, calls ``Service.handle`` and turns the replies back.  That keeps
every behaviour unit-testable without a server.
"""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .control import CONTROL_INPUT, MUTATING, RESULT_OUTPUT, VERSION_OUTPUT, Authorizer, Command, ControlError, parse_command
from .errors import BundleError, NotInitializedError, VersionConflictError
from .runtime import Bundle
from .repository import sweep_partial, write_version
from .settings import ServingSettings, available_cpus
from .store import default_root, shared_dir, sweep_stale
from .format import raw_bytes
from .transport import Checkpoint


@dataclass
class Reply:
    """One response: outputs, or an error with a Triton error code name."""

    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    error: str | None = None
    code: str = "INVALID_ARG"


@dataclass
class Event:
    """What happened, for metrics: kind is 'update_applied' or 'update_rejected'."""

    kind: str
    op: str
    reason: str = ""
    seconds: float = 0.0
    version: int | None = None


class Service:
    """One Triton model instance's view of a bundle and its shared weight store."""

    def __init__(
        self,
        bundle: Bundle,
        settings: ServingSettings,
        authorizer: Authorizer,
        model_dir: str | None = None,
        model_name: str = "model",
        on_event: Callable[[Event], None] | None = None,
        log: Callable[..., None] | None = None,
    ):
        self.bundle = bundle
        self.settings = settings
        self.auth = authorizer
        self.model_dir = model_dir
        self.model_name = model_name
        self.on_event = on_event or (lambda e: None)
        # Triton's log (model.py): log(message) is a warning, log(message, "info") a note.
        self.log: Callable[..., None] = log or (lambda message, level="warn": None)
        bundle._log = self.log
        self.weight_names = {u.name for u in bundle.update_inputs}
        self.input_names = {i.name for i in bundle.inputs}
        reserved = {CONTROL_INPUT, VERSION_OUTPUT, RESULT_OUTPUT}
        clash = (self.weight_names & self.input_names) | ((self.weight_names | self.input_names) & reserved)
        if clash:
            raise BundleError(f"tensor name(s) {sorted(clash)} are used twice (inputs, weights and {sorted(reserved)} must differ)")
        self._s3: tuple[tuple[str, str], Any] | None = None  # (credentials, boto3 client), made on first use
        self._follower: threading.Thread | None = None
        self._stop_follow = threading.Event()

    @classmethod
    def open(
        cls,
        model_dir: str,
        version: str | int,
        settings: ServingSettings,
        model_name: str,
        on_event: Callable[[Event], None] | None = None,
        model_config: Mapping[str, Any] | None = None,
        log: Callable[..., None] | None = None,
    ) -> "Service":
        """Load ``<model_dir>/<version>/<bundle_filename>``, attach the shared store, init once.

        ``model_config`` (Triton's JSON form) is checked against the bundle: weight inputs
        must carry exact shapes, and exist only when updates are on.
        """
        path = os.path.join(model_dir, str(version), settings.bundle_filename)
        if not os.path.isfile(path):
            raise BundleError(f"bundle file not found: {path} (set parameter bundle_filename to use another name)")
        auth = Authorizer.from_sources(settings.allow_updates, settings.update_secret_env, settings.update_secret_file, settings.update_auth == "secret")
        root = settings.store_root or default_root()
        swept = sweep_stale(root) + sweep_partial(model_dir)
        # One store per (server process, model, version): every instance of it shares weights.
        store_dir = shared_dir(root, model_name, version)
        bundle = Bundle.load_from_file(path, settings.runtime_options(store_dir))
        try:
            bundle.store.register()
            with bundle.store.locked():
                if bundle.store.head() is None and bundle.has_init:
                    bundle.init()
            if model_config is not None:
                from .modelconfig import check_config

                check_config(bundle, model_config, settings.allow_updates)
            svc = cls(bundle, settings, auth, os.path.abspath(model_dir), model_name, on_event, log)
            if swept:
                svc.log(f"{model_name}: removed what dead servers or commits left: {swept}", "info")
            if settings.threads() != settings.intra_op_threads:
                svc.log(
                    f"{model_name}: {settings.instances} instances share {available_cpus()} CPU(s): "
                    f"{settings.threads()} ONNX Runtime thread(s) each (parameter intra_op_threads)",
                    "info",
                )
            if settings.allow_updates and settings.update_auth == "none":
                svc.log(f"{model_name}: WARNING update_auth=none: anyone who can reach this server can change its weights")
            if settings.weights_source:
                svc.catch_up()  # join the fleet's active version before reporting ready
            elif settings.s3_allowed_prefixes:
                svc._warm_s3()
            if bundle.version is not None:
                # Another instance may have set the shared store's weights (init and catch-up
                # here return ready): build this instance's session now, not on the first request.
                bundle.infer_session()
            if settings.weights_source and settings.follow_seconds > 0:
                svc.start_following()
            return svc
        except BaseException:
            store = bundle.store
            bundle.unload()
            store.release()  # last one out removes the store; others keep serving from it
            raise

    def close(self) -> None:
        self._stop_follow.set()
        if self._follower is not None:
            self._follower.join(timeout=30)
        store = self.bundle.store
        self.bundle.unload()
        store.release()

    # -- routing -----------------------------------------------------------------
    def handle(self, requests: Sequence[Mapping[str, np.ndarray]]) -> list[Reply]:
        """Replies in request order; a command sees every request before it applied.

        Every request gets its own reply: nothing one request sends can fail another
        request of the same batch, and no exception escapes (a bug becomes that one
        request's INTERNAL error, with the traceback in the server log only).
        """
        replies: list[Reply | None] = [None] * len(requests)
        group: list[int] = []
        for i, req in enumerate(requests):
            if CONTROL_INPUT in req:
                self._infer_group(requests, group, replies)
                group = []
                replies[i] = self._command(req)
            else:
                group.append(i)
        self._infer_group(requests, group, replies)
        return [r if r is not None else Reply(error="internal error: no reply was produced", code="INTERNAL") for r in replies]

    def _infer_group(self, requests: Sequence[Mapping[str, np.ndarray]], idx: list[int], replies: list[Reply | None]) -> None:
        if not idx:
            return
        ok = []
        for i in idx:
            stray = sorted(set(requests[i]) & self.weight_names)
            if stray:
                replies[i] = Reply(
                    error=f'weight input(s) {stray[:5]} sent without a {CONTROL_INPUT} command; add {CONTROL_INPUT}={{"op": "update"}} to update weights'
                )
            else:
                ok.append(i)
        if self.settings.max_batch_size > 0 and len(ok) > 1 and self._batchable([requests[i] for i in ok]):
            self._run_batched(requests, ok, replies)
        else:
            for i in ok:
                replies[i] = self._infer_one(requests[i])

    def _batchable(self, reqs: list[Mapping[str, np.ndarray]]) -> bool:
        first = reqs[0]
        return all(
            set(r) == set(first) and all(r[k].ndim >= 1 and r[k].shape[1:] == first[k].shape[1:] and r[k].dtype == first[k].dtype for k in first) for r in reqs
        )

    def _run_batched(self, requests: Sequence[Mapping[str, np.ndarray]], idx: list[int], replies: list[Reply | None]) -> None:
        try:
            sizes = [len(next(iter(requests[i].values()))) for i in idx]
            feeds = {k: np.concatenate([requests[i][k] for i in idx]) for k in requests[idx[0]]}
            outs, version = self.bundle.infer(feeds)
        except Exception:  # noqa: BLE001 - one bad request must not fail its neighbours: retry each alone
            for i in idx:
                replies[i] = self._infer_one(requests[i])
            return
        start = 0
        for i, n in zip(idx, sizes):
            part = {k: v[start : start + n] for k, v in outs.items()}
            part[VERSION_OUTPUT] = self._version_tensor(version, n)
            replies[i] = Reply(part)
            start += n

    def _infer_one(self, req: Mapping[str, np.ndarray]) -> Reply:
        try:
            outs, version = self.bundle.infer(req)
            rows = len(next(iter(req.values()))) if self.settings.max_batch_size > 0 and req else 1
        except NotInitializedError as e:
            return Reply(error=str(e), code="UNAVAILABLE")
        except BundleError as e:
            return Reply(error=str(e))
        except Exception as e:  # noqa: BLE001
            return self._internal("inference", e)
        outs[VERSION_OUTPUT] = self._version_tensor(version, rows)
        return Reply(outs)

    def _version_tensor(self, version: int, rows: int = 1) -> np.ndarray:
        """[1] without batching; [batch, 1] with it (Triton's batch dim comes first)."""
        return np.full((rows, 1), version, np.uint64) if self.settings.max_batch_size > 0 else np.array([version], np.uint64)

    def _internal(self, what: str, e: BaseException) -> Reply:
        """A bug or an unexpected failure: the client gets a short message, the log the traceback."""
        self.log(f"{self.model_name}: internal error during {what}:\n" + "".join(traceback.format_exception(type(e), e, e.__traceback__)))
        return Reply(error=f"internal error during {what} ({type(e).__name__}); the server log has the details", code="INTERNAL")

    def _emit(self, event: Event) -> None:
        try:  # metrics must never turn a reply into a failure
            self.on_event(event)
        except Exception as e:  # noqa: BLE001
            self.log(f"{self.model_name}: metrics update failed: {e!r}")

    # -- commands ---------------------------------------------------------------------
    def _command(self, req: Mapping[str, np.ndarray]) -> Reply:
        """Run one command.  The reply tells the truth: an error means nothing changed,
        and a success carries the version this very op created (not whatever is current
        by the time the reply is built: other instances may have moved on)."""
        t0 = time.perf_counter()
        op = "?"
        try:
            cmd = parse_command(req[CONTROL_INPUT])
            op = cmd.op
            self.auth.check(cmd)
            result = getattr(self, f"_op_{cmd.op}")(cmd, req)
        except VersionConflictError as e:
            self._emit(Event("update_rejected", op, "conflict"))
            return Reply(error=str(e), code="ALREADY_EXISTS")
        except ControlError as e:
            self._emit(Event("update_rejected", op, e.reason))
            return Reply(error=str(e), code=e.code)
        except BundleError as e:
            self._emit(Event("update_rejected", op, "invalid"))
            return Reply(error=str(e))
        except OSError as e:  # tmpfs full, permissions...: the store is unchanged (writes are atomic)
            self._emit(Event("update_rejected", op, "os_error"))
            self.log(f"{self.model_name}: op {op!r} failed: {e!r}")
            return Reply(
                error=f"op {op!r} failed on the server: {os.strerror(e.errno) if e.errno else type(e).__name__}; the weights are unchanged", code="UNAVAILABLE"
            )
        except Exception as e:  # noqa: BLE001
            self._emit(Event("update_rejected", op, "internal"))
            return self._internal(f"op {op!r}", e)
        version = result.pop("version")
        if cmd.op in MUTATING:
            self._emit(Event("update_applied", cmd.op, seconds=time.perf_counter() - t0, version=version))
            self.log(f"{self.model_name}: {cmd.op} -> weights version {version} ({(time.perf_counter() - t0) * 1000:.0f} ms)", "info")
        body = json.dumps({"op": cmd.op, "version": version, **result}).encode()
        out = {RESULT_OUTPUT: np.array([body], dtype=object)}
        if version is not None:
            out[VERSION_OUTPUT] = self._version_tensor(version)
        if self.settings.max_batch_size > 0:
            out[RESULT_OUTPUT] = out[RESULT_OUTPUT].reshape(1, 1)
        return Reply(out)

    def _warm(self) -> None:
        """Build the session for the newest version now, so the next inference does not wait
        (rollback: the ops through ``Bundle`` (update, reset, activate) return ready).

        Best effort, after the op was applied: a failure here (e.g. a newer update from
        another instance collected this version meanwhile) must not report the op as failed.
        """
        try:
            self.bundle.infer_session()
        except Exception as e:  # noqa: BLE001 - the next inference builds it again
            self.log(f"{self.model_name}: warming the new version's session failed: {e!r}")

    def _weights_from_request(self, req: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Weight inputs of a command; with batching, strip the leading batch dim of 1."""
        stray = sorted(set(req) - self.weight_names - {CONTROL_INPUT})
        if stray:
            raise ControlError(f"a command request carries non-weight input(s) {stray}; send inference in a separate request")
        shapes = {u.name: u.shape for u in self.bundle.update_inputs}
        out = {}
        for name in self.weight_names & set(req):
            a = req[name]
            if self.settings.max_batch_size > 0:
                if a.ndim == 0 or a.shape[0] not in (0, 1):
                    raise ControlError(f"weight {name!r}: with batching the leading dimension must be 1 (one command), got shape {a.shape}")
                a = a.reshape(a.shape[1:]) if a.shape[0] == 1 else np.empty((0,), a.dtype)
            if shapes[name] == () and a.shape == (1,):  # a scalar travels as dims [1] (Triton has no rank 0)
                a = a.reshape(())
            out[name] = a
        return out

    def _op_update(self, cmd: Command, req: Mapping[str, np.ndarray]) -> dict[str, Any]:
        weights = self._weights_from_request(req)
        nonfinite = bool(cmd.args.get("reject_nonfinite", False)) or self.settings.reject_nonfinite
        source = cmd.args.get("source")
        kw: dict[str, Any] = {"expected_version": cmd.expected_version, "reject_nonfinite": nonfinite, "version": _version_arg(cmd)}
        if source is None:
            version = self.bundle.update(weights, **kw)
            return {"version": version, "updated": sorted(k for k, v in weights.items() if v.size)}
        f, wanted = self._open_checkpoint(source, weights)
        with f:
            direct = None
            if not any(a.size for a in weights.values()):
                # The file alone: pread it straight into the store's staging blob, one copy,
                # where the update graph would only copy (see Bundle.update_direct).
                direct = self.bundle.update_direct({n: f.spec(n) for n in wanted}, f.read_into, **kw)
            if direct is not None:
                return {"version": direct, "updated": sorted(wanted)}
            weights.update(f.read(wanted))
        version = self.bundle.update(weights, **kw)
        return {"version": version, "updated": sorted(k for k, v in weights.items() if v.size)}

    def _open_checkpoint(self, source: Any, sent: Mapping[str, np.ndarray]) -> tuple[Checkpoint, list[str]]:
        """The file (allowlisted) or client shm region a ``source`` names, opened and checked,
        and the tensors to take from it."""
        if not isinstance(source, dict) or set(source) - {"file", "shm", "only"} or len(set(source) & {"file", "shm"}) != 1:
            raise ControlError('\'source\' must be {"file": "/abs/path.safetensors"} or {"shm": "wbpush-<name>"}, with optional "only": [names]')
        only = source.get("only")
        if only is not None and (not isinstance(only, list) or not all(isinstance(n, str) for n in only)):
            raise ControlError("'source.only' must be a list of weight names")
        if "shm" in source:
            f = Checkpoint(source["shm"], shm=True)
        else:
            f = Checkpoint(source["file"], self.settings.file_update_dirs)
        try:
            wanted = list(only) if only else f.names
            f.check(wanted)
            both = sorted(set(wanted) & {k for k, v in sent.items() if v.size})
            if both:
                raise ControlError(f"weight(s) {both} given both as tensors and in the file; send each once")
        except BaseException:
            f.close()
            raise
        return f, wanted

    def _weights_from_file(self, source: Any, sent: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        f, wanted = self._open_checkpoint(source, sent)
        with f:
            return f.read(wanted)

    def _op_status(self, cmd: Command, req: Mapping[str, np.ndarray]) -> dict[str, Any]:
        self._no_weights(req)
        store = self.bundle.store
        cur = store.current()
        result: dict[str, Any] = {
            "version": None if cur is None else cur.number,
            "retained_versions": store.versions(),
            "history": self.settings.history,
            "updates_enabled": self.auth.enabled,
            "staged": [st.describe() for st in self.bundle.staged_versions()],
        }
        # A CRC32 of a 4-byte weight is the weight: only callers holding the secret get them.
        want = cmd.args.get("checksums")
        allowed = self.auth.authenticated(cmd)
        if want and not allowed:
            raise ControlError("'checksums' need the update secret: send \"secret\" with the status command", reason="auth")
        if cur is not None and allowed and want is not False:
            result["checksums"] = {v.name: f"{zlib.crc32(raw_bytes(store.array(cur, v.name))) & 0xFFFFFFFF:08x}" for v in self.bundle.variables}
        return result

    def _op_reset(self, cmd: Command, req: Mapping[str, np.ndarray]) -> dict[str, Any]:
        self._no_weights(req)
        store = self.bundle.store
        with store.transaction(cmd.expected_version):
            version = self.bundle.init(version=_version_arg(cmd))
        return {"version": version}

    def _op_rollback(self, cmd: Command, req: Mapping[str, np.ndarray]) -> dict[str, Any]:
        self._no_weights(req)
        v = self.bundle.store.rollback(cmd.expected_version, version=_version_arg(cmd))
        self._warm()
        return {"version": v.number, "restored": v.op}

    def _op_commit(self, cmd: Command, req: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Persist the current weights as a new version folder (see repository.py)."""
        self._no_weights(req)
        if self.model_dir is None:
            raise ControlError("commit needs the model's repository folder")
        store = self.bundle.store
        if store.head() is None:
            raise ControlError("nothing to commit: no weights yet")
        with store.transaction(cmd.expected_version) as cur:  # one commit at a time, no update until it is written
            assert cur is not None  # a store never loses its head
            folder = write_version(self.model_dir, self.settings.bundle_filename, lambda f: self.bundle.export_to(f, cur))
        return {
            "version": cur.number,
            "committed_version": cur.number,
            "model_version_folder": folder,
            "path": os.path.join(self.model_dir, str(folder), self.settings.bundle_filename),
        }

    def _no_weights(self, req: Mapping[str, np.ndarray]) -> None:
        if set(req) - {CONTROL_INPUT}:
            raise ControlError(f"this op takes no tensors besides {CONTROL_INPUT}, got {sorted(set(req) - {CONTROL_INPUT})}")

    # -- fleets: two-phase ops and the object store (docs/fleet.md) ------------------------
    def _op_stage(self, cmd: Command, req: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Verify weights and write them as a staged version that serves nothing yet."""
        version = _version_arg(cmd)
        nonfinite = bool(cmd.args.get("reject_nonfinite", False)) or self.settings.reject_nonfinite
        source = cmd.args.get("source")
        weights = self._weights_from_request(req)
        extra: dict[str, Any] = {}
        origin = None
        op = "stage"
        if isinstance(source, dict) and "s3" in source:
            if set(source) != {"s3"}:
                raise ControlError('an s3 source is {"s3": "s3://bucket/prefix/model/v<N>"} and nothing else')
            if any(a.size for a in weights.values()):
                raise ControlError("send weights as tensors or from the object store, not both")
            fetched, url = self._fetch_s3(source["s3"])
            number = fetched.manifest["version"]
            if version is not None and version != number:
                raise ControlError(f"'version' {version} differs from the object-store version {number} ({url})")
            version, weights = number, fetched.tensors
            origin = {"s3": str(url), "sha256": fetched.sha256}
            op = f"stage {url}"
            extra = {"fetched_bytes": fetched.bytes, "fetched_objects": len(fetched.objects), "fetch_ms": round(fetched.seconds * 1000, 1)}
        elif source is not None:
            weights.update(self._weights_from_file(source, weights))
        st = self.bundle.stage(weights, version=version, reject_nonfinite=nonfinite, ttl=self.settings.staged_ttl_seconds, op=op, origin=origin)
        # "version" is what serves (unchanged): a staged version serves nothing until activated
        return {"version": self.bundle.version, "staged_version": st.number, "digest": st.digest, "base": st.base, "staged": sorted(st.entries), **extra}

    def _op_activate(self, cmd: Command, req: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Publish a staged version: one rename and one manifest write under the store lock,
        so every instance of this model serves it from their next request on."""
        self._no_weights(req)
        v = self.bundle.activate(_required_version(cmd), cmd.expected_version)
        return {"version": v.number, "activated": v.number}

    def _op_abort(self, cmd: Command, req: Mapping[str, np.ndarray]) -> dict[str, Any]:
        self._no_weights(req)
        st = self.bundle.abort(_required_version(cmd))
        return {"version": self.bundle.version, "aborted": st.number}

    def _warm_s3(self) -> None:
        """Make the S3 client at load (importing boto3 takes ~0.5 s), not in the first stage.
        Best effort: a missing credential is reported by the stage that needs it."""
        try:
            self._s3_client()
        except BundleError:
            pass

    def _s3_client(self) -> Any:
        from .objectstore import make_client, read_credentials

        creds = read_credentials(self.settings.s3_credentials_file)  # re-read each time: keys may be rotated
        if self._s3 is None or self._s3[0] != creds:
            self._s3 = (creds, make_client(self.settings.s3_endpoint, creds, self.settings.s3_region))
        return self._s3[1]

    def _fetch_s3(self, url_text: Any, trusted: bool = False) -> tuple[Any, Any]:
        """Fetch and verify a published version, skipping tensors this server already holds.

        ``trusted``: the url comes from this model's own config (weights_source), not a command.
        """
        from .objectstore import check_allowed, fetch_version, parse_url

        url = parse_url(str(url_text))
        if not trusted:
            check_allowed(url, self.settings.s3_allowed_prefixes)
        cur = self.bundle.store.current()
        have = ((cur.origin or {}).get("sha256") if cur is not None else None) or {}
        weights = {u.name: (u.dtype, tuple(int(d) for d in u.shape or () if d is not None)) for u in self.bundle.update_inputs}
        return fetch_version(self._s3_client(), url, weights, have, self.settings.s3_spool_dir), url

    def catch_up(self) -> int | None:
        """Stage and activate the fleet's ACTIVE version if this store is behind it.

        Runs under the store lock, so of several instances starting together one
        fetches and the others find the store already there.  Returns the version
        activated, or None when there was nothing to do (no ACTIVE yet, or not behind).
        """
        from .objectstore import ObjectStoreError, parse_url, read_active

        model_url = parse_url(self.settings.weights_source)
        store = self.bundle.store
        try:
            active = read_active(self._s3_client(), model_url)
        except ObjectStoreError as e:
            raise ObjectStoreError(f"catch-up from weights_source {model_url}: {e}") from None
        if active is None:
            return None
        with store.locked():
            head = store.head()
            if head is not None and head >= active.version:
                return None
            if store.staged(active.version) is not None:
                return None  # a fleet push is between its phases here: it activates what it staged
            version_url = model_url.child(f"v{active.version}")
            try:
                fetched, _ = self._fetch_s3(version_url, trusted=True)
                st = self.bundle.stage(
                    fetched.tensors,
                    version=active.version,
                    ttl=self.settings.staged_ttl_seconds,
                    op=f"catch-up {version_url}",
                    origin={"s3": str(version_url), "sha256": fetched.sha256},
                )
            except BundleError as e:
                raise BundleError(f"catch-up to the fleet's active version {active.version} ({version_url}) failed: {e}") from None
            try:
                v = self.bundle.activate(st.number)
            except BundleError:
                self.bundle.abort(st.number)  # ours: do not leave it staged
                raise
        self._emit(Event("update_applied", "catch_up", version=v.number))
        return v.number

    def start_following(self) -> None:
        """Follow mode: poll ACTIVE every follow_seconds and catch up (stage + activate)."""

        def run() -> None:
            while not self._stop_follow.wait(self.settings.follow_seconds):
                try:
                    self.catch_up()
                except BundleError as e:  # keep serving what we have; try again next tick
                    self.log(f"{self.model_name}: follow: {e}")
                except Exception as e:  # noqa: BLE001 - never let the thread die silently
                    self.log(f"{self.model_name}: follow failed: {e!r}")

        self._follower = threading.Thread(target=run, name=f"weightbundle-follow-{self.model_name}", daemon=True)
        self._follower.start()


def _required_version(cmd: Command) -> int:
    v = _version_arg(cmd, required=True)
    assert v is not None  # _version_arg raised otherwise
    return v


def _version_arg(cmd: Command, required: bool = False) -> int | None:
    """The command's publisher-chosen ``version`` (checked here; the store checks it exceeds the current one)."""
    v = cmd.args.get("version")
    if v is None:
        if required:
            raise ControlError(f"op {cmd.op!r} needs 'version': the staged version to {cmd.op}")
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ControlError(f"'version' must be a non-negative integer, got {v!r}")
    return v
