"""Recover, by value, which trainer tensor each initializer of an exported model came from.

Exporters with constant folding on (PyTorch's default) hand over initializers that a
checkpoint cannot name: ``onnx::MatMul_195`` is ``linear1.weight`` transposed,
``conv1.weight`` may hold the conv weight with BatchNorm folded in, and one
initializer may stand for several parameters that were equal at export time
(LayerNorm ones and zeros).  ``recover`` takes the tensors the model was exported
from and rewrites the model so that:

- every matched tensor is a *source* initializer named and shaped as in the checkpoint;
- each original initializer is recomputed from its source(s) by ONNX nodes, which
  ``derive.hoist`` then moves into the update graph.

Transforms tried, in this order (the first that fits exactly wins per candidate):
identity, transpose (any permutation), reshape, a slice along one axis (optionally
transposed after), each after a cast to the initializer's dtype; then BatchNorm
folding of a Conv/Linear weight and bias (compared with a tolerance, since the
exporter's float rounding is not ours).

Ambiguity is never guessed away: when several checkpoint tensors fit one use, the
exporter's per-node metadata (the dynamo exporter records each node's parameters)
or the initializer's own name decide; tied tensors (one tensor under several names)
collapse to their first name; otherwise ``ConvertError`` names the initializer and
its candidates.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ConvertError

_FX_PARAM = re.compile(r"%([pb]_[A-Za-z0-9_]+)")
_BN_PARTS = ("weight", "bias", "running_mean", "running_var")
_EPS = (1e-5, 1e-3, 1e-6, 1e-4)


@dataclass(frozen=True)
class Match:
    """How one initializer is computed from checkpoint tensors."""

    sources: tuple[str, ...]  # checkpoint names, the first is the "main" one
    op: str  # identity | transpose | reshape | slice | bn_weight | bn_bias
    args: tuple[Any, ...] = ()

    def describe(self) -> str:
        a = {
            "transpose": lambda: f" perm={list(self.args[0])}",
            "slice": lambda: f" axis={self.args[0]} [{self.args[1]}:{self.args[2]}]" + (f" then transpose {list(self.args[3])}" if self.args[3] else ""),
            "bn_weight": lambda: f" eps={self.args[0]:g}",
            "bn_bias": lambda: f" eps={self.args[0]:g}",
        }.get(self.op, lambda: "")()
        return f"{self.op}({', '.join(self.sources)}){a}"


def load_checkpoint(checkpoint: Mapping[str, Any] | str | os.PathLike) -> tuple[dict[str, np.ndarray], list[list[str]]]:
    """name -> numpy array, plus groups of names that share memory (tied tensors).

    Accepts a safetensors path, or a mapping of numpy arrays or torch tensors (a
    ``state_dict``).  BF16 tensors become ``ml_dtypes.bfloat16`` arrays.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        try:
            return read_checkpoint(os.fspath(checkpoint)), []
        except Exception as e:  # ControlError/OSError: re-raise as a build error
            raise ConvertError(f"cannot read checkpoint {os.fspath(checkpoint)!r}: {e}") from None
    out: dict[str, np.ndarray] = {}
    ptrs: dict[tuple[int, tuple[int, ...], str], list[str]] = {}
    for k, v in checkpoint.items():
        ptr = None
        if hasattr(v, "detach") and hasattr(v, "data_ptr"):  # a torch tensor (torch itself is not imported here)
            t = v.detach().cpu()
            ptr = (t.data_ptr(), tuple(t.shape), str(t.dtype))
            if str(t.dtype) == "torch.bfloat16":
                import ml_dtypes

                a = t.view(_torch_int16()).numpy().view(ml_dtypes.bfloat16)
            else:
                a = t.numpy()
        else:
            a = np.asarray(v)
            if a.size:
                ptr = (a.__array_interface__["data"][0], a.shape, a.dtype.str)
        out[str(k)] = a
        if ptr is not None and ptr[0]:
            ptrs.setdefault(ptr, []).append(str(k))
    return out, [names for names in ptrs.values() if len(names) > 1]


def read_checkpoint(path: str, only: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Tensors of a local safetensors file (the caller's own file: no allowlist), BF16 included.

    Uses the transport's validating header reader, then reads each tensor with ``pread``.
    """
    from .transport import read_tensors, safetensors_header

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        header, start = safetensors_header(fd, os.fstat(fd).st_size)
        names = list(only) if only is not None else list(header)
        missing = [n for n in names if n not in header]
        if missing:
            raise ConvertError(f"{path} has no tensor(s) {missing[:10]}")
        return read_tensors(fd, header, start, names)
    finally:
        os.close(fd)


def _torch_int16() -> Any:
    import torch  # only reached with torch tensors in hand

    return torch.int16


def _is_float(a: np.ndarray) -> bool:
    return a.dtype.kind == "f" or a.dtype.name == "bfloat16"


def _as(b: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return b if b.dtype == dtype else b.astype(dtype)


def _fingerprint(x: np.ndarray) -> tuple[float, float]:
    """Sum and sum of squares (float64): equal, up to rounding, for any permutation of the values."""
    f = x.astype(np.float64, copy=False).reshape(-1)
    return float(f.sum()), float(np.dot(f, f))


def _same_fp(p: tuple[float, float], q: tuple[float, float]) -> bool:
    return all(abs(x - y) <= 1e-9 * max(abs(x), abs(y), 1e-30) + 1e-30 for x, y in zip(p, q))


def exact_matches(
    a: np.ndarray, ck: Mapping[str, np.ndarray], cast_cache: dict[str, np.ndarray], fp_cache: dict[str, tuple[float, float]] | None = None
) -> list[Match]:
    """Checkpoint tensors that give ``a`` exactly under identity/transpose/reshape/slice (after a cast).

    Cheap filters first, so a model with hundreds of equal-shaped weights stays fast: a
    value fingerprint for whole-tensor transforms, and one leading slice for slices.
    """
    out: list[Match] = []
    fp_cache = {} if fp_cache is None else fp_cache
    fa = _fingerprint(a) if a.size else None
    for name, b0 in ck.items():
        if not _is_float(b0) or b0.size < a.size or a.size == 0:
            continue
        b = cast_cache.get(name)
        if b is None:
            b = cast_cache[name] = np.asarray(_as(b0, a.dtype))
        if b.size == a.size:
            if name not in fp_cache:
                fp_cache[name] = _fingerprint(b)
            if fa is None or not _same_fp(fa, fp_cache[name]):
                continue
            if b.shape == a.shape and np.array_equal(b, a):
                out.append(Match((name,), "identity"))
                continue
            if b.ndim == a.ndim and b.ndim >= 2 and sorted(b.shape) == sorted(a.shape):
                hit = False
                for perm in itertools.permutations(range(b.ndim)):
                    if list(perm) != list(range(b.ndim)) and tuple(b.shape[p] for p in perm) == a.shape and np.array_equal(b.transpose(perm), a):
                        out.append(Match((name,), "transpose", (tuple(perm),)))
                        hit = True
                        break
                if hit:
                    continue
            if b.shape != a.shape and np.array_equal(b.reshape(a.shape), a):
                out.append(Match((name,), "reshape", (tuple(a.shape),)))
            continue
        if b.ndim != a.ndim:
            continue
        # A slice of a fused tensor (in_proj_weight -> q, k, v), maybe transposed afterwards.
        perms: list[tuple[int, ...] | None] = [None]
        perms += [p for p in itertools.permutations(range(a.ndim)) if list(p) != list(range(a.ndim))] if a.ndim >= 2 else []
        for order in perms:
            at = a if order is None else a.transpose(np.argsort(order))  # ``a`` in the source's layout
            for ax in range(b.ndim):
                if b.shape[ax] <= at.shape[ax] or any(b.shape[d] != at.shape[d] for d in range(b.ndim) if d != ax):
                    continue
                n = at.shape[ax]
                bm, am = np.moveaxis(b, ax, 0), np.moveaxis(at, ax, 0)
                k = b.shape[ax] - n + 1
                # starts whose first slice equals a's first slice, in one vectorised pass
                starts = np.flatnonzero((bm[:k] == am[0]).reshape(k, -1).all(axis=1))
                for start in starts.tolist():
                    if np.array_equal(bm[start : start + n], am):
                        out.append(Match((name,), "slice", (ax, start, start + n, tuple(order) if order else None)))
    return out


def bn_groups(ck: Mapping[str, np.ndarray]) -> dict[str, dict[str, str]]:
    """BatchNorm modules in the checkpoint: prefix -> {weight, bias, running_mean, running_var} names."""
    out = {}
    for k in ck:
        if k.endswith(".running_var"):
            p = k[: -len(".running_var")]
            names = {part: f"{p}.{part}" for part in _BN_PARTS}
            if all(n in ck for n in names.values()):
                out[p] = names
    return out


def _bn_scale(ck: Mapping[str, np.ndarray], g: dict[str, str], eps: float) -> np.ndarray:
    return ck[g["weight"]].astype(np.float64) / np.sqrt(ck[g["running_var"]].astype(np.float64) + eps)


def _close(x: np.ndarray, a: np.ndarray) -> bool:
    scale = float(np.abs(a).max()) if a.size else 0.0
    return x.shape == a.shape and bool(np.allclose(x, a.astype(np.float64), rtol=1e-5, atol=1e-6 * max(scale, 1e-6)))


def bn_matches(a: np.ndarray, ck: Mapping[str, np.ndarray], groups: dict[str, dict[str, str]], pairs: dict[str, str]) -> list[Match]:
    """``a`` as a Conv/Linear weight or bias with BatchNorm folded in (tolerance, not exact)."""
    out: list[Match] = []
    if a.ndim >= 2:
        for g in groups.values():
            if ck[g["weight"]].shape != (a.shape[0],):
                continue
            for name, w in ck.items():
                if w.shape != a.shape or not _is_float(w) or name in g.values():
                    continue
                for eps in _EPS:
                    s = _bn_scale(ck, g, eps).reshape((-1,) + (1,) * (a.ndim - 1))
                    if not _close(w[:1].astype(np.float64) * s[:1], a[:1]):  # first output channel: cheap reject
                        continue
                    if _close(w.astype(np.float64) * s, a):
                        out.append(Match((name, g["weight"], g["running_var"]), "bn_weight", (eps,)))
                        break
    elif a.ndim == 1:
        for p, g in groups.items():
            if ck[g["weight"]].shape != a.shape:
                continue
            biases: list[str | None] = [None]
            paired = [wn for wn, grp in pairs.items() if grp == p]
            for wn in paired:
                bias = wn[: -len("weight")] + "bias" if wn.endswith("weight") else None
                if bias in ck:
                    biases = [bias]
            if not paired:
                biases += [n for n, v in ck.items() if n.endswith("bias") and v.shape == a.shape and n not in g.values()]
            for bname in biases:
                for eps in _EPS:
                    s = _bn_scale(ck, g, eps)
                    conv_bias = ck[bname].astype(np.float64) if bname else 0.0
                    if _close((conv_bias - ck[g["running_mean"]].astype(np.float64)) * s + ck[g["bias"]].astype(np.float64), a):
                        srcs = ((bname,) if bname else ()) + (g["weight"], g["bias"], g["running_mean"], g["running_var"])
                        out.append(Match(srcs, "bn_bias", (eps, bname is not None)))
                        break
    return out


def _hints(node: onnx.NodeProto, ck_by_token: Mapping[str, str]) -> set[str]:
    """Checkpoint names the dynamo exporter recorded as this node's parameters."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.fx_node":
            return {ck_by_token[t] for t in _FX_PARAM.findall(p.value) if t in ck_by_token}
    return set()


def _restore_dropped_biases(model: onnx.ModelProto, ck: Mapping[str, np.ndarray], ck_by_token: Mapping[str, str], inits: dict[str, TensorProto]) -> list[str]:
    """The dynamo exporter's optimizer drops a Gemm's all-zero bias; give it back as input C.

    Otherwise a trained bias could never reach the served model.  Only where the node's
    own metadata names the bias, so nothing is guessed.
    """
    restored = []
    used = {i for n in model.graph.node for i in n.input}
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) != 2:
            continue
        if not any(p.key == "pkg.onnxscript.rewriter.rule_name" and "Bias" in p.value for p in node.metadata_props):
            continue
        for name in sorted(_hints(node, ck_by_token)):
            b = ck[name]
            if name.endswith(".bias") and name not in used and name not in inits and b.ndim == 1 and _is_float(b) and not np.any(b.astype(np.float32)):
                w = inits.get(node.input[1])
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                if w is not None and len(w.dims) == 2 and w.dims[0 if trans_b else 1] == b.shape[0]:
                    t = numpy_helper.from_array(np.zeros(b.shape, helper.tensor_dtype_to_np_dtype(w.data_type)), name)
                    model.graph.initializer.append(t)
                    inits[name] = t
                    node.input.append(name)
                    restored.append(name)
                    break
    return restored


def recover(
    model: onnx.ModelProto, checkpoint: Mapping[str, Any] | str | os.PathLike, tied: Sequence[Sequence[str]] | None = None
) -> tuple[list[str], dict[str, Any]]:
    """Rewrite ``model`` (in place) so its weights are the checkpoint's tensors.

    Returns the source names (update inputs, checkpoint order) and a report:
    ``matched`` (initializer -> how), ``constants`` (float initializers no checkpoint
    tensor explains: they stay constants), ``unused`` (checkpoint names that feed
    nothing), ``tied`` (name -> the name it collapsed to), ``restored`` (dropped biases).
    """
    from .convert import PARAM_INPUTS, _FLOATS, split_identity_aliases

    ck, shared = load_checkpoint(checkpoint)
    if not ck:
        raise ConvertError("the checkpoint holds no tensors")
    order = {k: i for i, k in enumerate(ck)}
    tie_of: dict[str, str] = {}
    for group in list(shared) + [list(g) for g in (tied or [])]:
        unknown = [n for n in group if n not in ck]
        if unknown:
            raise ConvertError(f"tied names {unknown} are not in the checkpoint")
        first = min(group, key=order.__getitem__)
        for n in group:
            tie_of[n] = tie_of.get(first, first)
    # the dynamo exporter names lifted parameters p_<name> and buffers b_<name>, dots as underscores
    ck_by_token = {prefix + k.replace(".", "_"): k for k in ck for prefix in ("p_", "b_")}
    g = model.graph
    split_identity_aliases(model, None)  # TorchScript dedup: Identity(kept) -> other_name
    inits = {t.name: t for t in g.initializer}
    restored = _restore_dropped_biases(model, ck, ck_by_token, inits)

    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    as_param: set[str] = set()
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in inits:
                consumers.setdefault(name, []).append((node, i))
                if i in PARAM_INPUTS.get(node.op_type, ()):
                    as_param.add(name)
    candidates = [n for n, t in inits.items() if t.data_type in _FLOATS and len(t.dims) >= 1 and n in consumers and n not in as_param]

    # Shapes that cannot fit: the same name with another shape is the wrong checkpoint.
    for n in candidates:
        if n in ck and tuple(ck[n].shape) != tuple(inits[n].dims) and ck[n].size != int(np.prod(inits[n].dims)):
            raise ConvertError(
                f"checkpoint tensor {n!r} has shape {tuple(ck[n].shape)} but the model's initializer {n!r} has "
                f"{tuple(inits[n].dims)}: is this the checkpoint the model was exported from?"
            )

    groups = bn_groups(ck)
    values = {n: numpy_helper.to_array(inits[n]) for n in candidates}
    cache: dict[str, dict[str, np.ndarray]] = {}
    matches: dict[str, list[Match]] = {}
    fps: dict[str, dict[str, tuple[float, float]]] = {}
    for n in candidates:
        cc = cache.setdefault(values[n].dtype.str, {})
        matches[n] = exact_matches(values[n], ck, cc, fps.setdefault(values[n].dtype.str, {}))
    pairs = (
        {
            m.sources[0]: next(p for p, grp in groups.items() if grp["weight"] == m.sources[1])
            for n in candidates
            for m in bn_matches(values[n], ck, groups, {})
            if m.op == "bn_weight"
        }
        if groups
        else {}
    )
    for n in candidates:
        if not matches[n] and groups:
            matches[n] = bn_matches(values[n], ck, groups, pairs)

    # Per use: pick one match.  Metadata hints first, then the initializer's own name,
    # then a unique candidate (tied names count as one); else refuse.
    new_nodes: list[onnx.NodeProto] = []
    new_consts: list[TensorProto] = []
    report: dict[str, Any] = {"matched": {}, "constants": [], "unused": [], "tied": {}, "restored": restored}
    sources: dict[str, np.dtype] = {}
    drop: set[str] = set()
    for n in candidates:
        ms = matches[n]
        if not ms:
            if n in ck:
                raise ConvertError(
                    f"initializer {n!r} does not equal checkpoint tensor {n!r} under any supported transform "
                    "(identity, transpose, reshape, slice, cast, BatchNorm folding): is this the checkpoint the model was exported from?"
                )
            report["constants"].append(n)
            continue
        canon: dict[Any, Match] = {}
        for m in ms:
            key = (tuple(tie_of.get(s, s) for s in m.sources), m.op, m.args)
            canon.setdefault(key, Match(key[0], m.op, m.args))
        ms = list(canon.values())
        chosen: dict[int, Match] = {}
        for k, (node, _) in enumerate(consumers[n]):
            hinted = [m for m in ms if set(m.sources) & {tie_of.get(h, h) for h in _hints(node, ck_by_token)}]
            pool = hinted or ms
            if len(pool) > 1:
                own = [m for m in pool if m.sources[0] == tie_of.get(n, n) and m.op == "identity"]
                pool = own or pool
            if len(pool) > 1:
                cands = ", ".join(m.describe() for m in pool[:8])
                raise ConvertError(
                    f"initializer {n!r} (shape {tuple(values[n].shape)}, used by {node.op_type} {node.name or node.output[0]!r}) "
                    f"matches several checkpoint tensors: {cands}. weightbundle does not guess: pass tied=[[...]] "
                    "if they are one tensor, or export with names kept (dynamo optimize=False)"
                )
            chosen[k] = pool[0]
        distinct = list(dict.fromkeys(chosen.values()))
        for m in distinct:
            for s in m.sources:
                sources.setdefault(s, values[n].dtype)
            if m.op == "identity" and m.sources[0] == n:
                out = n
            else:
                out = n if len(distinct) == 1 and n not in ck else f"{n}::{m.op}({m.sources[0]})"
                drop.add(n)
                nodes, consts = _derivation(m, out, values[n], ck)
                new_nodes += nodes
                new_consts += consts
            for k, (node, i) in enumerate(consumers[n]):
                if chosen[k] == m:
                    node.input[i] = out
            report["matched"][n if len(distinct) == 1 else out] = m.describe()
    if not sources:
        raise ConvertError(
            f"no initializer of the model matches a checkpoint tensor (checkpoint has {list(ck)[:8]}...): is this the checkpoint the model was exported from?"
        )
    # Replace matched initializers with the sources (checkpoint values, in the model's dtype).
    keep = [t for t in g.initializer if t.name not in drop and t.name not in sources]
    src_names = sorted(sources, key=order.__getitem__)
    src_tensors = [numpy_helper.from_array(np.ascontiguousarray(_as(ck[s], sources[s])), s) for s in src_names]
    del g.initializer[:]
    g.initializer.extend(keep + src_tensors + new_consts)
    # Derivation nodes first: they read only initializers, and topological order must hold.
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(new_nodes + nodes)
    report["tied"] = {k: tie_of[k] for k in ck if tie_of.get(k, k) != k and tie_of[k] in sources}
    report["unused"] = [k for k in ck if k not in sources and k not in report["tied"]]
    return src_names, report


def _derivation(m: Match, out: str, target: np.ndarray, ck: Mapping[str, np.ndarray]) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """ONNX nodes computing ``out`` from the source initializers named in ``m``."""
    p = f"{out}/"
    src = m.sources[0]
    consts: list[TensorProto] = []

    def const(name: str, arr: Any) -> str:
        consts.append(numpy_helper.from_array(np.asarray(arr), p + name))
        return p + name

    if m.op == "identity":
        return [helper.make_node("Identity", [src], [out], name=p + "identity")], []
    if m.op == "transpose":
        return [helper.make_node("Transpose", [src], [out], perm=list(m.args[0]), name=p + "transpose")], []
    if m.op == "reshape":
        return [helper.make_node("Reshape", [src, const("shape", np.array(m.args[0], np.int64))], [out], name=p + "reshape")], consts
    if m.op == "slice":
        ax, start, end, perm = m.args
        sliced = out if perm is None else p + "sliced"
        nodes = [
            helper.make_node(
                "Slice",
                [src, const("starts", np.array([start], np.int64)), const("ends", np.array([end], np.int64)), const("axes", np.array([ax], np.int64))],
                [sliced],
                name=p + "slice",
            )
        ]
        if perm is not None:
            nodes.append(helper.make_node("Transpose", [sliced], [out], perm=list(perm), name=p + "transpose"))
        return nodes, consts
    dt = target.dtype
    eps = m.args[0]
    if m.op == "bn_weight":
        w, gamma, var = m.sources
        nodes = [
            helper.make_node("Add", [var, const("eps", np.array(eps, dt))], [p + "var_eps"]),
            helper.make_node("Sqrt", [p + "var_eps"], [p + "std"]),
            helper.make_node("Div", [gamma, p + "std"], [p + "scale"]),
            helper.make_node("Reshape", [p + "scale", const("shape", np.array([-1] + [1] * (target.ndim - 1), np.int64))], [p + "scale_r"]),
            helper.make_node("Mul", [w, p + "scale_r"], [out]),
        ]
        return nodes, consts
    if m.op == "bn_bias":
        has_bias = m.args[1]
        srcs = list(m.sources)
        b = srcs.pop(0) if has_bias else None
        gamma, beta, mean, var = srcs
        nodes = [
            helper.make_node("Add", [var, const("eps", np.array(eps, dt))], [p + "var_eps"]),
            helper.make_node("Sqrt", [p + "var_eps"], [p + "std"]),
            helper.make_node("Div", [gamma, p + "std"], [p + "scale"]),
        ]
        if b:
            nodes += [
                helper.make_node("Sub", [b, mean], [p + "centered"]),
                helper.make_node("Mul", [p + "centered", p + "scale"], [p + "scaled"]),
                helper.make_node("Add", [p + "scaled", beta], [out]),
            ]
        else:
            nodes += [helper.make_node("Mul", [mean, p + "scale"], [p + "shift"]), helper.make_node("Sub", [beta, p + "shift"], [out])]
        return nodes, consts
    raise ConvertError(f"unknown transform {m.op!r}")


def to_numpy(tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A state_dict (torch tensors or arrays) as numpy arrays; BF16 as ``ml_dtypes.bfloat16``."""
    return load_checkpoint(tensors)[0]


def select_update(inputs: Sequence[str], names: Sequence[str], *, strict: bool = True, require_all: bool = False) -> tuple[list[str], list[str]]:
    """``load_state_dict`` semantics for a push: (names to send, names ignored).

    Names that are not update inputs are an error unless ``strict=False`` (then they are
    ignored and reported); with ``require_all`` every update input must be present.
    """
    from .errors import UpdateError

    known = set(inputs)
    unknown = [n for n in names if n not in known]
    if unknown and strict:
        raise UpdateError(
            f"{len(unknown)} tensor(s) are not update inputs of this model: {unknown[:10]}"
            f"{'...' if len(unknown) > 10 else ''} (pass strict=False / --no-strict to ignore them)"
        )
    if require_all:
        missing = [n for n in inputs if n not in set(names)]
        if missing:
            raise UpdateError(f"require_all: {len(missing)} update input(s) missing: {missing[:10]}{'...' if len(missing) > 10 else ''}")
    return [n for n in names if n in known], unknown
