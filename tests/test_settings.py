"""Model config parameters: parsing follows the declarations, and the README's table is generated from them."""

from __future__ import annotations

import os

import pytest

from weightbundle.errors import BundleError
from weightbundle.runtime import RuntimeOptions
from weightbundle.settings import ServingSettings, markdown_table

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def cfg(**params: str) -> dict:
    return {"max_batch_size": 4, "parameters": {k: {"string_value": v} for k, v in params.items()}}


def test_the_readme_table_is_the_generated_one():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    start = text.index("(tests/test_settings.py keeps it in step) -->\n") + len("(tests/test_settings.py keeps it in step) -->\n")
    end = text.index("<!-- end of generated table -->")
    assert text[start:end] == markdown_table(), "README parameter table is stale: regenerate with python -m weightbundle.settings"


def test_values_parse_by_declared_type():
    s = ServingSettings.from_model_config(
        cfg(allow_updates="yes", history="3", follow_seconds="0", staged_ttl_seconds="2.5", file_update_dirs="/a::/b", s3_allowed_prefixes="bkt, bkt2/p ,")
    )
    assert (s.allow_updates, s.history, s.staged_ttl_seconds, s.max_batch_size) == (True, 3, 2.5, 4)
    assert s.file_update_dirs == ("/a", "/b") and s.s3_allowed_prefixes == ("bkt", "bkt2/p")


@pytest.mark.parametrize(
    "params, needle",
    [
        ({"history": "two"}, "integer"),
        ({"prepack": "maybe"}, "true or false"),
        ({"staged_ttl_seconds": "x"}, "number"),
        ({"alow_updates": "true"}, "unknown model config parameter"),
        ({"update_auth": "off"}, "update_auth"),
        ({"history": "0"}, "history"),
    ],
)
def test_bad_values_name_the_parameter(params, needle):
    with pytest.raises(BundleError, match=needle):
        ServingSettings.from_model_config(cfg(**params))


def test_runtime_options_are_the_shared_fields():
    s = ServingSettings.from_model_config(cfg(prepack="false", history="4", intra_op_threads="2", share_packed="false"))
    o = s.runtime_options("/x")
    assert isinstance(o, RuntimeOptions)
    assert (o.prepack, o.history, o.intra_op_threads, o.share_packed, o.store_dir) == (False, 4, 2, False, "/x")


def with_instances(count: int, **params: str) -> dict:
    return {**cfg(**params), "instance_group": [{"name": "m", "kind": "KIND_CPU", "count": count, "gpus": []}]}


@pytest.mark.parametrize("count, cpus, threads", [(1, 16, 0), (2, 2, 1), (4, 2, 1), (2, 16, 8), (3, 16, 5)])
def test_instances_share_the_cores(monkeypatch, count, cpus, threads):
    # One instance keeps ONNX Runtime's default; several split the CPUs, so that their
    # spinning pools do not oversubscribe the cores (P4: p50 135 -> 86 ms on 2 cores).
    monkeypatch.setattr("weightbundle.settings.available_cpus", lambda: cpus)
    s = ServingSettings.from_model_config(with_instances(count))
    assert s.instances == count
    assert s.runtime_options(None).intra_op_threads == threads


def test_an_explicit_thread_count_wins(monkeypatch):
    monkeypatch.setattr("weightbundle.settings.available_cpus", lambda: 2)
    s = ServingSettings.from_model_config(with_instances(4, intra_op_threads="3"))
    assert s.runtime_options(None).intra_op_threads == 3


def test_instances_count_every_group_and_gpu():
    c = {**cfg(), "instance_group": [{"count": 2, "kind": "KIND_CPU"}, {"count": 1, "kind": "KIND_GPU", "gpus": [0, 1]}, {"kind": "KIND_CPU"}]}
    assert ServingSettings.from_model_config(c).instances == 5
    assert ServingSettings.from_model_config(cfg()).instances == 1
