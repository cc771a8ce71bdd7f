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
