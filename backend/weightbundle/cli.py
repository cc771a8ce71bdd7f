"""``weightbundle`` command line: build, inspect, config, serve."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Optional, Sequence, Set

from .errors import BundleError, TritonServerError
from .tritonserver import MODEL_CONTROL_MODES, STUB_DEATH_POLICIES, TritonServer


def _cmd_build(a: argparse.Namespace) -> int:
    from .build import build_bundle, save_bundle
    from .convert import convert

    tied = [t.split(",") for t in a.tie] if a.tie else None
    graphs = convert(a.model, weights=a.weights or None, checkpoint=a.checkpoint, tied=tied, hoist=not a.no_hoist, fold_bn=True if a.fold_bn else None)
    data = build_bundle(graphs, include_init=not a.no_init, optimize=None if a.optimize == "none" else a.optimize)
    save_bundle(a.output, data)
    total = sum(v.nbytes for v in graphs.variables)
    print(
        f"wrote {a.output}: {len(data)} bytes, {len(graphs.sources)} update inputs, {len(graphs.variables)} variables "
        f"({len(graphs.derived)} derived; {total} bytes of weights), graphs {'0,1,2' if not a.no_init else '0,2'}"
    )
    r = graphs.report
    if r:
        moved = sum(1 for how in r["matched"].values() if not how.startswith("identity("))
        print(
            f"checkpoint: {len(r['matched'])} initializers matched ({moved} by a transform), "
            f"{len(r['constants'])} left constant {r['constants'][:5]}, unused {r['unused'][:8]}"
            + (f", tied {r['tied']}" if r["tied"] else "")
            + (f", restored dropped {r['restored']}" if r["restored"] else "")
        )
    bn = sum(n.op_type == "BatchNormalization" for n in graphs.infer.graph.node)
    if bn and not a.no_hoist:
        print(
            f"note: {bn} BatchNormalization node(s) stay in the inference graph; ONNX Runtime folds them into the "
            "weights, so each new weight version is optimized again (compile_once cannot apply). "
            "Pass --fold-bn to fold them in the update graph instead."
        )
    return 0


def describe(path: str) -> dict:
    """Everything ``inspect`` shows, as a dict (read straight from the validated TOC)."""
    from . import format as fmt

    with open(path, "rb") as f:
        layout = fmt.decode(f.read())
    toc = layout.toc
    return {
        "file": path,
        "bytes": os.path.getsize(path),
        "format_version": f"{fmt.FORMAT_MAJOR}.{fmt.FORMAT_MINOR}",
        "producer": toc.get("producer"),
        "compiled": toc.get("compiled"),
        "graphs": [{"id": g["id"], "kind": g["kind"], "bytes": g["length"], "crc32": f"{g['crc32']:08x}"} for g in toc["graphs"]],
        "variables": [
            {
                "index": i,
                "name": r["name"],
                "dtype": r["dtype"],
                "shape": r["shape"],
                "bytes": r["nbytes"],
                **({"crc32": f"{r['crc32']:08x}"} if "crc32" in r else {}),
            }
            for i, r in enumerate(toc["variables"])
        ],
        "weights_bytes": sum(r["nbytes"] for r in toc["variables"]),
        "has_initial_weights": toc.get("weights") is not None,
        "update_inputs": [
            {"index": i, "name": s.name, "dtype": s.dtype, "shape": list(s.shape), **({"alias_of": layout.aliases[s.name]} if s.name in layout.aliases else {})}
            for i, s in enumerate(layout.sources)
        ],
        "derived": layout.derived,
    }


def _cmd_inspect(a: argparse.Namespace) -> int:
    d = describe(a.bundle)
    if a.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"{d['file']}: {d['bytes']} bytes, format {d['format_version']}, {d['producer']}")
    print(f"compiled: {d['compiled']}")
    print("graphs:")
    for g in d["graphs"]:
        print(f"  id {g['id']}  {g['kind']:<9}  {g['bytes']:>10} bytes  crc32 {g['crc32']}")
    print(f"update inputs ({len(d['update_inputs'])}; update-graph input order, the trainer's names and layouts):")
    for s in d["update_inputs"]:
        tie = f"  (tied: sets {s['alias_of']})" if "alias_of" in s else ""
        print(f"  {s['index']:>3}  {s['name']:<32} {s['dtype']:<8} {str(tuple(s['shape']))}{tie}")
    print(f"variables ({len(d['variables'])}, {d['weights_bytes']} bytes; store entries):")
    for v in d["variables"]:
        crc = f"  crc32 {v['crc32']}" if "crc32" in v else ""
        src = f"  <- {', '.join(d['derived'][v['name']])}" if v["name"] in d["derived"] else ""
        print(f"  {v['index']:>3}  {v['name']:<32} {v['dtype']:<8} {str(tuple(v['shape'])):<20} {v['bytes']:>12} bytes{crc}{src}")
    if not d["has_initial_weights"]:
        print("no init graph: the first update must set every variable")
    return 0


def _cmd_config(a: argparse.Namespace) -> int:
    from .modelconfig import make_config
    from .runtime import Bundle

    params = dict(p.split("=", 1) for p in a.parameter)
    with Bundle.load_from_file(a.bundle) as b:
        text = make_config(b, a.name, a.max_batch_size, a.instances, parameters=params)
    if a.output:
        with open(a.output, "w") as f:
            f.write(text)
        print(f"wrote {a.output}")
    else:
        sys.stdout.write(text)
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    return serve_from_args(a)


def _cmd_push(a: argparse.Namespace) -> int:
    from .client import CommandError, WeightClient, progress_bar

    secret = os.environ.get(a.secret_env) if a.secret_env else None  # unset: the server says if one is needed
    try:
        with WeightClient(a.url, a.model, protocol=a.protocol, secret=secret) as c:
            r = c.push_file(
                a.weights,
                via=a.via,
                only=a.only,
                expected_version=a.expected_version,
                progress=None if a.quiet else progress_bar(),
                strict=a.strict,
                require_all=a.require_all,
            )
    except CommandError as e:
        print(f"weightbundle push: refused: {e}", file=sys.stderr)
        return 1
    print(r.summary())
    return 0


def _s3_client(a: argparse.Namespace):
    from .objectstore import make_client, read_credentials

    return make_client(a.endpoint or os.environ.get("AWS_ENDPOINT_URL"), read_credentials(a.credentials_file), a.region)


def _cmd_publish(a: argparse.Namespace) -> int:
    from .client import progress_bar
    from .objectstore import parse_url, publish

    r = publish(_s3_client(a), a.checkpoint, parse_url(a.dest), a.model, a.version, a.delta_from, progress=None if a.quiet else progress_bar(desc="publish"))
    print(r.summary())
    return 0


def _cmd_fleet(a: argparse.Namespace) -> int:
    from . import fleet

    servers = [u.strip() for u in a.servers.split(",") if u.strip()]
    if not servers:
        print("weightbundle fleet: --servers needs at least one URL", file=sys.stderr)
        return 2
    secret = os.environ.get(a.secret_env) if a.secret_env else None
    if a.action == "status":
        s3 = _s3_client(a) if a.source else None
        print(json.dumps(fleet.status(servers, a.model, s3, a.source), indent=2))
        return 0
    if not a.source:
        print(f"weightbundle fleet {a.action}: --from s3://bucket/prefix is required", file=sys.stderr)
        return 2
    try:
        if a.action == "push":
            if a.version is None:
                print("weightbundle fleet push: --version is required", file=sys.stderr)
                return 2
            report = fleet.push(servers, a.model, a.version, a.source, secret=secret, deadline=a.deadline, s3=_s3_client(a))
        else:
            report = fleet.rollback(servers, a.model, a.source, _s3_client(a), secret=secret, deadline=a.deadline)
    except fleet.FleetError as e:
        print(e.report.table() if e.report else f"weightbundle fleet {a.action}: {e}", file=sys.stderr)
        return 1
    print(report.table())
    return 0


def _s3_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", help="S3 endpoint URL (default: $AWS_ENDPOINT_URL, else AWS)")
    p.add_argument("--region", default="us-east-1")
    p.add_argument(
        "--credentials-file", help="ini file with aws_access_key_id/aws_secret_access_key under [default] (default: $AWS_ACCESS_KEY_ID/$AWS_SECRET_ACCESS_KEY)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="weightbundle", description="Compile an ONNX model once; refresh its weights while Triton serves it.")
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="convert an ONNX model into a weight-refreshable bundle")
    b.add_argument("model", help="ONNX model file")
    b.add_argument("-o", "--output", required=True, help="bundle file to write")
    b.add_argument("--weights", nargs="+", metavar="NAME", help="initializers to make refreshable (default: float initializers used as data)")
    b.add_argument("--no-init", action="store_true", help="leave out the init graph and initial weights (smaller file)")
    b.add_argument("--optimize", default="extended", choices=["none", "basic", "extended"], help="ORT optimisation applied once at build time")
    b.add_argument(
        "--checkpoint",
        metavar="CKPT.safetensors",
        help="the tensors the model was exported from: initializers are matched to them by value, so pushes use their names and layouts",
    )
    b.add_argument("--tie", action="append", metavar="A,B", help="checkpoint names that are one tensor in the trainer (tied weights)")
    b.add_argument("--no-hoist", action="store_true", help="keep weight preprocessing (Transpose, Slice, ...) in the inference graph")
    b.add_argument(
        "--fold-bn",
        action="store_true",
        help="fold Conv/Gemm+BatchNormalization into weights the update graph recomputes "
        "(default with --checkpoint; lets compile_once apply to Conv+BN models)",
    )
    b.set_defaults(fn=_cmd_build)

    i = sub.add_parser("inspect", help="list graphs, variables and checksums of a bundle")
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=_cmd_inspect)

    c = sub.add_parser("config", help="write a Triton config.pbtxt for a bundle")
    c.add_argument("bundle")
    c.add_argument("--name", required=True, help="model name (its folder in the model repository)")
    c.add_argument("--max-batch-size", type=int, default=0)
    c.add_argument("--instances", type=int, default=1)
    c.add_argument("--parameter", action="append", default=[], metavar="KEY=VALUE", help="model parameter, e.g. allow_updates=true")
    c.add_argument("-o", "--output", help="file to write (default: stdout)")
    c.set_defaults(fn=_cmd_config)

    s = sub.add_parser("serve", help="run a real tritonserver on a model repository (127.0.0.1)")
    try:
        add_serve_arguments(s)
    except ImportError:  # launcher missing: keep the other commands usable
        pass
    s.set_defaults(fn=_cmd_serve)

    u = sub.add_parser("push", help="push weights from a safetensors file to a served model")
    u.add_argument("url", help="server address, e.g. 127.0.0.1:8000 (HTTP) or 127.0.0.1:8001 with --protocol grpc")
    u.add_argument("model")
    u.add_argument("weights", help="safetensors file; tensor names are the bundle's variable names")
    u.add_argument("--via", choices=["auto", "request", "shm", "file"], default="auto", help="transport (auto: shm for a server on this host, else request)")
    u.add_argument("--only", nargs="+", metavar="NAME", help="push only these tensors; the others are kept")
    u.add_argument("--expected-version", type=int, help="compare-and-swap: refuse unless this is the current version")
    u.add_argument(
        "--no-strict",
        dest="strict",
        action="store_false",
        help="ignore (and list) tensors that are not update inputs of the model, like load_state_dict(strict=False)",
    )
    u.add_argument("--require-all", action="store_true", help="refuse unless the file has every update input of the model")
    u.add_argument("--protocol", choices=["http", "grpc"], default="http")
    u.add_argument("--secret-env", default="WEIGHTBUNDLE_SECRET", help="environment variable holding the update secret")
    u.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    u.set_defaults(fn=_cmd_push)

    pub = sub.add_parser("publish", help="upload a safetensors checkpoint as a version in an S3-compatible object store")
    pub.add_argument("checkpoint", help="safetensors file; tensor names are the bundle's variable names")
    pub.add_argument("dest", help="s3://bucket/prefix; the version goes to <prefix>/<model>/v<N>/")
    pub.add_argument("--model", required=True)
    pub.add_argument("--version", type=int, required=True, help="version number (never reused: an existing one is refused)")
    pub.add_argument("--delta-from", type=int, metavar="N", help="upload only the tensors that differ from published version N")
    pub.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _s3_arguments(pub)
    pub.set_defaults(fn=_cmd_publish)

    fl = sub.add_parser("fleet", help="bring several servers to one weight version: stage everywhere, then activate")
    fl.add_argument("action", choices=["push", "status", "rollback"])
    fl.add_argument("--servers", required=True, help="comma-separated HTTP addresses, e.g. 10.0.0.1:8000,10.0.0.2:8000")
    fl.add_argument("--model", required=True)
    fl.add_argument("--version", type=int, help="push: the version to bring every server to")
    fl.add_argument("--from", dest="source", help="s3://bucket/prefix (as given to publish), or s3://bucket/prefix/<model>/v<N>")
    fl.add_argument("--deadline", type=float, default=120.0, help="seconds for every server to stage; else abort everywhere")
    fl.add_argument("--secret-env", default="WEIGHTBUNDLE_SECRET", help="environment variable holding the update secret")
    _s3_arguments(fl)
    fl.set_defaults(fn=_cmd_fleet)

    a = p.parse_args(argv)
    try:
        return a.fn(a)
    except BundleError as e:
        print(f"weightbundle {a.cmd}: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"weightbundle {a.cmd}: error: {e}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------- serve: the foreground launcher
def serve(
    model_repository: str,
    *,
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    model_control_mode: str = "none",
    load_models: Sequence[str] = (),
    backend_config: Sequence[str] = (),
    log_verbose: int = 0,
    log_file: Optional[str] = None,
    start_timeout: float = 120,
    exit_timeout: int = 5,
    on_stub_death: str = "exit",
) -> int:
    """Run tritonserver in the foreground until SIGINT/SIGTERM or until it exits.

    Prints the HTTP, gRPC and metrics URLs and the log path once ready. Returns 0
    after a requested shutdown, 1 if the server failed to start or died, 2 for bad
    arguments, 130 if interrupted while starting. Leaves no process or shm region.

    ``on_stub_death`` says what to do when a python-backend stub dies while its model
    is loaded (Triton 2.51 keeps reporting such a model as ready): ``exit`` stops the
    server and returns 1, so a supervisor restarts it; ``unload`` (explicit mode)
    unloads the model, so it is reported unready; ``reload`` (explicit mode) loads it
    again; ``ignore`` keeps Triton's behaviour.
    """
    stop_requested = threading.Event()
    ready = threading.Event()
    if on_stub_death not in STUB_DEATH_POLICIES:
        print(f"error: on_stub_death must be one of {', '.join(STUB_DEATH_POLICIES)}", file=sys.stderr)
        return 2
    if on_stub_death in ("unload", "reload") and model_control_mode != "explicit":
        print(
            f"error: --on-stub-death={on_stub_death} needs --model-control-mode=explicit (Triton refuses unload and load in the other modes)", file=sys.stderr
        )
        return 2

    def on_signal(signum, _frame) -> None:
        stop_requested.set()
        if not ready.is_set():
            raise KeyboardInterrupt  # abort start(); its cleanup stops the process

    try:
        server = TritonServer(
            model_repository,
            http_port=http_port,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            model_control_mode=model_control_mode,
            load_models=load_models,
            backend_config=backend_config,
            log_verbose=log_verbose,
            log_file=log_file,
            exit_timeout=exit_timeout,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        try:
            server.start(timeout=start_timeout)
        except KeyboardInterrupt:
            print("interrupted while starting; tritonserver stopped", file=sys.stderr)
            return 130
        except TritonServerError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        ready.set()
        if server.swept:
            print(f"removed {len(server.swept)} leftover(s) of dead servers: {', '.join(server.swept)}", flush=True)
        print(
            f"tritonserver ready (pid {server.pid})\n"
            f"  HTTP     http://{server.http_url}\n"
            f"  gRPC     {server.grpc_url}\n"
            f"  metrics  {server.metrics_url}\n"
            f"  log      {server.log_path}\n"
            f"Press Ctrl-C to stop.",
            flush=True,
        )
        reported: Set[int] = set()
        while not stop_requested.is_set() and server.is_running():
            stop_requested.wait(0.5)
            if on_stub_death != "ignore" and not _handle_dead_stubs(server, on_stub_death, reported):
                server.stop()
                return 1
        if not server.is_running():
            print(f"error: tritonserver exited with status {server.returncode}; {server._failure_report()}", file=sys.stderr)
            server.stop()
            return 1
        print("stopping tritonserver ...", flush=True)
        t0 = time.monotonic()
        status = server.stop()
        print(f"tritonserver stopped (status {status}, {time.monotonic() - t0:.1f} s)", flush=True)
        if status:
            # Triton 2.51 spends --exit-timeout-secs on open client connections (idle
            # keep-alive ones too) and then exits 1 without finalizing loaded models.
            print(
                "warning: tritonserver did not shut down cleanly (exit timeout; open client connections?); "
                "its shm regions and weight stores were removed. Use --model-control-mode=explicit "
                "(models are unloaded before the server stops) or a longer --exit-timeout-secs.",
                file=sys.stderr,
                flush=True,
            )
        return 0
    finally:
        ready.set()  # a late signal must not raise inside stop()
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _handle_dead_stubs(server: TritonServer, policy: str, reported: Set[int]) -> bool:
    """Apply ``policy`` to stubs that died (once each); False when the server must stop."""
    dead = [d for d in server.dead_stubs(grace=1.0) if d.pid not in reported]
    if not dead:
        return True
    reported.update(d.pid for d in dead)
    what = ", ".join(f"{d.instance or '?'} (pid {d.pid}, model {d.model!r} version {d.version})" for d in dead)
    print(
        f"error: python backend stub(s) died: {what}. Triton does not restart them and keeps reporting the model as ready; every request routed to them fails.",
        file=sys.stderr,
        flush=True,
    )
    if policy == "exit" or any(d.model == "?" for d in dead):
        print("stopping tritonserver (--on-stub-death=exit, or a stub of an unknown model) ...", file=sys.stderr, flush=True)
        return False
    for model in sorted({d.model for d in dead}):
        try:
            # Triton 2.51 never finishes unloading an instance whose stub died: the model
            # stays UNLOADING (reported unready) until the server exits; do not wait long.
            unloaded = server.unload_model(model, timeout=10)
            if policy == "reload":
                server.load_model(model)
            print(
                f"model {model!r}: {policy}ed (--on-stub-death={policy})" + ("" if unloaded else "; the old instances did not finish unloading"),
                file=sys.stderr,
                flush=True,
            )
        except (OSError, ValueError, urllib.error.URLError) as e:
            print(f"error: could not {policy} model {model!r}: {e}; stopping", file=sys.stderr, flush=True)
            return False
    return True


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``weightbundle serve`` options to ``parser``."""
    parser.add_argument("repository", nargs="?", default="model_repository", help="Triton model repository (default: %(default)s)")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP port on 127.0.0.1 (default: %(default)s)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port on 127.0.0.1 (default: %(default)s)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="metrics port on 127.0.0.1 (default: %(default)s)")
    parser.add_argument(
        "--model-control-mode",
        choices=MODEL_CONTROL_MODES,
        default="none",
        help="'none' loads every model at start; 'explicit' only --load-model ones (default: %(default)s)",
    )
    parser.add_argument("--load-model", action="append", default=[], metavar="NAME", help="model to load at start (explicit mode; repeatable)")
    parser.add_argument(
        "--backend-config", action="append", default=[], metavar="BACKEND,KEY=VALUE", help="e.g. python,shm-default-byte-size=16777216 (repeatable)"
    )
    parser.add_argument("--log-verbose", type=int, default=0, help="Triton log verbosity (default: %(default)s)")
    parser.add_argument("--log-file", default=None, help="server log file (default: a temporary file)")
    parser.add_argument(
        "--exit-timeout-secs",
        type=int,
        default=5,
        metavar="S",
        help="Triton's exit timeout: how long shutdown waits for in-flight requests and open client connections (default: %(default)s)",
    )
    parser.add_argument(
        "--on-stub-death",
        choices=STUB_DEATH_POLICIES,
        default="exit",
        help="when a python backend stub dies (Triton keeps its model 'ready'): exit with status 1, "
        "unload or reload the model (explicit mode), or ignore (default: %(default)s)",
    )
    return parser


def serve_from_args(args: argparse.Namespace) -> int:
    """Run ``serve`` with the options parsed by ``add_serve_arguments``."""
    return serve(
        args.repository,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        model_control_mode=args.model_control_mode,
        load_models=args.load_model,
        backend_config=args.backend_config,
        log_verbose=args.log_verbose,
        log_file=getattr(args, "log_file", None),
        exit_timeout=getattr(args, "exit_timeout_secs", 5),
        on_stub_death=getattr(args, "on_stub_death", "exit"),
    )


if __name__ == "__main__":
    sys.exit(main())
