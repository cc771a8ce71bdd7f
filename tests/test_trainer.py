"""Issue 9: a trainer's state_dict or checkpoint refreshes the served model exactly.

Fixtures (tests/fixtures/torch, written by tools/make_torch_fixtures.py) hold four small
PyTorch models exported by both exporters with folding on and off, their state_dicts
before and after 3 SGD steps, and torch's outputs for both.  No torch needed here.
"""

from __future__ import annotations

import os
import zlib

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file, save_file

import weightbundle as wb
from weightbundle import format as fmt
from weightbundle.convert import is_placeholder

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "torch")
MODELS = ("mlp", "convnet", "transformer", "tied")
EXPORTS = ("ts", "dynamo", "ts_nofold", "dynamo_noopt")
FOLDED = ("ts", "dynamo")  # exported with constant folding: anonymous/transposed/folded initializers
TIED = [["emb.weight", "lm_head.weight"]]  # the tied model's embedding is its output projection


def fixture(name: str) -> tuple[dict, dict, dict]:
    return (
        load_file(os.path.join(FIX, f"{name}.before.safetensors")),
        load_file(os.path.join(FIX, f"{name}.after.safetensors")),
        load_file(os.path.join(FIX, f"{name}.io.safetensors")),
    )


def assert_torch_close(got: np.ndarray, want: np.ndarray) -> None:
    """FP32: rtol 1e-4, atol 1e-5 relative to the output's scale (the issue's tolerance)."""
    scale = max(float(np.abs(want).max()), 1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)


def build(name: str, tag: str, **kw) -> wb.Bundle:
    before, _, _ = fixture(name)
    if tag in FOLDED:
        kw.setdefault("checkpoint", before)
        if name == "tied":
            kw.setdefault("tied", TIED)
    graphs = wb.convert(os.path.join(FIX, f"{name}.{tag}.onnx"), **kw)
    return wb.Bundle.load_from_mem(wb.build_bundle(graphs))


def checksums(b: wb.Bundle) -> dict[str, int]:
    cur = b.store.current()
    return {v.name: zlib.crc32(np.ascontiguousarray(b.store.array(cur, v.name)).tobytes()) for v in b.variables}


@pytest.fixture
def bundles():
    made = []
    yield made
    for b in made:
        b.unload()


def _xy_model(nodes: list, name: str, inits: list, width: int = 4) -> onnx.ModelProto:
    """A float graph x[b, width] -> y[b, width] (opset 17, IR 8) from ``nodes`` and ``inits``."""
    g = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", width])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


# ---------------------------------------------------------------------------------------------
# every fixture: build, init == torch before, push the trained state_dict == torch after
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tag", EXPORTS)
@pytest.mark.parametrize("name", MODELS)
def test_pushed_state_dict_serves_what_torch_computes(name, tag, bundles):
    _, after, io = fixture(name)
    b = build(name, tag)
    bundles.append(b)
    b.init()
    assert_torch_close(b.infer({"x": io["x"]})[0]["y"], io["y_before"])
    r = b.load_state_dict(after, strict=False)
    # what is ignored is only what the model cannot use: BN's step counter, the other name of a tied tensor
    assert all(n.endswith("num_batches_tracked") or (name == "tied" and n in ("emb.weight", "lm_head.weight")) for n in r["ignored"]), r
    assert_torch_close(b.infer({"x": io["x"]})[0]["y"], io["y_after"])
    # the inference graph no longer transposes, slices or folds weights: that moved to the update graph
    g = onnx.load_from_string(bytes(b._layout.graphs[fmt.GRAPH_INFERENCE]))
    placeholders = {t.name for t in g.graph.initializer if is_placeholder(t)}
    assert not [n for n in g.graph.node if n.op_type == "Transpose" and n.input[0] in placeholders]


@pytest.mark.parametrize("tag", FOLDED)
def test_folded_exports_get_the_trainers_names_and_layouts(tag, bundles):
    before, _, _ = fixture("transformer")
    b = build("transformer", tag)
    bundles.append(b)
    names = [s.name for s in b.update_inputs]
    assert set(names) <= set(before)
    assert len(names) == len(before)  # every parameter of the transformer is pushable, each on its own
    for s in b.update_inputs:
        assert s.shape == before[s.name].shape and s.dtype == np.float32


def test_default_dynamo_export_restores_the_dropped_out_proj_bias():
    """The dynamo optimizer removes an all-zero Gemm bias; a trained bias must still arrive."""
    before, _, _ = fixture("transformer")
    g = wb.convert(os.path.join(FIX, "transformer.dynamo.onnx"), checkpoint=before)
    assert "enc.self_attn.out_proj.bias" in g.report["restored"]
    assert "enc.self_attn.out_proj.bias" in [s.name for s in g.sources]


# ---------------------------------------------------------------------------------------------
# partial pushes: one source changes only what is derived from it
# ---------------------------------------------------------------------------------------------
def test_partial_push_of_a_fused_tensor_changes_only_its_derived_variables(bundles):
    _, after, _ = fixture("transformer")
    b = build("transformer", "ts")
    bundles.append(b)
    b.init()
    c0 = checksums(b)
    r = b.load_state_dict({"enc.self_attn.in_proj_weight": after["enc.self_attn.in_proj_weight"]})
    c1 = checksums(b)
    changed = sorted(n for n in c0 if c0[n] != c1[n])
    assert changed == sorted(r["recomputed"]) and changed  # the transposed MatMul weight(s), nothing else
    assert all(b.derived.get(n) == ["enc.self_attn.in_proj_weight"] for n in changed)


def test_dedup_aliases_become_separate_sources(bundles):
    """TorchScript merged the equal LayerNorm params; pushing one must not move the others."""
    b = build("transformer", "ts")
    bundles.append(b)
    b.init()
    names = {s.name for s in b.sources}
    assert {"enc.norm1.bias", "enc.norm2.bias", "norm.bias", "enc.self_attn.out_proj.bias"} <= names
    c0 = checksums(b)
    b.update({"norm.bias": np.full(16, 0.5, np.float32)})
    c1 = checksums(b)
    assert sorted(n for n in c0 if c0[n] != c1[n]) == ["norm.bias"]


def test_multi_source_derivation_uses_the_kept_sources(bundles):
    """Conv+BN folded by the exporter: pushing only bn1.running_var recomputes conv1's folded
    weight and bias from the current conv1/bn1 tensors, which the store keeps."""
    _, after, io = fixture("convnet")
    b = build("convnet", "ts")
    bundles.append(b)
    b.init()
    kept = {v.name for v in b.variables} - {p for p in b.variables_read}
    assert {"conv1.weight", "bn1.running_var", "bn1.weight"} <= kept
    rest = {k: v for k, v in after.items() if k != "bn1.running_var" and not k.endswith("num_batches_tracked")}
    b.load_state_dict(rest)
    c0 = checksums(b)
    r = b.load_state_dict({"bn1.running_var": after["bn1.running_var"]})
    c1 = checksums(b)
    assert sorted(n for n in c0 if c0[n] != c1[n]) == sorted(r["recomputed"])
    assert all("bn1.running_var" in b.derived.get(n, [n]) for n in r["recomputed"])
    assert_torch_close(b.infer({"x": io["x"]})[0]["y"], io["y_after"])
    # rollback walks back to the previous contents, derived and kept entries alike
    b.store.rollback()
    assert checksums(b) == c0


def test_export_reproduces_the_current_state_and_keeps_partial_pushes_working(bundles, tmp_path):
    _, after, io = fixture("convnet")
    b = build("convnet", "ts")
    bundles.append(b)
    b.init()
    b.load_state_dict({k: v for k, v in after.items() if k != "bn2.weight"}, strict=False)
    path = tmp_path / "committed.bundle"
    path.write_bytes(b.export())
    c = wb.Bundle.load_from_file(path)
    bundles.append(c)
    c.init()
    assert checksums(c) == checksums(b)
    assert [s.name for s in c.sources] == [s.name for s in b.sources] and c.derived == b.derived
    c.update({"bn2.weight": after["bn2.weight"]})  # needs the kept conv2/bn2 sources of the exported state
    assert_torch_close(c.infer({"x": io["x"]})[0]["y"], io["y_after"])


def test_format_1_0_bundles_still_load(monkeypatch, bundles):
    """A bundle written before sources existed: every variable is its own source."""
    from weightbundle import zoo

    graphs = wb.convert(zoo.mlp())
    monkeypatch.setattr(fmt, "FORMAT_MINOR", 0)
    layout = fmt.decode(wb.build_bundle(graphs))
    meta = {k: v for k, v in layout.toc.items() if k not in ("graphs", "variables", "weights", "extra", "sources", "derived")}
    old = fmt.encode({k: bytes(v) for k, v in layout.graphs.items()}, layout.variables, layout.initial, meta, {k: bytes(v) for k, v in layout.extra.items()})
    monkeypatch.undo()
    assert fmt.decode(old).toc.get("sources") is None
    b = wb.Bundle.load_from_mem(old)
    bundles.append(b)
    b.init()
    assert [s.name for s in b.update_inputs] == [v.name for v in b.variables]
    b.update({"fc0.weight": np.zeros((16, 32), np.float32)})
    assert not np.asarray(b.store.array(b.store.current(), "fc0.weight")).any()


# ---------------------------------------------------------------------------------------------
# hoisting on synthetic graphs: every op the issue lists
# ---------------------------------------------------------------------------------------------
def _hoist_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x[b,4] through weights preprocessed by Split/Transpose, Gather/Unsqueeze, Cast, Mul/Add/Div, Concat, Reshape, Identity."""
    rng = np.random.default_rng(7)
    w = {
        "qkv": rng.standard_normal((12, 4)).astype(np.float32),
        "table": rng.standard_normal((5, 4)).astype(np.float32),
        "half": rng.standard_normal((4,)).astype(np.float16),
        "a": rng.standard_normal((2, 4)).astype(np.float32),
        "b": rng.standard_normal((2, 4)).astype(np.float32),
        "flat": rng.standard_normal((16,)).astype(np.float32),
    }
    consts = {
        "split": np.array([4, 4, 4], np.int64),
        "row": np.array(3, np.int64),
        "ax0": np.array([0], np.int64),
        "two": np.array(2.0, np.float32),
        "one": np.array(1.0, np.float32),
        "three": np.array(3.0, np.float32),
        "shape44": np.array([4, 4], np.int64),
    }
    n = helper.make_node
    nodes = [
        n("Split", ["qkv", "split"], ["q", "k", "v"], axis=0),
        n("Transpose", ["q"], ["qT"], perm=[1, 0]),
        n("Transpose", ["k"], ["kT"], perm=[1, 0]),
        n("MatMul", ["x", "qT"], ["h1"]),
        n("MatMul", ["h1", "kT"], ["h2"]),
        n("MatMul", ["h2", "v"], ["h3"]),  # v used as [4,4] directly
        n("Gather", ["table", "row"], ["r"], axis=0),
        n("Unsqueeze", ["r", "ax0"], ["r1"]),
        n("Add", ["h3", "r1"], ["h4"]),
        n("Cast", ["half"], ["half32"], to=TensorProto.FLOAT),
        n("Mul", ["half32", "two"], ["hm"]),
        n("Add", ["hm", "one"], ["ha"]),
        n("Div", ["ha", "three"], ["hd"]),
        n("Mul", ["h4", "hd"], ["h5"]),
        n("Concat", ["a", "b"], ["ab"], axis=0),
        n("MatMul", ["h5", "ab"], ["h6"]),
        n("Reshape", ["flat", "shape44"], ["f44"]),
        n("Identity", ["f44"], ["f44i"]),
        n("MatMul", ["h6", "f44i"], ["y"]),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in {**w, **consts}.items()]
    m = _xy_model(nodes, "hoist", inits)
    return m, w


def _ort(model: onnx.ModelProto, x: np.ndarray, weights: dict[str, np.ndarray] | None = None) -> np.ndarray:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if weights and t.name in weights:
            t.CopyFrom(numpy_helper.from_array(weights[t.name].astype(helper.tensor_dtype_to_np_dtype(t.data_type)), t.name))
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_hoisting_moves_every_weight_only_op_out_of_inference(bundles):
    m, w = _hoist_model()
    graphs = wb.convert(m)
    assert [s.name for s in graphs.sources] == list(w)
    ops = [n.op_type for n in graphs.infer.graph.node]
    assert ops == ["MatMul", "MatMul", "MatMul", "Add", "Mul", "MatMul", "MatMul"], ops
    b = wb.Bundle.load_from_mem(wb.build_bundle(graphs))
    bundles.append(b)
    b.init()
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(b.infer({"x": x})[0]["y"], _ort(m, x), rtol=1e-5, atol=1e-5)
    rng = np.random.default_rng(2)
    new = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in w.items()}
    for k in w:  # one source at a time: only what derives from it changes, and the result stays exact
        before = checksums(b)
        b.update({k: new[k]})
        after = checksums(b)
        assert sorted(n for n in before if before[n] != after[n]) == sorted(b.changed_by({k}))
    cur = {k: new[k] for k in w}
    scale = float(np.abs(_ort(m, x, cur)).max())
    np.testing.assert_allclose(b.infer({"x": x})[0]["y"], _ort(m, x, cur), rtol=1e-5, atol=1e-6 * scale)


def test_hoisting_of_one_source_feeding_two_uses_tied(bundles):
    _, after, io = fixture("tied")
    b = build("tied", "ts_nofold")  # names kept: emb.weight feeds the Gather and, transposed, the head
    bundles.append(b)
    b.init()
    uses = [n for n, d in b.derived.items() if d == ["emb.weight"]]
    assert uses and "emb.weight" in b.variables_read
    b.update({"emb.weight": after["emb.weight"]})
    b.update({k: after[k] for k in ("fc.weight", "fc.bias")})
    assert_torch_close(b.infer({"x": io["x"]})[0]["y"], io["y_after"])


# ---------------------------------------------------------------------------------------------
# recovery by value: slices, ambiguity, shapes
# ---------------------------------------------------------------------------------------------
def _anon_slices_model(ck: dict[str, np.ndarray]) -> onnx.ModelProto:
    """What a folding exporter makes of a fused in_proj: three anonymous transposed slices."""
    w = ck["attn.in_proj_weight"]
    inits = [numpy_helper.from_array(np.ascontiguousarray(w[i * 4 : (i + 1) * 4].T), f"onnx::MatMul_{i}") for i in range(3)]
    inits.append(numpy_helper.from_array(ck["norm.weight"], "norm.weight"))
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "onnx::MatMul_0"], ["q"]),
        n("MatMul", ["q", "onnx::MatMul_1"], ["k"]),
        n("MatMul", ["k", "onnx::MatMul_2"], ["v"]),
        n("Mul", ["v", "norm.weight"], ["y"]),
    ]
    m = _xy_model(nodes, "slices", inits)
    return m


def test_recovery_of_transposed_slices_of_a_fused_tensor(bundles):
    rng = np.random.default_rng(3)
    ck = {"attn.in_proj_weight": rng.standard_normal((12, 4)).astype(np.float32), "norm.weight": rng.standard_normal(4).astype(np.float32)}
    graphs = wb.convert(_anon_slices_model(ck), checkpoint=ck)
    assert [s.name for s in graphs.sources] == ["attn.in_proj_weight", "norm.weight"]
    assert graphs.report["matched"]["onnx::MatMul_1"].startswith("slice(attn.in_proj_weight) axis=0 [4:8] then transpose")
    b = wb.Bundle.load_from_mem(wb.build_bundle(graphs))
    bundles.append(b)
    b.init()
    new = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in ck.items()}
    b.update(new)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    want = _ort(_anon_slices_model(new), x)
    np.testing.assert_allclose(b.infer({"x": x})[0]["y"], want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max()))


def test_recovery_casts_a_bf16_checkpoint(bundles):
    rng = np.random.default_rng(4)
    ck32 = {
        "attn.in_proj_weight": rng.standard_normal((12, 4)).astype(ml_dtypes.bfloat16).astype(np.float32),
        "norm.weight": rng.standard_normal(4).astype(ml_dtypes.bfloat16).astype(np.float32),
    }
    ck16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in ck32.items()}
    graphs = wb.convert(_anon_slices_model(ck32), checkpoint=ck16)
    assert [s.dtype for s in graphs.sources] == ["float32", "float32"]


def test_ambiguous_checkpoint_fails_naming_the_candidates():
    ck = {"ln1.weight": np.ones(4, np.float32), "ln2.weight": np.ones(4, np.float32), "w": np.eye(4, dtype=np.float32) * 2}
    n = helper.make_node
    m = _xy_model(
        [n("MatMul", ["x", "w"], ["h"]), n("Mul", ["h", "onnx::Mul_7"], ["y"])],
        "amb",
        [numpy_helper.from_array(ck["w"], "w"), numpy_helper.from_array(np.ones(4, np.float32), "onnx::Mul_7")],
    )
    with pytest.raises(wb.ConvertError, match=r"'onnx::Mul_7'.*ln1\.weight.*ln2\.weight"):
        wb.convert(m, checkpoint=ck)
    # the same names declared as one tensor (tied) resolve it
    graphs = wb.convert(m, checkpoint=ck, tied=[["ln1.weight", "ln2.weight"]])
    assert [s.name for s in graphs.sources] == ["ln1.weight", "w", "ln2.weight"] and graphs.aliases == {"ln2.weight": "ln1.weight"}


def test_tied_fixture_needs_the_tie_when_names_are_copies():
    before, _, _ = fixture("tied")
    with pytest.raises(wb.ConvertError, match="emb.weight.*lm_head.weight"):
        wb.convert(os.path.join(FIX, "tied.ts.onnx"), checkpoint=before)


def test_checkpoint_whose_shapes_do_not_fit_fails():
    before, _, _ = fixture("transformer")
    bad = dict(before, **{"head.bias": np.zeros(7, np.float32)})
    with pytest.raises(wb.ConvertError, match=r"head\.bias.*\(7,\).*\(6,\)"):
        wb.convert(os.path.join(FIX, "transformer.ts.onnx"), checkpoint=bad)
    other = {k: v + 1 for k, v in before.items() if v.dtype.kind == "f"}
    with pytest.raises(wb.ConvertError, match="exported from"):
        wb.convert(os.path.join(FIX, "transformer.ts.onnx"), checkpoint=other)


def test_checkpoint_from_a_safetensors_path(tmp_path):
    before, _, _ = fixture("transformer")
    p = tmp_path / "ck.safetensors"
    save_file(before, str(p))
    graphs = wb.convert(os.path.join(FIX, "transformer.ts.onnx"), checkpoint=str(p))
    assert len(graphs.sources) == 17


# ---------------------------------------------------------------------------------------------
# pushes behave like load_state_dict; bad input leaves the weights byte-identical
# ---------------------------------------------------------------------------------------------
def test_strict_and_require_all(bundles):
    _, after, _ = fixture("mlp")
    b = build("mlp", "ts")
    bundles.append(b)
    b.init()
    c0 = checksums(b)
    with pytest.raises(wb.UpdateError, match="num_batches_tracked"):
        b.load_state_dict(after)
    with pytest.raises(wb.UpdateError, match="require_all.*fc2.bias"):
        b.load_state_dict({"fc1.weight": after["fc1.weight"]}, require_all=True)
    assert checksums(b) == c0
    r = b.load_state_dict(after, strict=False, require_all=True)
    assert r["ignored"] == ["bn.num_batches_tracked"] and set(r["updated"]) == set(after) - {"bn.num_batches_tracked"}


def test_bf16_and_fp16_sources_push_to_fp32_variables(bundles):
    _, after, io = fixture("transformer")
    b = build("transformer", "ts")
    bundles.append(b)
    b.init()
    bf = {k: v.astype(ml_dtypes.bfloat16) for k, v in after.items()}
    b.load_state_dict(bf)
    y_bf = b.infer({"x": io["x"]})[0]["y"]
    ref = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in after.items()}
    b.load_state_dict(ref)
    np.testing.assert_array_equal(b.infer({"x": io["x"]})[0]["y"], y_bf)  # the in-graph cast is exact
    b.load_state_dict({k: v.astype(np.float16) for k, v in after.items()})
    scale = float(np.abs(io["y_after"]).max())
    np.testing.assert_allclose(b.infer({"x": io["x"]})[0]["y"], io["y_after"], rtol=1e-2, atol=1e-2 * scale)


def test_bf16_checkpoint_file_and_nan_rejected(bundles, tmp_path):
    _, after, io = fixture("transformer")
    b = build("transformer", "ts")
    bundles.append(b)
    b.init()
    c0 = checksums(b)
    bad = {k: v.astype(ml_dtypes.bfloat16) for k, v in after.items()}
    bad["enc.linear1.weight"] = bad["enc.linear1.weight"].copy()
    bad["enc.linear1.weight"][3, 2] = np.nan
    with pytest.raises(wb.UpdateError, match="enc.linear1.weight.*NaN"):
        b.load_state_dict(bad, reject_nonfinite=True)
    assert checksums(b) == c0
    from weightbundle.checkpoint import read_checkpoint

    p = tmp_path / "bf16.safetensors"
    save_file({k: v.astype(ml_dtypes.bfloat16).view(np.uint16) for k, v in after.items()}, str(p))
    raw = p.read_bytes()  # safetensors.numpy has no bfloat16: relabel U16 as BF16 in the header
    n = int.from_bytes(raw[:8], "little")
    hdr = raw[8 : 8 + n].replace(b'"U16"', b'"BF16"')
    p.write_bytes(len(hdr).to_bytes(8, "little") + hdr + raw[8 + n :])
    tensors = read_checkpoint(str(p))
    assert tensors["head.weight"].dtype.name == "bfloat16"
    b.load_state_dict(tensors)
    ref = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in after.items()}
    y = b.infer({"x": io["x"]})[0]["y"]
    b.load_state_dict(ref)
    np.testing.assert_array_equal(b.infer({"x": io["x"]})[0]["y"], y)


@pytest.mark.parametrize("tag", FOLDED)
def test_tied_names_are_both_update_inputs_of_one_source(tag, bundles):
    _, after, io = fixture("tied")
    b = build("tied", tag)
    bundles.append(b)
    b.init()
    assert {s.name for s in b.update_inputs} == {"emb.weight", "lm_head.weight", "fc.weight", "fc.bias"}
    assert b.aliases == {"lm_head.weight": "emb.weight"}
    b.load_state_dict(after)  # strict: the whole state_dict, both tied names included
    assert_torch_close(b.infer({"x": io["x"]})[0]["y"], io["y_after"])
    c0 = checksums(b)
    with pytest.raises(wb.UpdateError, match="tied"):
        b.update({"emb.weight": after["emb.weight"], "lm_head.weight": after["emb.weight"] + 1})
    assert checksums(b) == c0
    b.update({"lm_head.weight": after["emb.weight"] * 0 + 0.25})  # either name sets every use of the tensor
    c1 = checksums(b)
    assert sorted(n for n in c0 if c0[n] != c1[n]) == sorted(b.changed_by({"emb.weight"})) and len(b.changed_by({"emb.weight"})) == 2


def test_tied_state_dict_with_shared_memory_needs_no_tie():
    """A torch state_dict converted with .numpy() keeps the tie visible: both names share memory."""
    before, _, _ = fixture("tied")
    sd = dict(before)
    sd["lm_head.weight"] = sd["emb.weight"]  # what {k: v.numpy()} of a tied module gives
    graphs = wb.convert(os.path.join(FIX, "tied.ts.onnx"), checkpoint=sd)
    assert graphs.aliases == {"lm_head.weight": "emb.weight"}


@pytest.mark.parametrize("tag", ["ts_nofold", "dynamo_noopt"])
@pytest.mark.parametrize("name", ["convnet", "mlp"])
def test_unfolded_batchnorm_is_folded_in_the_update_graph(name, tag, bundles):
    """Exported without folding: Conv/Gemm+BatchNormalization become one op whose weights the
    update graph recomputes from the pushed conv and BN tensors; inference runs no BatchNorm."""
    _, after, io = fixture(name)
    b = build(name, tag, fold_bn=True)
    bundles.append(b)
    g = onnx.load_from_string(bytes(b._layout.graphs[fmt.GRAPH_INFERENCE]))
    assert "BatchNormalization" not in [n.op_type for n in g.graph.node]
    bn = "bn1" if name == "convnet" else "bn"
    folded = [v for v, d in b.derived.items() if f"{bn}.running_var" in d]
    assert len(folded) == 2  # weight and bias
    b.init()
    b.load_state_dict({k: v for k, v in after.items() if k != f"{bn}.running_var"}, strict=False)
    r = b.load_state_dict({f"{bn}.running_var": after[f"{bn}.running_var"]})
    assert sorted(r["recomputed"]) == sorted(folded + [f"{bn}.running_var"])  # the kept source itself, and the folded pair
    assert_torch_close(b.infer({"x": io["x"]})[0]["y"], io["y_after"])


def test_batchnorm_folds_in_an_ir3_model(bundles):
    """Old (IR 3) exports list initializers as graph inputs, like the model zoo's ResNet-50:
    folding must still type the derived weights and leave no unread constant behind."""
    from weightbundle import zoo

    m = zoo.convnet()
    m.ir_version = 3
    m.opset_import[0].version = 9
    m.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in m.graph.initializer)
    b = wb.Bundle.load_from_mem(wb.build_bundle(wb.convert(m, fold_bn=True)))
    bundles.append(b)
    assert "BatchNormalization" not in [n.op_type for n in b._graphs[fmt.GRAPH_INFERENCE].graph.node]
    b.init()
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = b.infer({"x": x})[0]["y"]
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))


def test_cli_build_with_checkpoint_and_inspect(tmp_path, capsys):
    from weightbundle.cli import main

    out = str(tmp_path / "tf.bundle")
    assert main(["build", os.path.join(FIX, "transformer.ts.onnx"), "-o", out, "--checkpoint", os.path.join(FIX, "transformer.before.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "17 update inputs" in text and "4 by a transform" in text
    assert main(["inspect", out]) == 0
    text = capsys.readouterr().out
    assert "enc.self_attn.in_proj_weight" in text and "<- enc.self_attn.in_proj_weight" in text and "format 1.1" in text
    bad = str(tmp_path / "bad.safetensors")
    save_file({"head.bias": np.zeros(7, np.float32)}, bad)
    assert main(["build", os.path.join(FIX, "transformer.ts.onnx"), "-o", str(tmp_path / "x.bundle"), "--checkpoint", bad]) == 2
    assert "head.bias" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.bundle")


def test_derived_variables_take_the_staging_fast_path(bundles, monkeypatch):
    """A push of >= 1 MiB is written by the update graph straight into the staging blob, derived
    variables included (IOBinding), not through the plain path."""
    rng = np.random.default_rng(5)
    ck = {"attn.in_proj_weight": rng.standard_normal((1536, 512)).astype(np.float32)}
    w = ck["attn.in_proj_weight"]
    n = helper.make_node
    inits = [numpy_helper.from_array(np.ascontiguousarray(w[i * 512 : (i + 1) * 512].T), f"onnx::MatMul_{i}") for i in range(3)]
    m = _xy_model(
        [n("MatMul", ["x", "onnx::MatMul_0"], ["q"]), n("MatMul", ["q", "onnx::MatMul_1"], ["k"]), n("MatMul", ["k", "onnx::MatMul_2"], ["y"])],
        "big",
        inits,
        width=512,
    )
    b = wb.Bundle.load_from_mem(wb.build_bundle(wb.convert(m, checkpoint={"attn.in_proj_weight": w})))
    bundles.append(b)
    b.init()
    b._updater.after_publish()  # as after an update: init leaves no staging blob
    b._updater.served.set()  # (Bundle._ready sets it once the new version serves)
    b._updater.staging_thread.join()
    monkeypatch.setattr(b._updater, "_run_update", lambda *a: pytest.fail("took the plain path"))
    new = rng.standard_normal(w.shape).astype(np.float32)
    b.update({"attn.in_proj_weight": new})
    x = rng.standard_normal((2, 512)).astype(np.float32)
    want = x @ new[:512].T @ new[512:1024].T @ new[1024:].T
    np.testing.assert_allclose(b.infer({"x": x})[0]["y"], want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))
    # a derived weight's source cannot be written straight into the store: the update graph must run
    b._updater.settle()
    assert b.update_direct({"attn.in_proj_weight": (np.dtype(np.float32), w.shape)}, lambda views: pytest.fail("filled")) is None
