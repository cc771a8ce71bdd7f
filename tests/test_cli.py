"""The ``weightbundle`` command line: build, inspect, config (serve and push run in the e2e tests)."""

from __future__ import annotations

import json
import os

import onnx
import pytest

from weightbundle import zoo
import weightbundle as wb
from weightbundle.cli import main


@pytest.fixture
def onnx_path(tmp_path):
    p = tmp_path / "mlp.onnx"
    onnx.save(zoo.mlp(), str(p))
    return str(p)


def test_build_inspect_roundtrip(onnx_path, tmp_path, capsys):
    out = str(tmp_path / "m.bundle")
    assert main(["build", onnx_path, "-o", out]) == 0
    assert main(["inspect", out, "--json"]) == 0
    d = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert [g["id"] for g in d["graphs"]] == [0, 1, 2]
    assert [v["name"] for v in d["variables"]] == [v.name for v in wb.convert(zoo.mlp()).variables]
    assert all(len(v["crc32"]) == 8 for v in d["variables"])
    assert main(["inspect", out]) == 0
    text = capsys.readouterr().out
    assert "fc0.weight" in text and "update-graph input order" in text


def test_build_suggests_fold_bn_for_batchnorm_models(tmp_path, capsys):
    p = str(tmp_path / "conv.onnx")
    onnx.save(zoo.convnet(), p)
    assert main(["build", p, "-o", str(tmp_path / "a.bundle")]) == 0
    assert "2 BatchNormalization node(s) stay" in capsys.readouterr().out
    assert main(["build", p, "-o", str(tmp_path / "b.bundle"), "--fold-bn"]) == 0
    assert "BatchNormalization" not in capsys.readouterr().out


def test_build_with_weights_and_no_init(onnx_path, tmp_path, capsys):
    full, small = str(tmp_path / "full.bundle"), str(tmp_path / "small.bundle")
    assert main(["build", onnx_path, "-o", full]) == 0
    assert main(["build", onnx_path, "-o", small, "--weights", "fc2.weight", "fc2.bias", "--no-init"]) == 0
    with wb.Bundle.load_from_file(small) as b:
        assert [v.name for v in b.variables] == ["fc2.weight", "fc2.bias"]
        assert b.model_num == 2
    assert os.path.getsize(small) < os.path.getsize(full)
    capsys.readouterr()
    assert main(["inspect", small]) == 0
    assert "no init graph" in capsys.readouterr().out


def test_errors_are_messages_not_tracebacks(onnx_path, tmp_path, capsys):
    assert main(["build", onnx_path, "-o", str(tmp_path / "x.bundle"), "--weights", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    bad = tmp_path / "bad.bundle"
    bad.write_bytes(b"\x89WBNDL\r\n" + b"\0" * 100)
    assert main(["inspect", str(bad)]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.bundle")]) == 2


def _parse_config(text: str):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    return text_format.Parse(text, mc.ModelConfig())


def test_config_writes_a_complete_pbtxt(onnx_path, tmp_path, capsys):
    from tritonclient.grpc import model_config_pb2 as mc

    out = str(tmp_path / "m.bundle")
    main(["build", onnx_path, "-o", out])
    cfg = tmp_path / "config.pbtxt"
    assert main(["config", out, "--name", "m", "--max-batch-size", "8", "--instances", "3", "--parameter", "allow_updates=true", "-o", str(cfg)]) == 0
    c = _parse_config(cfg.read_text())
    assert (c.name, c.backend, c.max_batch_size) == ("m", "weightbundle", 8)
    ins = {i.name: i for i in c.input}
    assert list(ins["x"].dims) == [16] and ins["x"].data_type == mc.TYPE_FP32 and not ins["x"].optional
    assert list(ins["CONTROL"].dims) == [1] and ins["CONTROL"].data_type == mc.TYPE_STRING and ins["CONTROL"].optional
    # Weights carry their exact shapes, so Triton refuses a wrong-sized tensor before copying it.
    assert list(ins["fc0.weight"].dims) == [16, 32] and ins["fc0.weight"].optional
    assert {o.name for o in c.output} >= {"y", "WEIGHTS_VERSION", "CONTROL_RESULT"}
    assert (c.instance_group[0].count, c.instance_group[0].kind) == (3, mc.ModelInstanceGroup.KIND_CPU)
    assert c.HasField("dynamic_batching") and c.parameters["allow_updates"].string_value == "true"
    capsys.readouterr()
    assert main(["config", out, "--name", "m"]) == 0
    c = _parse_config(capsys.readouterr().out)
    assert not c.HasField("dynamic_batching")
    assert {i.name for i in c.input} == {"x", "CONTROL"}  # updates off: no weight inputs at all
