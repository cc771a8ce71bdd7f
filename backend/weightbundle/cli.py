"""``weightbundle`` command line: build, inspect, config, serve."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from .errors import BundleError


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
    from .server import serve_from_args

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

    r = publish(_s3_client(a), a.checkpoint, parse_url(a.dest), a.model, a.version, a.delta_from, progress=None if a.quiet else progress_bar())
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
        "--fold-bn", action="store_true", help="fold Conv/Gemm+BatchNormalization into weights the update graph recomputes (default with --checkpoint)"
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
        from .server import add_serve_arguments

        add_serve_arguments(s)
    except ImportError:  # server module missing: keep the other commands usable
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


if __name__ == "__main__":
    sys.exit(main())
