"""Small real ONNX models built with ``onnx.helper`` (fixed seeds, no downloads), plus the
helpers to run them with plain ONNX Runtime: the one model zoo of the tests, the
benchmarks and the example repository.

>>> from weightbundle import zoo                                          # doctest: +SKIP
>>> m = zoo.mlp(sizes=(16, 64, 8))
>>> y = zoo.ort_run(m, {"x": x})["y"]
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(nodes, inputs, outputs, inits, name) -> onnx.ModelProto:
    g = helper.make_graph(nodes, name, inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="weightbundle-zoo")
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def mlp(sizes=(16, 32, 32, 8), seed: int = 0, dtype=np.float32, input_name: str = "x", output_name: str = "y", name: str = "mlp") -> onnx.ModelProto:
    """MatMul + Add + Relu layers; weights 'fc{i}.weight', 'fc{i}.bias'."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], {}, input_name
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        inits[f"fc{i}.weight"] = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(dtype)
        inits[f"fc{i}.bias"] = (0.1 * rng.standard_normal((b,))).astype(dtype)
        nodes += [helper.make_node("MatMul", [x, f"fc{i}.weight"], [f"mm{i}"]), helper.make_node("Add", [f"mm{i}", f"fc{i}.bias"], [f"h{i}"])]
        x = f"h{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    nodes.append(helper.make_node("Identity", [x], [output_name]))
    T = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return _model(
        nodes,
        [helper.make_tensor_value_info(input_name, T, ["batch", sizes[0]])],
        [helper.make_tensor_value_info(output_name, T, ["batch", sizes[-1]])],
        inits,
        name,
    )


def big_mlp(n: int = 2048, layers: int = 4, seed: int = 0) -> onnx.ModelProto:
    """The benchmark model (README, Performance): layers x (n x n) FP32 MatMul + Relu, no bias."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], {}, "x"
    for i in range(layers):
        inits[f"w{i}"] = (rng.standard_normal((n, n), dtype=np.float32) / np.sqrt(n)).astype(np.float32)
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"]), helper.make_node("Relu", [f"h{i}"], [f"r{i}"])]
        x = f"r{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        inits,
        "big_mlp",
    )


def convnet(channels=(3, 8, 16), classes: int = 10, seed: int = 0, hw: int = 16) -> onnx.ModelProto:
    """Conv -> BatchNorm -> Relu -> MaxPool blocks, GlobalAveragePool, Gemm head."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], {}, "x"
    for i, (cin, cout) in enumerate(zip(channels[:-1], channels[1:])):
        inits[f"conv{i}.weight"] = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(cin * 9)).astype(np.float32)
        inits[f"conv{i}.bias"] = rng.standard_normal(cout).astype(np.float32) * 0.1
        inits[f"bn{i}.scale"] = (1 + 0.1 * rng.standard_normal(cout)).astype(np.float32)
        inits[f"bn{i}.shift"] = (0.1 * rng.standard_normal(cout)).astype(np.float32)
        inits[f"bn{i}.mean"] = (0.1 * rng.standard_normal(cout)).astype(np.float32)
        inits[f"bn{i}.var"] = (1 + 0.1 * rng.random(cout)).astype(np.float32)
        nodes += [
            helper.make_node("Conv", [x, f"conv{i}.weight", f"conv{i}.bias"], [f"c{i}"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", [f"c{i}", f"bn{i}.scale", f"bn{i}.shift", f"bn{i}.mean", f"bn{i}.var"], [f"b{i}"], epsilon=1e-5),
            helper.make_node("Relu", [f"b{i}"], [f"r{i}"]),
            helper.make_node("MaxPool", [f"r{i}"], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2]),
        ]
        x = f"p{i}"
    inits["head.weight"] = (rng.standard_normal((classes, channels[-1])) / np.sqrt(channels[-1])).astype(np.float32)
    inits["head.bias"] = np.zeros(classes, np.float32)
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "head.weight", "head.bias"], ["y"], transB=1),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", channels[0], hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", classes])],
        inits,
        "convnet",
    )


def attention(vocab: int = 50, d: int = 16, seed: int = 0) -> onnx.ModelProto:
    """Embedding Gather, LayerNorm, single-head self-attention with Softmax, output projection.

    Holds non-weight float initializers too: a scalar attention scale (stays a constant)."""
    rng = np.random.default_rng(seed)
    inits = {
        "embed.weight": rng.standard_normal((vocab, d)).astype(np.float32),
        "ln.gamma": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32),
        "ln.beta": (0.1 * rng.standard_normal(d)).astype(np.float32),
        "q.weight": (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32),
        "k.weight": (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32),
        "v.weight": (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32),
        "o.weight": (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32),
        "scale": np.array(1.0 / np.sqrt(d), np.float32),
        "perm_shape": np.array([0, 2, 1], np.int64),
    }
    nodes = [
        helper.make_node("Gather", ["embed.weight", "ids"], ["emb"], axis=0),
        helper.make_node("LayerNormalization", ["emb", "ln.gamma", "ln.beta"], ["h"], axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["h", "q.weight"], ["q"]),
        helper.make_node("MatMul", ["h", "k.weight"], ["k"]),
        helper.make_node("MatMul", ["h", "v.weight"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["ss"]),
        helper.make_node("Softmax", ["ss"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["a"]),
        helper.make_node("MatMul", ["a", "o.weight"], ["y"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", d])],
        inits,
        "attention",
    )


def transformer_encoder(
    layers: int = 4,
    d_model: int = 512,
    heads: int = 8,
    ffn: int = 2048,
    vocab: int = 8000,
    max_positions: int = 512,
    seed: int = 0,
    small: bool = False,
) -> onnx.ModelProto:
    """A BERT-style post-LayerNorm encoder (about 65 MiB of FP32 weights at the defaults).

    Input ``ids`` (batch, seq) int64 token ids, ``seq`` <= ``max_positions``; output ``y``
    (batch, seq, d_model), the last hidden state. Token embedding (Gather) + position
    embedding (Gather of Range(seq)), embedding LayerNorm, then ``layers`` x [multi-head
    self-attention: separate Q/K/V MatMul+Add, Reshape/Transpose to heads, scaled Softmax,
    output projection, residual, LayerNorm; FFN: MatMul+Add, Gelu written with Erf (opset 17),
    MatMul+Add, residual, LayerNorm]. Weights are named like a Hugging Face BERT
    (``layer{i}.attn.q.weight``...) and stored [in, out]; scalar and int64 initializers
    (attention scale, Gelu constants, reshape shapes) stay constants. Seeded, scaled
    1/sqrt(fan_in), so outputs are finite and O(1).

    ``small=True``: a tiny config (2 layers, d_model 16, 2 heads, ffn 32, vocab 50, 16
    positions) for unit tests; explicit arguments are ignored then."""
    if small:
        layers, d_model, heads, ffn, vocab, max_positions = 2, 16, 2, 32, 50, 16
    if d_model % heads:
        raise ValueError(f"d_model {d_model} is not a multiple of heads {heads}")
    dh = d_model // heads
    rng = np.random.default_rng(seed)

    def dense(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        return (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), (0.02 * rng.standard_normal(b)).astype(np.float32)

    def ln_params(prefix: str) -> None:
        inits[f"{prefix}.gamma"] = (1 + 0.05 * rng.standard_normal(d_model)).astype(np.float32)
        inits[f"{prefix}.beta"] = (0.02 * rng.standard_normal(d_model)).astype(np.float32)

    nodes: list[onnx.NodeProto] = []
    inits: dict[str, np.ndarray] = {
        "embed.weight": rng.standard_normal((vocab, d_model)).astype(np.float32),
        "pos.weight": (0.5 * rng.standard_normal((max_positions, d_model))).astype(np.float32),
    }
    ln_params("embed.ln")
    # constants, never weights: int64 shapes/indices and scalar floats
    consts = {
        "c.zero": np.array(0, np.int64),
        "c.one": np.array(1, np.int64),
        "c.heads_shape": np.array([0, 0, heads, dh], np.int64),
        "c.merge_shape": np.array([0, 0, d_model], np.int64),
        "c.attn_scale": np.array(1.0 / np.sqrt(dh), np.float32),
        "c.inv_sqrt2": np.array(1.0 / np.sqrt(2.0), np.float32),
        "c.half": np.array(0.5, np.float32),
        "c.fone": np.array(1.0, np.float32),
    }

    def node(op: str, ins: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, ins, [out], **attrs))
        return out

    def layer_norm(x: str, prefix: str) -> str:
        return node("LayerNormalization", [x, f"{prefix}.gamma", f"{prefix}.beta"], f"{prefix}.out", axis=-1, epsilon=1e-5)

    def linear(x: str, prefix: str, a: int, b: int) -> str:
        inits[f"{prefix}.weight"], inits[f"{prefix}.bias"] = dense(a, b)
        return node("Add", [node("MatMul", [x, f"{prefix}.weight"], f"{prefix}.mm"), f"{prefix}.bias"], f"{prefix}.out")

    node("Shape", ["ids"], "ids_shape")
    node("Gather", ["ids_shape", "c.one"], "seq_len", axis=0)
    node("Range", ["c.zero", "seq_len", "c.one"], "positions")
    tok = node("Gather", ["embed.weight", "ids"], "tok_emb", axis=0)
    pos = node("Gather", ["pos.weight", "positions"], "pos_emb", axis=0)
    x = layer_norm(node("Add", [tok, pos], "emb"), "embed.ln")
    for i in range(layers):
        p = f"layer{i}"
        split = {}
        for t in ("q", "k", "v"):
            h = linear(x, f"{p}.attn.{t}", d_model, d_model)
            r = node("Reshape", [h, "c.heads_shape"], f"{p}.attn.{t}.heads")
            # (batch, heads, seq, dh); K as (batch, heads, dh, seq)
            split[t] = node("Transpose", [r], f"{p}.attn.{t}.t", perm=[0, 2, 3, 1] if t == "k" else [0, 2, 1, 3])
        s = node("MatMul", [split["q"], split["k"]], f"{p}.attn.scores")
        s = node("Mul", [s, "c.attn_scale"], f"{p}.attn.scaled")
        a = node("Softmax", [s], f"{p}.attn.probs", axis=-1)
        c = node("MatMul", [a, split["v"]], f"{p}.attn.ctx")
        c = node("Transpose", [c], f"{p}.attn.ctx.t", perm=[0, 2, 1, 3])
        c = node("Reshape", [c, "c.merge_shape"], f"{p}.attn.merged")
        o = linear(c, f"{p}.attn.o", d_model, d_model)
        ln_params(f"{p}.attn.ln")
        x = layer_norm(node("Add", [x, o], f"{p}.attn.res"), f"{p}.attn.ln")
        h = linear(x, f"{p}.ffn.fc1", d_model, ffn)
        # Gelu(h) = 0.5 * h * (1 + erf(h / sqrt(2)))
        e = node("Erf", [node("Mul", [h, "c.inv_sqrt2"], f"{p}.ffn.gelu.scaled")], f"{p}.ffn.gelu.erf")
        e = node("Add", [e, "c.fone"], f"{p}.ffn.gelu.erf1")
        g = node("Mul", [node("Mul", [h, e], f"{p}.ffn.gelu.he"), "c.half"], f"{p}.ffn.gelu")
        f2 = linear(g, f"{p}.ffn.fc2", ffn, d_model)
        ln_params(f"{p}.ffn.ln")
        x = layer_norm(node("Add", [x, f2], f"{p}.ffn.res"), f"{p}.ffn.ln")
    node("Identity", [x], "y")
    return _model(
        nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", d_model])],
        {**inits, **consts},
        "transformer_encoder",
    )


def with_int_initializers(seed: int = 0) -> onnx.ModelProto:
    """Float weights plus int64 shape / index initializers that must stay constants."""
    rng = np.random.default_rng(seed)
    inits = {
        "w": rng.standard_normal((12, 12)).astype(np.float32),
        "b": rng.standard_normal(12).astype(np.float32),
        "shape": np.array([-1, 3, 4], np.int64),
        "idx": np.array([2, 0, 1], np.int64),
        "clip_max": np.array(2.5, np.float32),
        "clip_min": np.array(-2.5, np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["a"]),
        helper.make_node("Clip", ["a", "clip_min", "clip_max"], ["c"]),
        helper.make_node("Reshape", ["c", "shape"], ["r"]),
        helper.make_node("Gather", ["r", "idx"], ["y"], axis=1),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 4])],
        inits,
        "ints",
    )


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def with_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers are replaced: the ORT reference for an update."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name in weights:
            t.CopyFrom(numpy_helper.from_array(np.asarray(weights[t.name]).astype(helper.tensor_dtype_to_np_dtype(t.data_type)), t.name))
    return m


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return {o.name: a for o, a in zip(s.get_outputs(), s.run(None, feeds))}


# The zoo by name: the models the runtime, convert and format tests sweep over.
MODELS = {
    "mlp": mlp,
    "mlp_fp16": lambda: mlp(dtype=np.float16),
    "convnet": convnet,
    "attention": attention,
    "transformer_encoder": lambda: transformer_encoder(small=True),
    "with_int_initializers": with_int_initializers,
}


def resnet50(seed: int = 0) -> onnx.ModelProto:
    """ResNet-50 (Conv+BatchNorm, 53 of each) from the onnx package's light model zoo, whose
    weights are ConstantOfShape placeholders there: materialised here as seeded random
    initializers (~98 MiB), so the real architecture can be benchmarked without a download."""
    import os

    path = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", "light_resnet50.onnx")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: this onnx package does not ship the light model zoo")
    m = onnx.load(path)
    rng = np.random.default_rng(seed)
    shapes = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    bn_var = {n.input[4] for n in m.graph.node if n.op_type == "BatchNormalization"}
    new, kept = [], []
    for n in m.graph.node:
        if n.op_type != "ConstantOfShape":
            kept.append(n)
            continue
        shape = tuple(int(d) for d in shapes[n.input[0]])
        if n.output[0] in bn_var:  # variances must be positive
            a = rng.uniform(0.5, 1.5, shape)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            a = rng.standard_normal(shape) * (1.0 / np.sqrt(fan_in) if len(shape) > 1 else 0.1)
        new.append(numpy_helper.from_array(a.astype(np.float32), n.output[0]))
    used = {i for n in kept for i in n.input}
    inits = [t for t in m.graph.initializer if t.name in used] + new
    del m.graph.node[:]
    m.graph.node.extend(kept)
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    names = {t.name for t in inits}
    inputs = [i for i in m.graph.input if i.name not in names and i.name not in shapes]
    del m.graph.input[:]
    m.graph.input.extend(inputs)
    return m
