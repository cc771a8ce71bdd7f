"""weightbundle: compile an ONNX model once, refresh its weights while it serves.

>>> import numpy as np, weightbundle as wb                           # doctest: +SKIP
>>> data = wb.build_bundle(wb.convert("mlp.onnx"))                    # infer + init + update graphs
>>> wb.save_bundle("mlp.bundle", data)
>>> with wb.Bundle.load_from_file("mlp.bundle") as b:
...     b.execute(b.model_id(1))                                       # init
...     b.execute(2, {"fc1.weight": new_w})                            # update; absent/empty = keep
...     out = b.execute(0, {"x": x})                                   # inference

The file format and control protocol are specified in docs/bundle-format.md.
"""

__version__ = "0.1.0"

from .build import build_bundle, save_bundle  # noqa: E402
from .convert import RefreshableGraphs, convert, default_weights  # noqa: E402
from .errors import (  # noqa: E402
    BundleError,
    ChecksumError,
    ConvertError,
    FormatError,
    InputError,
    NotInitializedError,
    UnloadedError,
    UpdateError,
    VersionConflictError,
)
from .format import VariableSpec  # noqa: E402
from .runtime import Bundle, RuntimeOptions  # noqa: E402

__all__ = [
    "Bundle",
    "RuntimeOptions",
    "RefreshableGraphs",
    "VariableSpec",
    "build_bundle",
    "convert",
    "default_weights",
    "save_bundle",
    "BundleError",
    "ChecksumError",
    "ConvertError",
    "FormatError",
    "InputError",
    "NotInitializedError",
    "UnloadedError",
    "UpdateError",
    "VersionConflictError",
]
