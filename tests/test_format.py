"""Bundle core, part 2: the file format, build_bundle and save_bundle (issue 2, items 2 and 6).

Layout facts (magic, version, aligned weight section, graph and variable tables), the
round trip, the no-init size saving, atomic saves, and above all that every truncated,
corrupted or inconsistent file raises a specific ``BundleError`` subclass with a useful
message -- by hand for each kind of damage and by hypothesis for random damage.
"""

from __future__ import annotations

import functools
import json
import os
import struct

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightbundle import zoo
import weightbundle as wb
from weightbundle import format as fmt
from weightbundle.format import VariableSpec


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _graphs(name: str = "mlp", weights: tuple[str, ...] | None = None) -> wb.RefreshableGraphs:
    factory = {"mlp": lambda: zoo.mlp(sizes=(4, 8, 3)), "mlp_default": zoo.mlp, "convnet": zoo.convnet, "ints": zoo.with_int_initializers}[name]
    return wb.convert(factory(), weights=list(weights) if weights else None)


@functools.lru_cache(maxsize=None)
def small_bundle(include_init: bool = True) -> bytes:
    """A tiny bundle (mlp 4-8-3) so that property tests stay fast."""
    return wb.build_bundle(_graphs("mlp"), include_init=include_init)


def _header(data: bytes) -> dict:
    magic, major, minor, flags, toc_off, toc_len, toc_crc, file_len = fmt._HEADER.unpack_from(data, 0)
    return dict(magic=magic, major=major, minor=minor, flags=flags, toc_off=toc_off, toc_len=toc_len, toc_crc=toc_crc, file_len=file_len)


def _toc(data: bytes) -> dict:
    h = _header(data)
    return json.loads(data[h["toc_off"] : h["toc_off"] + h["toc_len"]].decode())


def _with_header(data: bytes, fix_crc: bool = True, **fields) -> bytes:
    """Rewrite header fields and (by default) recompute the header CRC so only the field is wrong."""
    h = {**_header(data), **fields}
    out = bytearray(data)
    fmt._HEADER.pack_into(out, 0, *h.values())
    if fix_crc:
        struct.pack_into("<I", out, fmt._HEADER.size, fmt.crc32(bytes(out[: fmt._HEADER.size])))
    return bytes(out)


def _with_toc(data: bytes, edit=None, raw: bytes | None = None) -> bytes:
    """Replace the TOC (edited JSON or raw bytes) keeping its length, with valid TOC and header CRCs.

    The result passes every checksum, so what it tests is the *validation* of the TOC.
    """
    h = _header(data)
    if raw is None:
        toc = _toc(data)
        edit(toc)
        raw = json.dumps(toc).encode()
    assert len(raw) <= h["toc_len"], "edited TOC does not fit"
    raw = raw + b" " * (h["toc_len"] - len(raw))
    out = bytearray(data)
    out[h["toc_off"] : h["toc_off"] + h["toc_len"]] = raw
    return _with_header(bytes(out), toc_crc=fmt.crc32(raw))


def _load_and_unload(buf):
    b = wb.Bundle.load_from_mem(buf)
    b.unload()


# ---------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("include_init", [True, False])
def test_undamaged_small_bundle_is_valid(include_init):
    """Precondition of the property tests below: the undamaged bundle decodes and loads."""
    data = small_bundle(include_init)
    layout = fmt.decode(data)
    assert sorted(layout.graphs) == ([0, 1, 2] if include_init else [0, 2])
    _load_and_unload(data)


def test_header_magic_and_version():
    data = small_bundle()
    assert data[:8] == fmt.MAGIC == b"\x89WBNDL\r\n"
    h = _header(data)
    assert (h["major"], h["minor"]) == (fmt.FORMAT_MAJOR, fmt.FORMAT_MINOR)
    assert h["file_len"] == len(data)
    assert h["toc_off"] == fmt.HEADER_SIZE
    assert h["toc_crc"] == fmt.crc32(data[h["toc_off"] : h["toc_off"] + h["toc_len"]])
    (hcrc,) = struct.unpack_from("<I", data, fmt._HEADER.size)
    assert hcrc == fmt.crc32(data[: fmt._HEADER.size])


def test_graph_and_variable_tables():
    g = _graphs("mlp_default")
    data = wb.build_bundle(g)
    toc = _toc(data)
    assert [(e["id"], e["kind"]) for e in toc["graphs"]] == [(0, "inference"), (1, "init"), (2, "update")]
    for e in toc["graphs"]:
        assert e["crc32"] == fmt.crc32(data[e["offset"] : e["offset"] + e["length"]])
    rows = toc["variables"]
    assert [(r["name"], r["dtype"], tuple(r["shape"]), r["nbytes"]) for r in rows] == [(v.name, v.dtype, v.shape, v.nbytes) for v in g.variables]
    assert all("crc32" in r and "offset" in r for r in rows)


def test_weight_section_is_aligned_and_decoded_zero_copy():
    data = wb.build_bundle(_graphs("mlp_default"))
    toc = _toc(data)
    w = toc["weights"]
    assert w["offset"] % fmt.SECTION_ALIGN == 0  # page aligned: mmappable
    for r in toc["variables"]:
        assert r["offset"] % fmt.TENSOR_ALIGN == 0
    buf = np.frombuffer(data, np.uint8)
    layout = fmt.decode(data)
    assert layout.initial is not None
    base = buf.__array_interface__["data"][0]
    for r in toc["variables"]:
        a = layout.initial[r["name"]]
        assert np.shares_memory(a, buf), "initial weights must be views into the buffer, not copies"
        assert a.__array_interface__["data"][0] - base == w["offset"] + r["offset"]
        assert not a.flags.writeable


@pytest.mark.parametrize("name", ["mlp_default", "convnet", "ints"])
def test_decode_round_trip(name):
    g = _graphs(name)
    data = wb.build_bundle(g)
    for buf in (data, bytearray(data), memoryview(data)):
        layout = fmt.decode(buf)
        assert sorted(layout.graphs) == [0, 1, 2]
        assert layout.variables == g.variables
        init = zoo.initializers(g.init)
        for v in g.variables:
            assert layout.initial[v.name].tobytes() == init[f"init/{v.name}"].tobytes()
        # the stored graphs are ONNX models, the update graph exactly the converted one
        assert bytes(layout.graphs[2]) == g.update.SerializeToString()
        onnx.ModelProto().ParseFromString(bytes(layout.graphs[0]))


def test_inference_graph_is_compiled_at_build_time():
    g = _graphs("mlp_default")
    stored = onnx.ModelProto()
    stored.ParseFromString(bytes(fmt.decode(wb.build_bundle(g)).graphs[0]))
    raw = onnx.ModelProto()
    raw.ParseFromString(bytes(fmt.decode(wb.build_bundle(g, optimize=None)).graphs[0]))
    assert raw == g.infer
    # "compile once": the stored graph is ORT's optimised graph (MatMul+Add fused into Gemm/FusedMatMul...)
    assert [n.op_type for n in stored.graph.node] != [n.op_type for n in g.infer.graph.node]
    assert _toc(wb.build_bundle(g))["compiled"]["level"] == "extended"


def test_no_init_bundle_is_smaller_by_the_initial_weights():
    for name in ("mlp_default", "convnet"):
        g = _graphs(name)
        full, bare = wb.build_bundle(g), wb.build_bundle(g, include_init=False)
        assert len(full) - len(bare) >= sum(v.nbytes for v in g.variables)
        layout = fmt.decode(bare)
        assert sorted(layout.graphs) == [0, 2]
        assert layout.initial is None
        assert _toc(bare)["weights"] is None
        assert [(e["id"], e["kind"]) for e in _toc(bare)["graphs"]] == [(0, "inference"), (2, "update")]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(
        st.tuples(st.sampled_from(sorted(fmt.DTYPES)), st.lists(st.integers(1, 5), min_size=0, max_size=3)),
        min_size=1,
        max_size=5,
    ),
    seed=st.integers(0, 2**32 - 1),
    with_initial=st.booleans(),
)
def test_encode_decode_property(specs, seed, with_initial):
    """Any variable table (all dtypes, rank 0..3) survives encode -> decode bit-exactly."""
    rng = np.random.default_rng(seed)
    variables = [VariableSpec(f"v{i}", dt, tuple(shape)) for i, (dt, shape) in enumerate(specs)]
    initial = {v.name: rng.integers(0, 256, v.nbytes, dtype=np.uint8).view(v.np_dtype).reshape(v.shape) for v in variables} if with_initial else None
    graphs = {0: rng.bytes(int(rng.integers(0, 300))), 2: rng.bytes(int(rng.integers(0, 300)))}
    if with_initial:
        graphs[1] = rng.bytes(17)
    data = fmt.encode(graphs, variables, initial)
    layout = fmt.decode(data)
    assert layout.variables == variables
    assert {k: bytes(v) for k, v in layout.graphs.items()} == graphs
    if with_initial:
        for v in variables:
            assert layout.initial[v.name].dtype == v.np_dtype and layout.initial[v.name].shape == v.shape
            assert layout.initial[v.name].tobytes() == initial[v.name].tobytes()
    else:
        assert layout.initial is None


@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0)])
def test_encode_decode_zero_size_variable(shape):
    """A variable with a 0 dimension has 0 bytes of data; encoding it must not crash."""
    variables = [VariableSpec("a", "float32", (3,)), VariableSpec("empty", "float32", shape)]
    initial = {"a": np.arange(3, dtype=np.float32), "empty": np.zeros(shape, np.float32)}
    data = fmt.encode({0: b"g0", 1: b"g1", 2: b"g2"}, variables, initial)
    layout = fmt.decode(data)
    assert layout.variables == variables
    assert layout.initial["empty"].shape == shape
    np.testing.assert_array_equal(layout.initial["a"], initial["a"])


def test_build_model_with_zero_size_float_initializer():
    """A (0, 4) float initializer used as data is a variable under the default rule; it must build and run."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.zeros((0, 4), np.float32), "pad_rows"), numpy_helper.from_array(np.ones((4,), np.float32), "b")]
    g = helper.make_graph(
        [helper.make_node("Concat", ["x", "pad_rows"], ["c"], axis=0), helper.make_node("Add", ["c", "b"], ["y"])],
        "zero",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    graphs = wb.convert(m)
    assert [v.name for v in graphs.variables] == ["pad_rows", "b"]
    data = wb.build_bundle(graphs)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with wb.Bundle.load_from_mem(data) as b:
        b.init()
        np.testing.assert_array_equal(b.execute(0, {"x": x})["y"], x + 1)


# ---------------------------------------------------------------------------------------------
# save_bundle
# ---------------------------------------------------------------------------------------------
def test_save_bundle_atomic_no_temp_files(tmp_path):
    data = small_bundle()
    p = tmp_path / "m.bundle"
    wb.save_bundle(p, data)
    assert os.listdir(tmp_path) == ["m.bundle"]
    assert p.read_bytes() == data
    with wb.Bundle.load_from_file(p) as b:
        assert b.model_num == 3


def test_save_bundle_overwrite_keeps_a_valid_file(tmp_path):
    p = tmp_path / "m.bundle"
    wb.save_bundle(str(p), small_bundle())
    other = wb.build_bundle(_graphs("ints"))
    wb.save_bundle(str(p), other)
    assert os.listdir(tmp_path) == ["m.bundle"]
    assert p.read_bytes() == other
    fmt.decode(p.read_bytes())


def test_save_bundle_failure_leaves_old_file_and_no_temp(tmp_path):
    p = tmp_path / "m.bundle"
    wb.save_bundle(p, small_bundle())

    class Boom:  # a "bytes" object whose write fails half-way through the save
        pass

    with pytest.raises(TypeError):
        wb.save_bundle(p, Boom())  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == ["m.bundle"]
    assert p.read_bytes() == small_bundle()


def test_save_bundle_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wb.save_bundle("rel.bundle", small_bundle())
    assert sorted(os.listdir(tmp_path)) == ["rel.bundle"]


def test_loaded_file_survives_being_overwritten(tmp_path):
    """save_bundle renames over the old file, so a bundle loaded (mmapped) from it is not torn."""
    p = tmp_path / "m.bundle"
    wb.save_bundle(p, small_bundle())
    x = np.ones((2, 4), np.float32)
    ref = zoo.ort_run(zoo.mlp(sizes=(4, 8, 3)), {"x": x})["y"]
    with wb.Bundle.load_from_file(p) as b:
        wb.save_bundle(p, wb.build_bundle(_graphs("ints")))
        b.init()  # reads the initial weights from the (old) mapping
        np.testing.assert_allclose(b.execute(0, {"x": x})["y"], ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# corruption, by hand
# ---------------------------------------------------------------------------------------------
def _expect(data, exc, *fragments):
    """decode and load_from_mem both raise ``exc`` with every fragment in the message."""
    for load in (fmt.decode, _load_and_unload):
        with pytest.raises(exc) as ei:
            load(data)
        msg = str(ei.value)
        for f in fragments:
            assert f in msg, f"{f!r} not in {msg!r}"
    return msg


@pytest.mark.parametrize("n", [0, 1, 8, 63, 64, 100, 4095, -1, -100])
def test_truncated(n):
    data = small_bundle()
    cut = data[:n] if n >= 0 else data[: len(data) + n]
    msg = _expect(cut, wb.FormatError)
    assert "short" in msg or "truncated" in msg


def test_truncated_message_has_sizes():
    data = small_bundle()
    _expect(data[:-10], wb.FormatError, str(len(data)), str(len(data) - 10))


def test_trailing_bytes():
    data = small_bundle()
    _expect(data + b"\0", wb.FormatError, "trailing")
    _expect(data + b"garbage", wb.FormatError, "trailing")


def test_wrong_magic():
    data = small_bundle()
    _expect(b"PK\x03\x04" + data[4:], wb.FormatError, "magic")
    # an ONNX model is not a bundle
    _expect(zoo.mlp().SerializeToString(), wb.FormatError)


def test_bad_header_checksum():
    data = small_bundle()
    bad = _with_header(data, fix_crc=False, minor=fmt.FORMAT_MINOR + 1)
    msg = _expect(bad, wb.ChecksumError, "header")
    assert "checksum" in msg


def test_nonzero_header_padding():
    data = bytearray(small_bundle())
    data[60] = 1
    _expect(bytes(data), wb.FormatError, "header")


def test_unsupported_major_version_and_flags():
    data = small_bundle()
    _expect(_with_header(data, major=2), wb.FormatError, "version")
    _expect(_with_header(data, flags=4), wb.FormatError, "flags")


def test_newer_minor_version_is_readable():
    fmt.decode(_with_header(small_bundle(), minor=fmt.FORMAT_MINOR + 7))


def test_header_file_len_disagrees():
    data = small_bundle()
    _expect(_with_header(data, file_len=len(data) + 64), wb.FormatError, "truncated")


def test_toc_out_of_file():
    data = small_bundle()
    _expect(_with_header(data, toc_len=len(data)), wb.FormatError, "TOC")
    _expect(_with_header(data, toc_off=128), wb.FormatError, "TOC")


def test_bad_toc_checksum():
    data = bytearray(small_bundle())
    h = _header(bytes(data))
    data[h["toc_off"] + 5] ^= 0x20
    _expect(bytes(data), wb.ChecksumError, "TOC")


@pytest.mark.parametrize("gid", [0, 1, 2])
def test_bad_graph_checksum(gid):
    data = bytearray(small_bundle())
    e = next(e for e in _toc(bytes(data))["graphs"] if e["id"] == gid)
    data[e["offset"] + e["length"] // 2] ^= 0xFF
    _expect(bytes(data), wb.ChecksumError, f"graph {gid}", "checksum")


def test_bad_weight_checksum():
    data = bytearray(small_bundle())
    toc = _toc(bytes(data))
    row = toc["variables"][-1]
    data[toc["weights"]["offset"] + row["offset"] + 1] ^= 0x01
    _expect(bytes(data), wb.ChecksumError, row["name"], "checksum")


def test_weight_crc_check_can_be_skipped():
    data = bytearray(small_bundle())
    toc = _toc(bytes(data))
    data[toc["weights"]["offset"] + toc["variables"][0]["offset"]] ^= 0x01
    fmt.decode(bytes(data), verify_weights=False)


def test_nonzero_padding_between_sections():
    data = bytearray(small_bundle())
    toc = _toc(bytes(data))
    last_graph = max(toc["graphs"], key=lambda e: e["offset"])
    gap = last_graph["offset"] + last_graph["length"]
    assert gap < toc["weights"]["offset"]
    data[gap] = 7
    _expect(bytes(data), wb.FormatError, "padding")


def test_nonzero_padding_inside_weight_section():
    data = bytearray(small_bundle())
    toc = _toc(bytes(data))
    r = next(r for r in toc["variables"] if r["nbytes"] % fmt.TENSOR_ALIGN)  # followed by alignment padding
    end = toc["weights"]["offset"] + r["offset"] + r["nbytes"]
    data[end] = 1
    _expect(bytes(data), wb.FormatError, "padding")


# --- a TOC that passes its checksum but lies --------------------------------------------------
def test_toc_not_json():
    data = small_bundle()
    _expect(_with_toc(data, raw=b"{not json"), wb.FormatError, "JSON")
    _expect(_with_toc(data, raw=b"\xff\xfe"), wb.FormatError, "JSON")
    _expect(_with_toc(data, raw=b"[1, 2]"), wb.FormatError, "object")


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda t: t.pop("variables"), "variables"),
        (lambda t: t.pop("graphs"), "graphs"),
        (lambda t: t.__setitem__("graphs", {}), "graphs"),
        (lambda t: t.__setitem__("variables", []), "variables"),
        (lambda t: t.__setitem__("variables", "oops"), "variables"),
        (lambda t: t["graphs"].pop(0), "graphs 0 and 2"),  # no inference graph
        (lambda t: t["graphs"].pop(2), "graphs 0 and 2"),  # no update graph
        (lambda t: t["graphs"].append(dict(t["graphs"][0])), "twice"),
        (lambda t: t["graphs"][0].__setitem__("id", 7), "unknown graph id 7"),
        (lambda t: t["graphs"][0].__setitem__("kind", "update"), "kind"),
        (lambda t: t["graphs"][0].__setitem__("offset", -64), "graph 0"),
        (lambda t: t["graphs"][0].__setitem__("offset", 10**12), "outside"),
        (lambda t: t["graphs"][0].__setitem__("length", 10**12), "outside"),
        (lambda t: t["graphs"][0].__setitem__("offset", "64"), "graph 0"),
        (lambda t: t["graphs"][0].__setitem__("offset", True), "graph 0"),
        (lambda t: t["graphs"][1].__setitem__("offset", t["graphs"][0]["offset"]), "graph"),  # overlap / crc
        (lambda t: t["variables"][0].__setitem__("dtype", "complex64"), "complex64"),
        (lambda t: t["variables"][0].__setitem__("dtype", "object"), "object"),
        (lambda t: t["variables"][0].__setitem__("shape", [4, 9]), "nbytes"),
        (lambda t: t["variables"][0].__setitem__("shape", [-4, -8]), "dim"),
        (lambda t: t["variables"][0].__setitem__("shape", "4x8"), "shape"),
        (lambda t: t["variables"][0].__setitem__("nbytes", 1), "nbytes"),
        (lambda t: t["variables"][1].__setitem__("name", t["variables"][0]["name"]), "duplicated"),
        (lambda t: t["variables"][1].__setitem__("name", ""), "variable name"),
        (lambda t: t["variables"][1].__setitem__("name", 5), "variable name"),
        (lambda t: t["variables"][0].__setitem__("offset", 8), "misaligned"),
        (lambda t: t["variables"][1].__setitem__("offset", 0), "variable"),  # overlaps variable 0
        (lambda t: t["variables"][0].pop("offset"), "offset"),
        (lambda t: t["weights"].__setitem__("offset", t["weights"]["offset"] + 64), "weight section"),
        (lambda t: t["weights"].__setitem__("length", 10**9), "weight section"),
        (lambda t: t.__setitem__("weights", None), "no weight section"),  # init graph but no weights
        (lambda t: t.__setitem__("weights", "x"), "TOC"),
    ],
)
def test_lying_toc(edit, fragment):
    msg = _expect(_with_toc(small_bundle(), edit), wb.FormatError)
    assert fragment in msg, msg


def test_lying_toc_no_init_bundle():
    bare = small_bundle(include_init=False)

    def add_weights(t):
        t["weights"] = {"offset": 4096, "length": 64, "align": 64}

    _expect(_with_toc(bare, add_weights), wb.FormatError)


# --- a valid file whose variable table disagrees with its graphs (needs the runtime) ----------
def _reencode(variables, initial, graphs=None, data=None):
    layout = fmt.decode(data or small_bundle())
    g = {k: bytes(v) for k, v in layout.graphs.items()}
    g.update(graphs or {})
    return fmt.encode(g, variables, initial)


def _load_expect(data, *fragments):
    fmt.decode(data)  # the file itself is well-formed...
    with pytest.raises(wb.FormatError) as ei:  # ...but it is not a consistent bundle
        _load_and_unload(data)
    for f in fragments:
        assert f in str(ei.value), str(ei.value)


def test_variable_table_missing_a_variable():
    layout = fmt.decode(small_bundle())
    vs = layout.variables[1:]
    _load_expect(_reencode(vs, {v.name: layout.initial[v.name] for v in vs}), layout.variables[0].name)


def test_variable_table_extra_variable():
    layout = fmt.decode(small_bundle())
    extra = VariableSpec("ghost", "float32", (3,))
    vs = list(layout.variables) + [extra]
    init = {**layout.initial, "ghost": np.zeros(3, np.float32)}
    _load_expect(_reencode(vs, init), "ghost")


def test_variable_table_renamed_variable():
    layout = fmt.decode(small_bundle())
    old = layout.variables[0]
    vs = [VariableSpec("renamed", old.dtype, old.shape)] + list(layout.variables[1:])
    init = {("renamed" if k == old.name else k): v for k, v in layout.initial.items()}
    _load_expect(_reencode(vs, init), "renamed")


def test_variable_table_wrong_shape():
    layout = fmt.decode(small_bundle())
    old = layout.variables[0]  # fc0.weight (4, 8)
    vs = [VariableSpec(old.name, old.dtype, (8, 4))] + list(layout.variables[1:])
    init = {**layout.initial, old.name: layout.initial[old.name].reshape(8, 4)}
    _load_expect(_reencode(vs, init), "disagree")


def test_variable_table_wrong_dtype():
    layout = fmt.decode(small_bundle())
    old = layout.variables[1]
    vs = list(layout.variables)
    vs[1] = VariableSpec(old.name, "float16", old.shape)
    init = {**layout.initial, old.name: layout.initial[old.name].astype(np.float16)}
    _load_expect(_reencode(vs, init), "disagree")


def test_variable_table_reordered():
    """The update graph's input order is the contract; a reordered table disagrees with it."""
    layout = fmt.decode(small_bundle())
    vs = list(reversed(layout.variables))
    _load_expect(_reencode(vs, dict(layout.initial)), "update graph")


def test_update_graph_for_other_variables():
    layout = fmt.decode(small_bundle())
    other = wb.convert(zoo.mlp(sizes=(4, 8, 3)), weights=["fc0.weight"]).update.SerializeToString()
    _load_expect(_reencode(layout.variables, dict(layout.initial), graphs={2: other}), "update graph")


def test_init_graph_for_other_variables():
    layout = fmt.decode(small_bundle())
    other = wb.convert(zoo.mlp(sizes=(4, 8, 3)), weights=["fc0.weight"]).init.SerializeToString()
    _load_expect(_reencode(layout.variables, dict(layout.initial), graphs={1: other}), "init graph")


def test_graph_bytes_not_onnx():
    layout = fmt.decode(small_bundle())
    for gid in (0, 1, 2):
        bad = _reencode(layout.variables, dict(layout.initial), graphs={gid: b"\xff" * 40})
        with pytest.raises(wb.FormatError):
            _load_and_unload(bad)


def test_load_from_file_errors_name_the_file(tmp_path):
    p = tmp_path / "broken.bundle"
    p.write_bytes(small_bundle()[:-1])
    with pytest.raises(wb.FormatError, match="broken.bundle"):
        wb.Bundle.load_from_file(p)
    e = tmp_path / "empty.bundle"
    e.write_bytes(b"")
    with pytest.raises(wb.FormatError, match="empty"):
        wb.Bundle.load_from_file(e)
    with pytest.raises(wb.BundleError, match="missing.bundle"):
        wb.Bundle.load_from_file(tmp_path / "missing.bundle")
    with pytest.raises(wb.BundleError):
        wb.Bundle.load_from_file(tmp_path)  # a directory


# ---------------------------------------------------------------------------------------------
# corruption, by hypothesis: never anything but BundleError, never success
# ---------------------------------------------------------------------------------------------
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)


def _must_fail(buf) -> None:
    for load in (fmt.decode, _load_and_unload):
        try:
            load(buf)
        except wb.BundleError:
            continue
        except BaseException as e:  # noqa: BLE001 - any other type is the bug we are looking for
            raise AssertionError(f"{load.__name__} raised {type(e).__name__}: {e}, not a BundleError") from e
        raise AssertionError(f"{load.__name__} accepted a damaged bundle")


@PROPERTY
@given(data=st.data())
def test_property_truncation(data):
    for include_init in (True, False):
        full = small_bundle(include_init)
        n = data.draw(st.integers(0, len(full) - 1), label="length")
        _must_fail(full[:n])
        _must_fail(memoryview(full)[:n])


@PROPERTY
@given(data=st.data())
def test_property_single_byte_flip(data):
    full = small_bundle(data.draw(st.booleans(), label="include_init"))
    pos = data.draw(st.integers(0, len(full) - 1), label="offset")
    xor = data.draw(st.integers(1, 255), label="xor")
    buf = bytearray(full)
    buf[pos] ^= xor
    _must_fail(bytes(buf))


@PROPERTY
@given(data=st.data())
def test_property_multi_byte_flips(data):
    full = small_bundle(data.draw(st.booleans(), label="include_init"))
    n = len(full)
    # bias some offsets towards the header and TOC, where the parser does the most work
    pos_st = st.one_of(st.integers(0, n - 1), st.integers(0, min(n - 1, 1024)))
    flips = data.draw(st.dictionaries(pos_st, st.integers(1, 255), min_size=1, max_size=16), label="flips")
    buf = bytearray(full)
    for p, x in flips.items():
        buf[p] ^= x
    _must_fail(memoryview(bytes(buf)))


@PROPERTY
@given(data=st.data())
def test_property_flip_then_truncate_or_extend(data):
    full = small_bundle()
    buf = bytearray(full)
    pos = data.draw(st.integers(0, len(full) - 1))
    buf[pos] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):
        buf = buf[: data.draw(st.integers(0, len(buf)))]
    else:
        buf += data.draw(st.binary(min_size=1, max_size=64))
    _must_fail(bytes(buf))


@PROPERTY
@given(extra=st.binary(min_size=1, max_size=4096))
def test_property_trailing_garbage(extra):
    _must_fail(small_bundle() + extra)


@settings(max_examples=100, deadline=None, database=None)
@given(blob=st.binary(min_size=0, max_size=512))
def test_property_random_bytes_with_magic(blob):
    _must_fail(fmt.MAGIC + blob)


# --- streaming writer (lead) ------------------------------------------------------------------
def test_streaming_write_equals_encode_and_decodes(tmp_path):
    from weightbundle import format as fmt

    specs = [fmt.VariableSpec("a", "float32", (3, 5)), fmt.VariableSpec("b", "float16", (7,)), fmt.VariableSpec("z", "float32", (0, 4))]
    rng = np.random.default_rng(0)
    initial = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float16), "z": np.zeros((0, 4), np.float32)}
    graphs = {0: b"g0" * 10, 1: b"g1", 2: b"g2" * 3}
    data = fmt.encode(graphs, specs, initial, {"producer": "t"}, {"x": b"extra"})
    p = tmp_path / "s.bundle"
    with open(p, "wb") as f:
        f.write(b"")  # writer starts at the current position of a fresh file
        n = fmt.write(f, graphs, specs, initial, {"producer": "t"}, {"x": b"extra"})
    assert n == len(data) and p.read_bytes() == data
    layout = fmt.decode(p.read_bytes())
    for k, v in initial.items():
        np.testing.assert_array_equal(layout.initial[k], v)
