"""Compile once (weightbundle.compiled): learned weight layouts replay ORT's optimizer bit for bit."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import weightbundle as wb
from weightbundle import compiled, zoo
from weightbundle.memory import release_free_memory


def _bundle(model: onnx.ModelProto, **convert_kw) -> wb.Bundle:
    b = wb.Bundle.load_from_mem(wb.build_bundle(wb.convert(model, **convert_kw)), wb.RuntimeOptions(prepack=False))
    b.init()
    return b


def _weights(b: wb.Bundle, seed: int | None = None) -> dict[str, np.ndarray]:
    cur = b.store.current()
    real = {n: np.asarray(b.store.array(cur, n)) for n in b.variables_read}
    if seed is None:
        return real
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(a.shape) * (np.abs(a).mean() + 0.1)).astype(a.dtype) for n, a in real.items()}


def _baked(b: wb.Bundle, weights: dict[str, np.ndarray]) -> ort.InferenceSession:
    """What plain ONNX Runtime serves: the graph with these weights baked in, optimized at "all"."""
    m = onnx.ModelProto()
    m.CopyFrom(b._graphs[0])
    for t in m.graph.initializer:
        if t.name in weights:
            t.CopyFrom(numpy_helper.from_array(weights[t.name], t.name))
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


def _feeds(b: wb.Bundle) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {s.name: rng.standard_normal(tuple(d or 2 for d in s.shape)).astype(s.dtype) for s in b.inputs}


def _assert_replays(b: wb.Bundle, cg: compiled.CompiledGraph) -> None:
    x = _feeds(b)
    for seed in (None, 1, 2):  # the learned weights, then versions the optimizer never saw
        w = _weights(b, seed)
        got = cg.session(w, ort.SessionOptions(), ["CPUExecutionProvider"]).run(None, x)
        want = _baked(b, w).run(None, x)
        for g, e in zip(got, want):
            assert g.tobytes() == e.tobytes(), f"seed {seed}: max diff {np.abs(g - e).max()}"


def test_conv_filters_relaid_like_the_optimizer_bit_for_bit():
    b = _bundle(zoo.convnet(channels=(3, 16, 32)), fold_bn=True)
    cg = compiled.learn(b._graphs[0], _weights(b))
    # Where the optimizer re-laid filters (NCHWc on AVX2/AVX-512 CPUs), it was learned as a
    # transpose, not a per-element gather; where it did not, everything is identity.  The
    # blocking depends on the CPU: 16 output channels on AVX-512 (block 16) is one block, so
    # the first conv's filter is a plain transpose there and a blocked one on AVX2 (block 8).
    optimized_names = {t.name for t in cg.model.graph.initializer}
    relaid = [lay for lay in cg.layouts.values() if not lay.identity]
    assert all(lay.index is None for lay in relaid)
    assert bool(relaid) == bool(optimized_names - set(b.variables_read))
    for lay in relaid:
        assert lay.source.endswith("::bn_fold/weight") and (len(lay.split) > len(lay.padded) or lay.perm != tuple(range(len(lay.perm))))
    _assert_replays(b, cg)
    # the optimized graph is kept without weight bytes: they come from each version
    assert all(t.data_location == TensorProto.EXTERNAL for t in cg.model.graph.initializer if t.name in cg.layouts)
    b.unload()


def test_mlp_needs_no_probes_and_stays_zero_copy():
    b = _bundle(zoo.mlp())
    w = _weights(b)
    cg = compiled.learn(b._graphs[0], w)
    assert cg.layouts and all(lay.identity for lay in cg.layouts.values())
    relaid = cg.relaid(w)
    assert all(np.shares_memory(relaid[n], w[cg.layouts[n].source]) for n in relaid)
    _assert_replays(b, cg)
    b.unload()


def test_relaid_weights_are_used_in_place_and_outlive_the_caller(tmp_path, monkeypatch):
    """With an anchor file, ORT serves the re-laid arrays where they are (no copy at load);
    the session keeps them alive, so dropping every other reference changes nothing."""
    import gc

    assert compiled.in_place_works()  # ONNX Runtime 1.32: only the anchor's existence is checked
    b = _bundle(zoo.convnet(channels=(3, 16, 32)), fold_bn=True)
    cg = compiled.learn(b._graphs[0], _weights(b))
    if all(lay.identity for lay in cg.layouts.values()):
        b.unload()
        pytest.skip("this CPU's optimizer re-lays no filter (no NCHWc)")
    (tmp_path / "anchor").write_bytes(b"")
    x = _feeds(b)
    w = _weights(b, seed=1)
    want = cg.session(w, ort.SessionOptions(), ["CPUExecutionProvider"]).run(None, x)  # copied at load
    so = ort.SessionOptions()
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(tmp_path))
    sess = cg.session(w, so, ["CPUExecutionProvider"], anchor="anchor")
    values, arrays = sess._weightbundle_arrays
    assert set(arrays) == set(cg.layouts)  # no files given: every weight is handed over, none copied
    del w, so, values, arrays
    gc.collect()
    _ = [np.full(1 << 16, 7.0, np.float32) for _ in range(64)]  # reuse freed memory, if any was freed
    for g, e in zip(sess.run(None, x), want):
        assert g.tobytes() == e.tobytes()
    b.unload()


def test_large_relayouts_on_two_threads_match_one(monkeypatch):
    b = _bundle(zoo.convnet(channels=(3, 16, 32)), fold_bn=True)
    w = _weights(b, seed=3)
    cg = compiled.learn(b._graphs[0], _weights(b))
    one = cg.relaid(w)
    monkeypatch.setattr(compiled, "_PARALLEL_BYTES", 0)
    two = cg.relaid(w)
    assert list(one) == list(two) and all(one[n].tobytes() == two[n].tobytes() and one[n].shape == two[n].shape for n in one)
    b.unload()


def test_weight_arithmetic_in_the_optimizer_is_refused():
    """Unfolded BatchNorm: ORT's Conv+BN fusion computes new weights, which no layout replays.
    Which check sees it first depends on the CPU: the fused values are not indices (AVX2), or
    the fused graph's structure depends on the values (AVX-512 EPYC)."""
    b = _bundle(zoo.convnet(), fold_bn=False)
    with pytest.raises(compiled.NotCompilable, match="computed from weights|different graph for probe weights"):
        compiled.learn(b._graphs[0], _weights(b))
    b.unload()


def test_constant_folded_transpose_is_learned():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 12)).astype(np.float32)
    g = helper.make_graph(  # (a MatMul would absorb the Transpose as transB instead)
        [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]), helper.make_node("Add", ["x", "Wt"], ["y"])],
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 12, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 12, 8])],
        [numpy_helper.from_array(w, "W")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    b = _bundle(m, hoist=False)  # the Transpose stays in inference, so ORT folds it into a constant
    cg = compiled.learn(b._graphs[0], _weights(b))
    (lay,) = [lay for lay in cg.layouts.values() if not lay.identity]
    assert lay.source == "W" and lay.perm == (1, 0) and lay.shape == (12, 8)
    _assert_replays(b, cg)
    b.unload()


def test_a_permutation_with_no_block_form_becomes_a_gather():
    rng = np.random.default_rng(5)
    src = rng.standard_normal((6, 7)).astype(np.float32)
    perm = rng.permutation(src.size)
    index = (perm + 1).astype(np.float32).reshape(7, 6)
    index.flat[:3] = 0  # padding positions
    tensor = np.where(index == 0, 0, -1).astype(np.float32)
    lay = compiled._layout_of("t", index, tensor, ["w"], {"w": src}, {})
    assert lay.index is not None
    want = np.concatenate([[0], src.ravel()])[index.astype(np.int64).ravel()].reshape(7, 6)
    assert lay.apply(src).tobytes() == want.astype(np.float32).tobytes()


def test_values_that_are_not_indices_are_refused():
    src = np.ones((4, 4), np.float32)
    with pytest.raises(compiled.NotCompilable):
        compiled._layout_of("t", np.full((4, 4), 0.5, np.float32), np.full((4, 4), -1, np.float32), ["w"], {"w": src}, {})
    with pytest.raises(compiled.NotCompilable, match="mixes"):
        two = np.array([[-1, -2]], np.float32)
        compiled._layout_of("t", np.array([[1, 1]], np.float32), two, ["w", "v"], {"w": src, "v": src}, {})


# -- in the runtime: a version's sessions come from the once-optimized graph ----------------
CONV = zoo.convnet(channels=(3, 16, 32))
XC = np.random.default_rng(11).standard_normal((2, 3, 16, 16)).astype(np.float32)


@pytest.fixture
def spy(monkeypatch, tmp_path):
    """Records every optimization level a session is built with, and every learn()."""
    from weightbundle import sessions

    monkeypatch.setenv("WEIGHTBUNDLE_PACKED_ROOT", str(tmp_path / "disk"))
    seen: dict[str, list] = {"levels": [], "learned": []}
    real_options, real_learn = sessions.session_options, compiled.learn

    def options(opts, prepack, level, housekeeping=False):
        seen["levels"].append(level)
        return real_options(opts, prepack, level, housekeeping)

    def learn(*a, **kw):
        seen["learned"].append(1)
        return real_learn(*a, **kw)

    monkeypatch.setattr(sessions, "session_options", options)
    monkeypatch.setattr(compiled, "learn", learn)
    return seen


def _new_conv_weights(b: wb.Bundle, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s.name: (rng.standard_normal(s.shape) * 0.2 + (1.0 if s.name.endswith(".var") else 0.0)).astype(s.dtype) for s in b.update_inputs}


@pytest.mark.parametrize("prepack,hybrid", [(True, True), (True, False), (False, False)])
def test_versions_load_the_once_optimized_graph_and_serve_what_ort_serves(spy, prepack, hybrid):
    logs: list[str] = []
    b = wb.Bundle.load_from_mem(wb.build_bundle(wb.convert(CONV, fold_bn=True)), wb.RuntimeOptions(prepack=prepack, hybrid=hybrid))
    b._log = lambda m, level="warn": logs.append(m)
    b.init()
    assert any("optimized once" in m for m in logs), logs
    for seed in (1, 2, 3):
        w = _new_conv_weights(b, seed)
        b.update(w)
        want = zoo.ort_run(zoo.with_weights(CONV, w), {"x": XC})["y"]  # plain ORT, the unfolded model: BN folded by ORT
        got = b.infer({"x": XC})[0]["y"]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        if prepack and hybrid:
            assert b._sessions.builder.wait_idle(60)
            assert b.fully_optimised  # the shared pre-packed session, packed from the once-optimized graph
            np.testing.assert_allclose(b.infer({"x": XC})[0]["y"], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert spy["learned"] == [1]  # once per load
    # after learning, no session of any version ran the optimizer
    first_none = spy["levels"].index("none") if "none" in spy["levels"] else len(spy["levels"])
    assert set(spy["levels"][first_none:]) == {"none"}, spy["levels"]
    b.unload()


def test_an_unfoldable_graph_is_optimized_per_version_as_before(spy):
    logs: list[str] = []
    b = wb.Bundle.load_from_mem(wb.build_bundle(wb.convert(CONV, fold_bn=False)), wb.RuntimeOptions(prepack=False))
    b._log = lambda m, level="warn": logs.append(m)
    b.init()
    assert any("optimizing each weight version" in m for m in logs), logs
    w = _new_conv_weights(b, 4)
    b.update(w)
    want = zoo.ort_run(zoo.with_weights(CONV, w), {"x": XC})["y"]
    np.testing.assert_allclose(b.infer({"x": XC})[0]["y"], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert "all" in spy["levels"]
    b.unload()


def test_compile_once_off_never_learns(spy):
    b = wb.Bundle.load_from_mem(wb.build_bundle(wb.convert(CONV, fold_bn=True)), wb.RuntimeOptions(compile_once=False))
    b.init()
    b.update(_new_conv_weights(b, 5))
    assert spy["learned"] == [] and "all" in spy["levels"]
    b.unload()


def _anon_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024


def test_zero_copy_sessions_map_the_store_instead_of_copying_it():
    """Unchanged weights are external data pointing into the store's blobs: ORT maps them.
    (Handed over as OrtValues, ORT would copy them: +16 MiB of private memory here.)"""
    model = zoo.mlp(sizes=(16, 2048, 2048, 8))
    with wb.Bundle.load_from_mem(wb.build_bundle(wb.convert(model)), wb.RuntimeOptions(prepack=False)) as b:
        b.init()
        b.infer({"x": np.zeros((1, 16), np.float32)})
        assert b._sessions._compiled is not None
        b.update({"fc1.weight": np.ones((2048, 2048), np.float32)})
        v = b.store.current()
        release_free_memory()  # else freed copies of earlier sessions would be reused unseen
        before = _anon_mib()
        sess = b._sessions._new_session(v, prepack=False, level="all")  # what a new version's zero-copy session is
        sess.run(None, {"x": np.zeros((1, 16), np.float32)})
        assert _anon_mib() - before < 8, "the version's session copied the weights"


def test_a_version_collected_while_its_session_builds_is_superseded(tmp_path, monkeypatch):
    """Another instance's updates may collect a version's blobs before this instance builds its
    session: that is a retry with the newest version (_Superseded), never an error reply."""
    from weightbundle.sessions import _Superseded

    monkeypatch.setenv("WEIGHTBUNDLE_PACKED_ROOT", str(tmp_path / "disk"))
    b = wb.Bundle.load_from_mem(wb.build_bundle(wb.convert(CONV, fold_bn=True)), wb.RuntimeOptions(prepack=False, history=1))
    b.init()
    b.infer({"x": XC})
    old = b.store.current()
    for seed in (6, 7):
        b.update(_new_conv_weights(b, seed))
    b._updater.settle()  # the collection ran: the old version's blob is gone
    assert b._sessions._compiled is not None and b._sessions._collected(old)
    with pytest.raises(_Superseded):
        b._sessions._new_session(old, prepack=False, level="all")
    assert b.infer({"x": XC})[1] == b.version  # the newest version serves
    b.unload()


def test_a_failure_while_learning_falls_back_to_optimizing_each_version(monkeypatch, tmp_path):
    monkeypatch.setenv("WEIGHTBUNDLE_PACKED_ROOT", str(tmp_path / "disk"))

    def no_room(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(compiled, "learn", no_room)
    logs: list[str] = []
    b = wb.Bundle.load_from_mem(wb.build_bundle(wb.convert(CONV, fold_bn=True)), wb.RuntimeOptions(prepack=False))
    b._log = lambda m, level="warn": logs.append(m)
    b.init()
    w = _new_conv_weights(b, 8)
    b.update(w)
    want = zoo.ort_run(zoo.with_weights(CONV, w), {"x": XC})["y"]
    np.testing.assert_allclose(b.infer({"x": XC})[0]["y"], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert b._sessions._compiled is None and any("No space left" in m for m in logs), logs
    b.unload()
