"""The bundle file format: encode and decode, nothing else.

Layout (all integers little-endian; full spec in docs/bundle-format.md)::

    [header 64 B][TOC json][graph sections][zero padding to 4096][weight section]

Every byte is covered: header and TOC by CRC32, each graph and each initial
weight by its own CRC32, and all padding must be zero.  So any corruption or
truncation is detected as a ``FormatError`` before a single byte is trusted.
"""

from __future__ import annotations

import io
import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Mapping, Sequence

import numpy as np

from .errors import ChecksumError, FormatError

MAGIC = b"\x89WBNDL\r\n"  # non-ASCII first byte + CRLF catch text-mode mangling, as PNG does
FORMAT_MAJOR = 1
FORMAT_MINOR = 1  # 1.1: optional TOC 'sources' and 'derived' (weight preprocessing hoisted into the update graph)
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sHHIQQIQ")  # magic, major, minor, flags, toc_off, toc_len, toc_crc, file_len
TENSOR_ALIGN = 64  # cache line / AVX-512: numpy views of an mmap are SIMD-friendly
SECTION_ALIGN = 4096  # the weight section starts on a page so it can be mmapped

GRAPH_INFERENCE, GRAPH_INIT, GRAPH_UPDATE = 0, 1, 2
GRAPH_KINDS = {GRAPH_INFERENCE: "inference", GRAPH_INIT: "init", GRAPH_UPDATE: "update"}

# dtype names as written in the TOC; numpy names, restricted to what ORT and safetensors share.
DTYPES: dict[str, np.dtype] = {
    n: np.dtype(n) for n in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool")
}


def crc32(data: Any) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def raw_bytes(arr: np.ndarray) -> memoryview:
    """Bytes of an array (C-contiguous copy if needed); works for 0-d and zero-size shapes
    (memoryview.cast does not).  Writes go through to ``arr`` when it is contiguous."""
    return memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # numpy 1.x stubs lack __buffer__


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class VariableSpec:
    """One refreshable weight: the row of the variable table."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.np_dtype.itemsize  # (np.prod: 17 us a call, ~1,200 calls per ResNet-50 update)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "nbytes": self.nbytes}


@dataclass
class Layout:
    """A decoded bundle: TOC plus zero-copy views into the buffer."""

    toc: dict[str, Any]
    graphs: dict[int, memoryview]  # graph id -> ONNX ModelProto bytes
    variables: list[VariableSpec]
    initial: dict[str, np.ndarray] | None  # read-only views; None when built without init
    extra: dict[str, memoryview] = field(default_factory=dict)
    sources: list[VariableSpec] = field(default_factory=list)  # update-graph inputs; = variables in 1.0 bundles
    derived: dict[str, list[str]] = field(default_factory=dict)  # derived variable -> its sources
    aliases: dict[str, str] = field(default_factory=dict)  # tied update input -> the source it sets


def encode(
    graphs: Mapping[int, bytes],
    variables: Sequence[VariableSpec],
    initial: Mapping[str, np.ndarray] | None,
    meta: Mapping[str, Any] | None = None,
    extra: Mapping[str, bytes] | None = None,
) -> bytes:
    """Serialise graphs, variable table and (optionally) initial weights into bundle bytes."""
    buf = io.BytesIO()
    write(buf, graphs, variables, initial, meta, extra)
    return buf.getvalue()


def write(
    f: BinaryIO,
    graphs: Mapping[int, bytes],
    variables: Sequence[VariableSpec],
    initial: Mapping[str, np.ndarray] | None,
    meta: Mapping[str, Any] | None = None,
    extra: Mapping[str, bytes] | None = None,
) -> int:
    """Stream a bundle into a seekable binary file; returns its length.

    Weights are read once, checksummed as they are written, and never gathered in
    memory, so writing a 10 GB bundle (``commit``) needs no 10 GB buffer.  The TOC is
    sized with maximal checksum widths, then rewritten in place at the end.
    """
    sections: list[tuple[str, bytes]] = [(f"graph:{gid}", bytes(graphs[gid])) for gid in sorted(graphs)]
    sections += [(f"extra:{k}", bytes(v)) for k, v in sorted((extra or {}).items())]
    var_rows = [v.to_json() for v in variables]
    weights_len = 0
    if initial is not None:
        for row, v in zip(var_rows, variables):
            row["offset"] = weights_len
            row["crc32"] = 0xFFFFFFFF  # widest value: the real one never makes the TOC longer
            weights_len = _align(weights_len + v.nbytes, TENSOR_ALIGN)

    def toc_for(base: int) -> tuple[dict[str, Any], int]:
        off = end = base
        toc_graphs, toc_extra = [], {}
        for name, blob in sections:
            entry = {"offset": off, "length": len(blob), "crc32": crc32(blob)}
            if name.startswith("graph:"):
                gid = int(name.split(":")[1])
                toc_graphs.append({"id": gid, "kind": GRAPH_KINDS[gid], **entry})
            else:
                toc_extra[name.split(":", 1)[1]] = entry
            end = off + len(blob)  # the file ends exactly where its last section does
            off = _align(end, TENSOR_ALIGN)
        weights = None
        if initial is not None:
            woff = _align(off, SECTION_ALIGN)
            weights = {"offset": woff, "length": weights_len, "align": TENSOR_ALIGN}
            end = woff + weights_len
        toc = {"graphs": toc_graphs, "variables": var_rows, "weights": weights, "extra": toc_extra, **(meta or {})}
        return toc, end

    toc, _ = toc_for(0)
    toc_len = _align(len(json.dumps(toc).encode()) + 256, TENSOR_ALIGN)
    toc, total = toc_for(_align(HEADER_SIZE + toc_len, TENSOR_ALIGN))

    start = f.tell()
    pos = 0

    def put(at: int, data: Any) -> None:  # zero padding up to ``at``, then ``data``
        nonlocal pos
        if at > pos:
            f.write(bytes(at - pos))
        f.write(data)
        pos = at + memoryview(data).nbytes

    put(0, bytes(HEADER_SIZE + toc_len))  # header and TOC are written last, in place
    for (_name, blob), entry in zip(sections, toc["graphs"] + list(toc["extra"].values())):
        put(entry["offset"], blob)
    if initial is not None:
        base = toc["weights"]["offset"]
        for row, v in zip(var_rows, variables):
            data = raw_bytes(initial[v.name])
            if len(data) != v.nbytes:
                raise ValueError(f"initial value of {v.name!r} has {len(data)} bytes, expected {v.nbytes}")
            row["crc32"] = crc32(data)
            put(base + row["offset"], data)
    if total > pos:
        f.write(bytes(total - pos))
    toc_bytes = json.dumps(toc).encode()
    assert len(toc_bytes) <= toc_len
    toc_bytes += b" " * (toc_len - len(toc_bytes))
    header = _HEADER.pack(MAGIC, FORMAT_MAJOR, FORMAT_MINOR, 0, HEADER_SIZE, toc_len, crc32(toc_bytes), total)
    f.seek(start)
    f.write(header + struct.pack("<I", crc32(header)) + bytes(HEADER_SIZE - _HEADER.size - 4) + toc_bytes)
    f.seek(start + total)
    return total


def _spec_row(row: Any, what: str, seen: set[str]) -> VariableSpec:
    """A TOC row (variable or source) as a spec: a unique string name, a known dtype, int dims."""
    _require(isinstance(row, dict), f"TOC {what} entries must be objects")
    name, dtype, shape = row.get("name"), row.get("dtype"), row.get("shape")
    _require(isinstance(name, str) and name and name not in seen, f"{what} name {name!r} is empty, not a string or duplicated")
    _require(dtype in DTYPES, f"{what} {name!r} has unsupported dtype {dtype!r}")
    _require(isinstance(shape, list), f"{what} {name!r} shape must be a list")
    return VariableSpec(str(name), str(dtype), tuple(_int(d, f"{what} {name!r} dim") for d in shape))


def _require(cond: object, msg: str) -> None:
    if not cond:
        raise FormatError(msg)


def _check_zero(buf: memoryview, start: int, end: int, what: str) -> None:
    if end > start and any(buf[start:end]):
        raise FormatError(f"non-zero padding bytes in {what} at offset {start}..{end}: the file is corrupted")


def decode(buffer: Any, verify_weights: bool = True) -> Layout:
    """Parse and fully validate bundle bytes (bytes, bytearray, memoryview or mmap)."""
    buf = memoryview(buffer).cast("B") if not isinstance(buffer, memoryview) else buffer.cast("B")
    n = len(buf)
    _require(n >= HEADER_SIZE, f"file too short for a bundle header: {n} bytes, need at least {HEADER_SIZE}")
    _require(bytes(buf[:8]) == MAGIC, f"not a weightbundle file: bad magic {bytes(buf[:8])!r}, expected {MAGIC!r}")
    magic, major, minor, flags, toc_off, toc_len, toc_crc, file_len = _HEADER.unpack_from(buf, 0)
    (hcrc,) = struct.unpack_from("<I", buf, _HEADER.size)
    if hcrc != crc32(buf[: _HEADER.size]):
        raise ChecksumError("header checksum mismatch: the bundle header is corrupted")
    _check_zero(buf, _HEADER.size + 4, HEADER_SIZE, "header")
    _require(major == FORMAT_MAJOR, f"unsupported bundle format version {major}.{minor}; this weightbundle reads {FORMAT_MAJOR}.x")
    _require(flags == 0, f"unknown header flags 0x{flags:x}")
    _require(file_len == n, f"bundle is truncated or has trailing bytes: header says {file_len} bytes, got {n}")
    _require(toc_off == HEADER_SIZE and toc_off + toc_len <= n, f"TOC range {toc_off}+{toc_len} lies outside the file ({n} bytes)")
    toc_raw = bytes(buf[toc_off : toc_off + toc_len])
    if crc32(toc_raw) != toc_crc:
        raise ChecksumError("TOC checksum mismatch: the table of contents is corrupted")
    try:
        toc = json.loads(toc_raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"TOC is not valid JSON: {e}") from None
    _require(isinstance(toc, dict), "TOC must be a JSON object")
    try:
        return _decode_toc(buf, toc, toc_off + toc_len, verify_weights)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"malformed TOC: {type(e).__name__}: {e}") from None


def _int(v: Any, what: str) -> int:
    _require(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{what} must be a non-negative integer, got {v!r}")
    return v


def _decode_toc(buf: memoryview, toc: dict[str, Any], toc_end: int, verify_weights: bool) -> Layout:
    n = len(buf)
    ranges: list[tuple[int, int, str]] = []

    def section(entry: dict[str, Any], what: str) -> memoryview:
        off, length = _int(entry["offset"], f"{what} offset"), _int(entry["length"], f"{what} length")
        _require(off >= toc_end and off + length <= n, f"{what} range {off}+{length} lies outside the file ({n} bytes)")
        data = buf[off : off + length]
        if crc32(data) != entry["crc32"]:
            raise ChecksumError(f"{what} checksum mismatch at offset {off}: the section is corrupted")
        ranges.append((off, off + length, what))
        return data

    graphs: dict[int, memoryview] = {}
    _require(isinstance(toc["graphs"], list), "TOC 'graphs' must be a list")
    for g in toc["graphs"]:
        gid = _int(g["id"], "graph id")
        _require(gid in GRAPH_KINDS, f"unknown graph id {gid}; known ids are 0 (inference), 1 (init), 2 (update)")
        _require(gid not in graphs, f"graph id {gid} appears twice in the graph table")
        _require(g.get("kind") == GRAPH_KINDS[gid], f"graph id {gid} has kind {g.get('kind')!r}, expected {GRAPH_KINDS[gid]!r}")
        graphs[gid] = section(g, f"graph {gid} ({GRAPH_KINDS[gid]})")
    _require(GRAPH_INFERENCE in graphs and GRAPH_UPDATE in graphs, f"bundle needs graphs 0 and 2, has {sorted(graphs)}")
    extra = {str(k): section(e, f"section {k!r}") for k, e in dict(toc.get("extra") or {}).items()}

    variables: list[VariableSpec] = []
    rows = toc["variables"]
    _require(isinstance(rows, list) and rows, "TOC 'variables' must be a non-empty list")
    seen: set[str] = set()
    for row in rows:
        spec = _spec_row(row, "variable", seen)
        name, dtype, shape = spec.name, spec.dtype, row["shape"]
        _require(row["nbytes"] == spec.nbytes, f"variable {name!r}: nbytes {row['nbytes']} disagrees with dtype {dtype} and shape {shape} ({spec.nbytes})")
        seen.add(name)
        variables.append(spec)

    initial = None
    w = toc.get("weights")
    if w is not None:
        woff, wlen = _int(w["offset"], "weights offset"), _int(w["length"], "weights length")
        _require(woff % SECTION_ALIGN == 0 and woff >= toc_end and woff + wlen <= n, f"weight section {woff}+{wlen} is misplaced (file {n} bytes)")
        ranges.append((woff, woff + wlen, "weights"))
        initial = {}
        cursor = 0
        for row, spec in zip(rows, variables):
            off = _int(row["offset"], f"variable {spec.name!r} offset")
            _require(
                off % TENSOR_ALIGN == 0 and off >= cursor and off + spec.nbytes <= wlen,
                f"variable {spec.name!r} data {off}+{spec.nbytes} is outside or misaligned in the weight section",
            )
            _check_zero(buf, woff + cursor, woff + off, "weight section")
            data = buf[woff + off : woff + off + spec.nbytes]
            if verify_weights and crc32(data) != row["crc32"]:
                raise ChecksumError(f"initial weight {spec.name!r} checksum mismatch: the weight data is corrupted")
            initial[spec.name] = np.frombuffer(data, dtype=spec.np_dtype).reshape(spec.shape)
            cursor = off + spec.nbytes
        _check_zero(buf, woff + cursor, woff + wlen, "weight section")
    _require(GRAPH_INIT not in graphs or initial is not None, "bundle has an init graph but no weight section")

    # Every byte between sections must be zero padding; overlapping sections are corrupt.
    ranges.sort()
    cursor = toc_end
    for start, end, what in ranges:
        _require(start >= cursor, f"{what} overlaps the previous section")
        _check_zero(buf, cursor, start, "padding")
        cursor = end
    _require(cursor == n, f"{n - cursor} unexpected bytes after the last section")
    sources, derived, aliases = _decode_sources(toc, variables)
    return Layout(toc=toc, graphs=graphs, variables=variables, initial=initial, extra=extra, sources=sources, derived=derived, aliases=aliases)


def _decode_sources(toc: dict[str, Any], variables: list[VariableSpec]) -> tuple[list[VariableSpec], dict[str, list[str]], dict[str, str]]:
    """Format 1.1: the update inputs (sources) and what each derived variable is computed from.

    Absent (1.0 bundles): every variable is its own source.  A variable that is not derived
    must be a source with the same dtype and shape (the update graph passes it through).
    """
    rows = toc.get("sources")
    if rows is None:
        _require(not toc.get("derived"), "TOC has 'derived' but no 'sources'")
        return list(variables), {}, {}
    _require(isinstance(rows, list) and rows, "TOC 'sources' must be a non-empty list")
    sources: list[VariableSpec] = []
    aliases: dict[str, str] = {}
    seen: set[str] = set()
    for row in rows:
        sources.append(_spec_row(row, "source", seen))
        name = row["name"]
        seen.add(name)
        if "alias_of" in row:
            aliases[name] = row["alias_of"]
    derived_raw = toc.get("derived") or {}
    _require(isinstance(derived_raw, dict), "TOC 'derived' must be an object")
    by_name = {s.name: s for s in sources}
    for a, p in aliases.items():
        _require(
            p in by_name and p not in aliases and by_name[p].dtype == by_name[a].dtype and by_name[p].shape == by_name[a].shape,
            f"source {a!r} is an alias of {p!r}, which is not a source of the same dtype and shape",
        )
    table = {v.name for v in variables}
    derived: dict[str, list[str]] = {}
    for name, deps in derived_raw.items():
        _require(name in table and name not in by_name, f"derived variable {name!r} is not in the variable table, or is also a source")
        _require(
            isinstance(deps, list) and deps and all(d in by_name and d not in aliases for d in deps),
            f"derived variable {name!r}: its sources {deps!r} are not all sources",
        )
        derived[name] = list(deps)
    for v in variables:
        if v.name not in derived:
            _require(
                v.name in by_name and v.name not in aliases and by_name[v.name] == v,
                f"variable {v.name!r} is neither derived nor a source of the same dtype and shape",
            )
    return sources, derived, aliases
