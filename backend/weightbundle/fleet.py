"""A fleet of servers at one weight version: stage everywhere, then activate (two phases).

``push`` is the coordinator behind ``weightbundle fleet push``:

1. every server reports its version (a server already at N is left alone: a push can be re-run);
2. every other server stages N from the object store, in parallel, before a deadline;
3. if any stage fails or the deadline passes, every server aborts N and keeps serving N-1;
4. all staged digests must agree (same weights everywhere), or it aborts;
5. the decision is recorded: ``ACTIVE`` is written with a conditional put (a concurrent
   push loses here, and aborts);
6. every server activates N with ``expected_version`` = the version it reported in step 1.

Activation is a rename under the store lock on each server: milliseconds.  A server
that dies after step 5 and before activating joins at N when it restarts (catch-up
reads ``ACTIVE``).  The protocol and its guarantees: docs/fleet.md.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from . import objectstore as osx
from .errors import BundleError


class FleetError(BundleError):
    """A fleet operation failed; ``report`` says what each server did."""

    def __init__(self, message: str, report: "PushReport | None" = None):
        super().__init__(message)
        self.report = report


@dataclass
class ServerReport:
    url: str
    before: int | None = None
    staged: bool = False
    stage_ms: float | None = None
    activate_ms: float | None = None
    fetched_bytes: int | None = None
    fetch_ms: float | None = None  # part of stage_ms: download + sha256 verification on the server
    digest: str | None = None
    after: int | None = None
    skipped: bool = False  # already at the version
    error: str | None = None


@dataclass
class PushReport:
    version: int
    source: str
    ok: bool = False
    servers: list[ServerReport] = field(default_factory=list)
    active_written: bool = False  # ACTIVE names this version (written by this push, or already)
    aborted: bool = False
    stage_wall_ms: float = 0.0
    activate_wall_ms: float = 0.0
    message: str = ""

    def table(self) -> str:
        rows = [f"{'server':<24} {'before':>6} {'stage ms':>9} {'fetch ms':>9} {'fetched':>10} {'activate ms':>11} {'now':>5}  note"]
        for s in self.servers:
            fetched = "-" if s.fetched_bytes is None else _size(s.fetched_bytes)
            note = "already at version" if s.skipped else (s.error or "")
            rows.append(
                f"{s.url:<24} {_f(s.before):>6} {_f(s.stage_ms, 1):>9} {_f(s.fetch_ms, 1):>9} {fetched:>10} {_f(s.activate_ms, 2):>11} {_f(s.after):>5}  {note}"
            )
        rows.append(f"stage (all, parallel): {self.stage_wall_ms:.1f} ms; activate (all, parallel): {self.activate_wall_ms:.2f} ms")
        rows.append(self.message)
        return "\n".join(rows)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _f(v: Any, nd: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def resolve_source(url_text: str, model: str, version: int | None = None) -> tuple[osx.S3Url, int | None]:
    """``s3://b/prefix`` (as given to publish) or ``s3://b/prefix/<model>/v<N>`` -> (model url, N or None)."""
    url = osx.parse_url(url_text)
    last = url.key.rsplit("/", 1)[-1]
    if last.startswith("v") and last[1:].isdigit():
        model_url, n = osx.split_version_url(url)
        if version is not None and n != version:
            raise FleetError(f"--version {version} differs from the version in {url_text} (v{n})")
        return model_url, n
    return url.child(model), version


def _client(url: str, model: str, secret: str | None, timeout: float) -> Any:
    from .client import WeightClient

    return WeightClient(url, model, secret=secret, timeout=timeout)


def _parallel(fn: Callable[[str], Any], servers: Sequence[str], timeout: float) -> dict[str, tuple[Any, BaseException | None, float]]:
    """Run ``fn(server)`` for every server at once; collect (result, error, ms). A call past
    ``timeout`` counts as failed; its thread is left to its own (bounded) network timeout."""
    pool = cf.ThreadPoolExecutor(max_workers=max(1, len(servers)))
    t0 = time.perf_counter()

    def timed(s: str) -> tuple[Any, float]:
        t = time.perf_counter()
        r = fn(s)
        return r, (time.perf_counter() - t) * 1000

    futs = {pool.submit(timed, s): s for s in servers}
    done, _ = cf.wait(futs, timeout=max(0.0, timeout))
    pool.shutdown(wait=False)
    out: dict[str, tuple[Any, BaseException | None, float]] = {}
    for f, s in futs.items():
        if f in done and f.exception() is None:
            r, ms = f.result()
            out[s] = (r, None, ms)
        elif f in done:
            out[s] = (None, f.exception(), (time.perf_counter() - t0) * 1000)
        else:
            out[s] = (None, TimeoutError(f"no answer within the deadline ({timeout:.1f} s)"), timeout * 1000)
    return out


def push(
    servers: Sequence[str],
    model: str,
    version: int,
    source: str,
    *,
    secret: str | None = None,
    deadline: float = 120.0,
    s3: Any = None,
    record_active: bool = True,
    active_history: list[int] | None = None,
) -> PushReport:
    """Bring every server to ``version`` staged from ``source``, all or none. Raises FleetError."""
    model_url, n = resolve_source(source, model, version)
    version = version if n is None else n
    vurl = model_url.child(f"v{version}")
    report = PushReport(version, str(vurl), servers=[ServerReport(u) for u in servers])
    by_url = {r.url: r for r in report.servers}
    if len(by_url) != len(servers):
        raise FleetError("a server is listed twice")
    t_end = time.monotonic() + deadline
    prev = None
    if s3 is not None and record_active:
        prev = osx.read_active(s3, model_url)
        if prev is not None and prev.version > version:
            raise FleetError(f"the fleet's active version is {prev.version}; version {version} is older (versions never go down)")
        osx.read_manifest(s3, model_url, version)  # fail fast: not published, bad manifest

    # phase 1: stage everywhere
    def stage(url: str) -> dict[str, Any]:
        left = max(1.0, t_end - time.monotonic())
        with _client(url, model, secret, left) as c:
            st = c.status(checksums=False)
            by_url[url].before = st["version"]
            if st["version"] == version:
                by_url[url].skipped = True
                return {}
            return c.stage(source={"s3": str(vurl)}, version=version)

    t0 = time.perf_counter()
    try:
        results = _parallel(stage, servers, t_end - time.monotonic())
    except BaseException:  # Ctrl-C while staging: leave nothing staged behind
        _abort_all(servers, model, version, secret, by_url)
        raise
    report.stage_wall_ms = (time.perf_counter() - t0) * 1000
    failed = []
    for url, (r, e, ms) in results.items():
        s = by_url[url]
        if e is not None:
            timed_out = isinstance(e, TimeoutError) or "timed out" in str(e)  # ours, or the client's network timeout
            s.error = f"stage failed: no answer within the deadline ({deadline:g} s)" if timed_out else f"stage failed: {e}"
            failed.append(url)
        elif not s.skipped:
            s.staged, s.stage_ms, s.digest, s.fetched_bytes, s.fetch_ms = True, ms, r.get("digest"), r.get("fetched_bytes"), r.get("fetch_ms")
    if not failed:
        digests = {s.digest for s in report.servers if s.staged}
        if len(digests) > 1:
            for s in report.servers:
                s.error = s.error or f"staged digest {str(s.digest)[:12]}… differs between servers"
            failed = [s.url for s in report.servers if s.staged]
    if not failed and s3 is not None and record_active and (prev is None or prev.version != version):
        try:  # the commit point: from here on, N is the fleet's version (a re-run finds it recorded)
            osx.write_active(s3, model_url, version, prev, history=active_history)
            report.active_written = True
        except BundleError as e:
            failed = list(servers)
            report.message = f"could not record the active version: {e}"
    if not failed and prev is not None and prev.version == version:
        report.active_written = True
    if failed:
        _abort_all(servers, model, version, secret, by_url)
        report.aborted = True
        bad = ", ".join(f"{u}: {by_url[u].error}" for u in failed if by_url[u].error) or report.message
        report.message = f"push of version {version} aborted on every server; they keep serving their versions. {bad}"
        raise FleetError(report.message, report)

    # phase 2: activate everywhere (each with its own compare-and-swap)
    def activate(url: str) -> dict[str, Any]:
        s = by_url[url]
        if s.skipped:
            return {"version": version}
        with _client(url, model, secret, 30.0) as c:
            c.signature()  # model config fetched before timing: the figure is the activation itself
            t = time.perf_counter()
            r = c.activate(version, expected_version=s.before)
            s.activate_ms = (time.perf_counter() - t) * 1000
            return r

    t0 = time.perf_counter()
    results = _parallel(activate, servers, 60.0)
    report.activate_wall_ms = (time.perf_counter() - t0) * 1000
    failed = []
    for url, (r, err, _) in results.items():
        if err is not None:
            by_url[url].error = f"activate failed: {err}"
            failed.append(url)
        else:
            by_url[url].after = r["version"]
    if failed:
        report.message = (
            f"version {version} is recorded as active and activated on {len(servers) - len(failed)} of {len(servers)} "
            f"servers; {', '.join(failed)} did not activate: they join at {version} on restart (catch-up) "
            f"or when this push is run again"
        )
        raise FleetError(report.message, report)
    report.ok = True
    report.message = f"fleet at version {version}: {len(servers)} server(s)"
    return report


def _abort_all(servers: Sequence[str], model: str, version: int, secret: str | None, by_url: dict[str, ServerReport]) -> None:
    """Best effort, bounded: a server that cannot be reached drops its staged version at its ttl or restart."""

    def abort(url: str) -> None:
        with _client(url, model, secret, 5.0) as c:
            try:
                c.abort(version)
            except Exception as e:
                if "is not staged" not in str(e):
                    raise

    for url, (_, e, _) in _parallel(abort, servers, 8.0).items():
        if e is not None and by_url[url].error is None:
            by_url[url].error = f"abort failed: {e}"


def status(servers: Sequence[str], model: str, s3: Any = None, source: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """Each server's version and staged versions, plus the fleet's ACTIVE pointer when a source is given."""

    def one(url: str) -> dict[str, Any]:
        with _client(url, model, None, timeout) as c:
            return c.status(checksums=False)

    out: dict[str, Any] = {"servers": {}}
    for url, (r, e, _) in _parallel(one, servers, timeout + 5).items():
        out["servers"][url] = {"error": str(e)} if e is not None else {"version": r["version"], "staged": r.get("staged", [])}
    if s3 is not None and source:
        model_url, _ = resolve_source(source, model)
        a = osx.read_active(s3, model_url)
        out["active"] = None if a is None else {"version": a.version, "history": a.history}
        out["published"] = osx.published_versions(s3, model_url)
    return out


def rollback(servers: Sequence[str], model: str, source: str, s3: Any, *, secret: str | None = None, deadline: float = 120.0) -> PushReport:
    """Activate the previously active weights everywhere, under a new, higher version number.

    The previous version's manifest is republished as version M (no data copied), so
    every server still only moves forward and reports M for those weights; ACTIVE's
    history drops the rolled-back version, so a second rollback walks further back.
    """
    model_url, _ = resolve_source(source, model)
    a = osx.read_active(s3, model_url)
    if a is None or not a.history:
        raise FleetError(f"nothing to roll back to: {model_url}/ACTIVE " + ("does not exist" if a is None else f"has no version before {a.version}"))
    target = a.history[-1]
    number = max([a.version, *osx.published_versions(s3, model_url)]) + 1
    osx.publish_alias(s3, model_url, number, target)
    report = push(servers, model, number, str(model_url.child(f"v{number}")), secret=secret, deadline=deadline, s3=s3, active_history=a.history[:-1])
    report.message += f" (rolled back to the weights of version {target})"
    return report
